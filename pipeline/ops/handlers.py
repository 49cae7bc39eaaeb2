"""Import every stage's handler as its worker will, before anything runs: the second half of ``pipeline check``.

A worker is ``python -m pipeline.cli worker STAGE``, started by supervisord in
the topology's folder (``directory=%(here)s`` in
:mod:`pipeline.ops.supervisor_conf`) with the environment ``pipeline up`` ran
in: its ``sys.path`` starts with that folder, then ``PYTHONPATH``.
:func:`check_handlers` starts one child interpreter the same way
(``python -m pipeline.ops.handlers``, same Python, same folder, same
environment). The child imports each stage's handler, builds a stage class
with the stage's ``params`` as :func:`pipeline.stage.load_handler` does, and
writes one JSON line per stage. Nothing connects to nsqd and nothing is
published. Stage classes are built with a scratch var dir, so a check beside a
running pipeline never touches its files (an archive stage's segments, say).

Each problem is a :class:`~pipeline.errors.TopologyError` at the stage's
``handler:`` (or ``params:``) value, with the cause where it lies::

    topology.yaml:12:14: stages.valuer.handler: cannot import 'mine.valuer': mine/valuer.py:3: SyntaxError: expected ':'
"""
from __future__ import annotations

import difflib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import StageSpec, load_topology, read_positions
from pipeline.errors import TopologyError, user_frame
from pipeline.stage import StageContext

__all__ = ["DEFAULT_TIMEOUT", "check_handlers"]

#: Seconds the child may take to import and build every handler.
DEFAULT_TIMEOUT = 30.0
_CHILD = "pipeline.ops.handlers"
#: The exceptions :func:`pipeline.stage.load_handler` reports as a class refusing its params.
_REFUSALS = (TypeError, ValueError, KeyError)
#: (field, reason) of one stage's problem, or None when its handler imports and builds.
Problem = tuple[str, str] | None


# -- the parent: run the child, turn its report into located problems ------------

