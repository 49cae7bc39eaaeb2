"""Contender processes the benchmark starts, and stops again by pid.

Each runs in its own session (a Ctrl-C in the terminal reaches only the
benchmark, which then stops them itself) with its output in a log file.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.ops.processes import stop_pid

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE = 15.0


@dataclass
class Launched:
    """One process the benchmark started."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Tell whether it is still running."""
        return self.popen.poll() is None

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM it (SIGKILL after ``grace`` seconds) and return its exit code."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        code = stop_pid(self.pid, grace)
        if code is not None:
            self.popen.returncode = code  # stop_pid reaped it; tell Popen
        return code

    def log_tail(self, lines: int = 5) -> str:
        """Return the last ``lines`` lines of its output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(log unreadable: {e})"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def spawn(name: str, argv: Sequence[str], log_path: Path) -> Launched:
    """Start ``argv`` from the repository root with this repository importable; output to ``log_path``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    return Launched(name, list(argv), log_path, popen)


def stop_all(launched: Sequence[Launched]) -> None:
    """Stop every process in ``launched``; try them all even if one fails, then raise the first error."""
    errors = []
    for process in launched:
        try:
            process.stop()
        except Exception as e:  # a stuck process must not keep the others running
            errors.append(e)
    if errors:
        raise errors[0]
