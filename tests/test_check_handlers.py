"""`pipeline check` imports every stage's handler as its worker will: one located line per broken stage.

Each test writes a small project (a topology.yaml with a `mine` package beside
it) and runs `pipeline check` from another folder, as a user in CI would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsqhttp import wait_until
from pipeline.ops.processes import pid_alive

ROOT = Path(__file__).resolve().parent.parent

TOPOLOGY = """\
nsq:
  nsqd: [{name: n0, tcp: "127.0.0.1:4150", http: "127.0.0.1:4151"}]
topics:
  numbers: {codec: json}
  out: {codec: json}
stages:
  valuer:
    input: numbers
    handler: HANDLER
    channel: valuer
    outputs: [out]
PARAMS"""

GOOD = "def value(batch):\n    return {'out': batch.records}\n"

# A stage class that refuses params it does not know and keeps a file under the var dir.
STATEFUL = """\
from pipeline.stage import merge_params


class Valuer:
    def __init__(self, context):
        self.params = merge_params(context.params, {"factor": 1}, context.stage)
        (context.var_dir / "valuer").mkdir(parents=True)

    def __call__(self, batch):
        return {}
"""


def check(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "check", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


class Project:
    """A topology.yaml and a `mine` package beside it, and a folder elsewhere to run `pipeline check` from."""

    def __init__(self, tmp_path: Path, handler: str = "mine.valuer:value", params: str = "",
                 modules: dict[str, str] | None = None):
        self.dir, self.elsewhere = tmp_path / "project", tmp_path / "elsewhere"
        (self.dir / "mine").mkdir(parents=True)
        self.elsewhere.mkdir()
        (self.dir / "mine" / "__init__.py").write_text("")
        for name, text in (modules or {"valuer": GOOD}).items():
            (self.dir / "mine" / f"{name}.py").write_text(text)
        self.text = TOPOLOGY.replace("HANDLER", handler).replace("PARAMS", f"    params: {params}\n" if params else "")
        (self.dir / "topology.yaml").write_text(self.text)
        self.shown = os.path.join("..", "project", "topology.yaml")  # as the user typed it

    def module(self, name: str = "valuer") -> Path:
        return self.dir / "mine" / f"{name}.py"

    def where(self, field: str) -> str:
        """``FILE:LINE:COL`` of the value of ``field:`` in the topology."""
        lines = self.text.splitlines()
        line = next(i for i, text in enumerate(lines) if text.strip().startswith(f"{field}:"))
        col = lines[line].index(f"{field}:") + len(field) + 2
        return f"{self.shown}:{line + 1}:{col + 1}"

    def check(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return check("-t", self.shown, *args, cwd=self.elsewhere, env=env)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    return lines[0]


@pytest.mark.parametrize("handler, params, module, field, reason", [
    pytest.param("nosuch.valuer:value", "", GOOD, "handler",
                 "cannot import 'nosuch.valuer': No module named 'nosuch' "
                 "(not in the topology's folder, on PYTHONPATH or among the installed packages)", id="no-module"),
    pytest.param("mine.valuer:valu", "", GOOD, "handler",
                 "module 'mine.valuer' ({file}) has no attribute 'valu'; did you mean 'value'?", id="no-attribute"),
    pytest.param("mine.valuer:value", "", "def value(batch)\n    return {}\n", "handler",
                 "cannot import 'mine.valuer': {file}:1: SyntaxError: expected ':'", id="syntax-error"),
    # The line is the user's, not the json module's that raised.
    pytest.param("mine.valuer:value", "", "import json\n\nSETTINGS = json.loads('{')\n" + GOOD, "handler",
                 "cannot import 'mine.valuer': {file}:3: json.decoder.JSONDecodeError: "
                 "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)", id="raises-at-import"),
    pytest.param("mine.valuer:value", "", "def _setting(name):\n    raise RuntimeError(f'{name} is not set')\n\n\n"
                 "URL = _setting('VALUER_URL')\n", "handler",
                 "cannot import 'mine.valuer': {file}:2: RuntimeError: VALUER_URL is not set", id="raises-deeper"),
    pytest.param("mine.valuer:Valuer", "{fator: 2}", STATEFUL, "params",
                 "'mine.valuer:Valuer' refused its params: {file}:6: ValueError: unknown param(s) 'fator'; "
                 "valuer takes factor", id="bad-param"),
    pytest.param("mine.valuer:value", "", "value = 5\n", "handler",
                 "'mine.valuer:value' is not callable (its type is int)", id="not-callable"),
])
def test_a_broken_handler_is_one_line_at_its_field_and_exit_1(tmp_path, handler, params, module, field, reason):
    project = Project(tmp_path, handler, params, {"valuer": module})
    result = project.check()
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    expected = f"{project.where(field)}: stages.valuer.{field}: {reason.format(file=project.module())}"
    assert one_line(result.stderr) == expected


def test_each_broken_stage_gets_its_own_line_in_file_order(tmp_path):
    project = Project(tmp_path, "mine.valuer:value", modules={"valuer": "raise ImportError('no GPU')\n"})
    text = project.text + "  second:\n    handler: mine.nosuch:value\n    input: numbers\n    channel: second\n" \
                          "    outputs: [out]\n  third:\n    handler: mine.valuer:value\n    input: out\n" \
                          "    channel: third\n    outputs: []\n"
    (project.dir / "topology.yaml").write_text(text)
    result = project.check()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == ["stages.valuer.handler", "stages.second.handler",
                                                     "stages.third.handler"]
    assert lines[0].startswith(f"{project.shown}:9:14: ")
    assert lines[0].endswith(f"{project.module()}:1: ImportError: no GPU")
    assert lines[1].startswith(f"{project.shown}:13:14: ") and "No module named 'mine.nosuch'" in lines[1]


def test_a_good_project_is_ok_from_another_folder_and_its_var_dir_is_not_touched(tmp_path):
    project = Project(tmp_path, "mine.valuer:Valuer", "{factor: 3}", {"valuer": STATEFUL})
    result = project.check()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{project.shown}: ok\n"
    # The class was built (with a scratch var dir): a running pipeline's files are never touched.
    assert not (project.dir / "var").exists()


def test_the_repositorys_topology_is_ok():
    result = check(cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "topology.yaml: ok\n"


def test_handlers_import_from_the_topologys_folder_and_pythonpath_not_the_callers(tmp_path):
    # Given `mine` only in the folder check runs from: a worker (run in the topology's folder) would not find it
    project = Project(tmp_path)
    (project.dir / "mine").rename(project.elsewhere / "mine")
    result = project.check()
    assert result.returncode == 1
    assert "cannot import 'mine.valuer': No module named 'mine'" in one_line(result.stderr)
    # When PYTHONPATH names that folder, a worker finds it, and so does the check
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project.elsewhere), os.environ.get("PYTHONPATH", "")])}
    result = project.check(env=env)
    assert result.returncode == 0, result.stderr


def test_no_import_validates_the_file_only(tmp_path):
    project = Project(tmp_path, "nosuch.valuer:value")
    result = project.check("--no-import")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{project.shown}: ok\n"


def test_schema_errors_come_first_and_nothing_is_imported(tmp_path):
    project = Project(tmp_path, modules={"valuer": "open('imported', 'w').close()\n" + GOOD})
    (project.dir / "topology.yaml").write_text(project.text.replace("outputs: [out]", "outputs: [nowhere]"))
    result = project.check()
    assert result.returncode == 1
    assert "stages.valuer.outputs" in one_line(result.stderr)
    assert not (project.dir / "imported").exists()


def test_an_import_that_hangs_is_one_line_and_leaves_no_process_behind(tmp_path):
    # Given a handler whose import starts a process, records both pids, and never returns
    hang = ("import os, subprocess, sys, threading\n"
            "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "with open('pids.tmp', 'w') as f:\n    f.write(f'{os.getpid()} {helper.pid}')\n"
            "os.replace('pids.tmp', 'pids')\nthreading.Event().wait()\n")
    project = Project(tmp_path, modules={"valuer": hang})
    pids: list[int] = []
    try:
        result = project.check("--timeout", "3")
        pids = [int(pid) for pid in (project.dir / "pids").read_text().split()]
        assert result.returncode == 1
        assert one_line(result.stderr) == (f"{project.where('handler')}: stages.valuer.handler: "
                                           "importing 'mine.valuer' did not finish within 3 s")
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10, message="the check left processes behind")
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_an_import_that_ends_the_process_is_one_line(tmp_path):
    project = Project(tmp_path, modules={"valuer": "import os\nos._exit(3)\n"})
    result = project.check()
    assert result.returncode == 1
    assert one_line(result.stderr) == (f"{project.where('handler')}: stages.valuer.handler: "
                                       "importing 'mine.valuer' ended the check's process (exit code 3)")