def check_handlers(path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> list[TopologyError]:
    """Import (and build) every stage's handler in a child interpreter set up like a worker.

    Parameters:
        path: a valid topology file; problems show it exactly as given.
        timeout: seconds the child may take; a stage whose import is still
            running then is one problem, and the stages after it are not checked.

    Returns:
        One problem per broken stage, in file order; empty when every handler is fine.

    Raises:
        TopologyError: the file cannot be loaded (run :func:`pipeline.config.validate_topology` first).
    """
    shown = os.fspath(path)
    topology = load_topology(shown)
    positions = read_positions(shown)
    stages = list(topology.stages)
    with tempfile.TemporaryDirectory(prefix="pipeline-check-") as scratch:
        report, returncode = _run_child(Path(os.path.abspath(shown)), Path(scratch), timeout)
        stderr = (Path(scratch) / "stderr").read_text(errors="replace")
    problems, unfinished = _read_report(report, stages)
    if unfinished is not None:  # stopped at the timeout, or ended by the import (os._exit, a crash in C code)
        problems[unfinished] = ("handler", _cut_short(topology, unfinished, stages, returncode, stderr, timeout))

    def locate(stage: str, field: str) -> tuple[int, int]:
        loc, handler = ("stages", stage, field), ("stages", stage, "handler")
        return positions.values.get(loc) or positions.locate(handler)

    return sorted((TopologyError(shown, *locate(stage, field), f"stages.{stage}.{field}", reason)
                   for stage, (field, reason) in problems.items()), key=lambda p: (p.line, p.col))


def _run_child(topology_file: Path, scratch: Path, timeout: float) -> tuple[list[dict[str, Any]], int | None]:
    """Run the child; return its report lines and exit code (None when it was stopped at the timeout)."""
    report = scratch / "report.jsonl"
    argv = [sys.executable, "-m", _CHILD, str(topology_file), str(scratch / "var"), str(report), os.getcwd()]
    # As a worker: in the topology's folder, with this environment (supervisor_conf adds PYTHONUNBUFFERED).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(scratch / "stdout", "wb") as out, open(scratch / "stderr", "wb") as err:
        # Its own session, so a handler that starts processes at import cannot outlive the check.
        child = subprocess.Popen(argv, cwd=topology_file.parent, env=env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=err, start_new_session=True)
        try:
            returncode: int | None = child.wait(timeout)
        except BaseException as e:  # the timeout, or ^C
            _kill_group(child.pid)
            child.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            returncode = None
    lines = []
    for text in report.read_text().splitlines() if report.exists() else []:
        try:
            lines.append(json.loads(text))
        except ValueError:  # the last line, cut short by the kill
            break
    return lines, returncode


def _kill_group(pgid: int) -> None:
    """Kill the child's session: the child (not reaped yet, so the group id is still its own) and its children."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # they have all exited
        pass


def _read_report(report: list[dict[str, Any]], stages: list[str]) -> tuple[dict[str, tuple[str, str]], str | None]:
    """The problems the child reported, and the first stage it did not finish (None when it finished them all)."""
    problems: dict[str, tuple[str, str]] = {}
    done: set[str] = set()
    for line in report:
        done.add(line["stage"])
        if line["problem"] is not None:
            problems[line["stage"]] = (line["field"], line["problem"])
    return problems, next((stage for stage in stages if stage not in done), None)


def _cut_short(topology, stage: str, stages: list[str], returncode: int | None, stderr: str, timeout: float) -> str:
    """Why the child did not finish ``stage``: it was stopped at the timeout, or it ended (exit code, last line)."""
    module = topology.stages[stage].handler.partition(":")[0]
    later = stages[stages.index(stage) + 1:]
    unchecked = f"; not checked: {', '.join(later)}" if later else ""
    if returncode is None:
        return f"importing {module!r} did not finish within {timeout:g} s{unchecked}"
    if returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}"
    else:  # an exit code, and what the process said last
        how = "".join([f"exit code {returncode}", *(f": {line}" for line in stderr.strip().splitlines()[-1:])])
    return f"importing {module!r} ended the check's process ({how}){unchecked}"


# -- the child: import, look up and build each handler ----------------------------

def inspect_stage(name: str, spec: StageSpec, var_dir: Path, shown_from: str | None = None) -> Problem:
    """Import stage ``name``'s handler and build it as its worker would; return what is wrong with it, if anything.

    Parameters:
        name: the stage's name in the topology.
        spec: the stage.
        var_dir: the var dir a stage class is built with.
        shown_from: file names in the reasons are relative to this folder when under it.
    """
    show = _shower(shown_from)
    module_name, _, attr = spec.handler.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            where = "not in the topology's folder, on PYTHONPATH or among the installed packages"
            return "handler", f"cannot import {module_name!r}: {e.msg} ({where})"
        return "handler", f"cannot import {module_name!r}: {_raised(e, show)}"
    except SyntaxError as e:
        return "handler", f"cannot import {module_name!r}: {show(e.filename, e.lineno)}: {type(e).__name__}: {e.msg}"
    except (Exception, SystemExit) as e:  # whatever the module raises at import, a worker would die of
        return "handler", f"cannot import {module_name!r}: {_raised(e, show)}"
    return _build(name, spec, module, attr, var_dir, show)


def _build(name: str, spec: StageSpec, module: Any, attr: str, var_dir: Path, show: _Show) -> Problem:
    """Look ``attr`` up in ``module`` and, for a class, build it with the stage's params."""
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f" ({show(module.__file__)})" if getattr(module, "__file__", None) else ""
        return "handler", f"module {module.__name__!r}{where} has no attribute {attr!r}{hint}"
    handler = getattr(module, attr)
    if not callable(handler):
        return "handler", f"{spec.handler!r} is not callable (its type is {type(handler).__name__})"
    if isinstance(handler, type):
        try:
            handler(StageContext(name, 0, var_dir, dict(spec.params)))
        except _REFUSALS as e:
            return "params", f"{spec.handler!r} refused its params: {_raised(e, show)}"
        except (Exception, SystemExit) as e:
            return "handler", f"building {spec.handler!r} failed: {_raised(e, show)}"
    return None


_Show = Callable[..., str]


def _shower(base: str | None) -> _Show:
    """A function showing ``file[:line]``, relative to ``base`` when the file is under it."""
    def show(filename: str | None, line: int | None = None) -> str:
        name = filename or "<unknown>"
        if base and os.path.isabs(name) and Path(name).is_relative_to(base):
            name = os.path.relpath(name, base)
        return f"{name}:{line}" if line else name
    return show


def _raised(error: BaseException, show: _Show) -> str:
    """``FILE:LINE: Type: message`` of an exception, at the deepest frame of the user's own code."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    message = str(error).strip().splitlines()[:1]
    what = f"{name}: {message[0]}" if message else name
    frame = user_frame(traceback.extract_tb(error.__traceback__))
    return f"{show(frame.filename, frame.lineno)}: {what}" if frame is not None else what


def _main(argv: list[str]) -> None:
    """The child: ``TOPOLOGY VAR_DIR REPORT SHOWN_FROM``; one JSON line per stage checked, in file order."""
    topology_file, var_dir, report_path, shown_from = argv
    topology = load_topology(topology_file)
    with open(report_path, "w", buffering=1) as report:  # line-buffered: a kill leaves every finished line
        for name, spec in topology.stages.items():
            problem = inspect_stage(name, spec, Path(var_dir), shown_from)
            field, reason = problem or (None, None)
            report.write(json.dumps({"stage": name, "field": field, "problem": reason}) + "\n")
    # A handler may leave non-daemon threads running; they must not hold the check up.
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
