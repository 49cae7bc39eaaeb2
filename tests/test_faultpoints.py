"""Worker fault points: present only when the chaos harness asks, deadly only when armed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.middleware import faultpoints
from pipeline.runtime.middleware.faultpoints import FaultPoints, from_environment

ROOT = Path(__file__).resolve().parent.parent

# A process that builds the middleware from its environment and fires after_receive 100 times.
FIRE = """
import sys
from pipeline.runtime.middleware.faultpoints import from_environment
stack = from_environment()
for _ in range(100):
    for m in stack:
        m.after_receive(None, None)
print("survived", len(stack))
"""


def _fire(tmp_path: Path, armed: dict | None) -> subprocess.CompletedProcess:
    path = tmp_path / "faultpoints.json"
    if armed is not None:
        path.write_text(json.dumps(armed))
    env = {"PATH": "/usr/bin:/bin", faultpoints.ENV: str(path)}
    return subprocess.run([sys.executable, "-c", FIRE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_absent_without_the_chaos_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faultpoints.ENV, raising=False)
    assert from_environment() == []
    monkeypatch.setenv(faultpoints.ENV, "/nonexistent/faultpoints.json")
    assert [type(m) for m in from_environment()] == [FaultPoints]


def test_disarmed_points_never_fire(tmp_path: Path) -> None:
    done = _fire(tmp_path, None)
    assert (done.returncode, done.stdout.strip()) == (0, "survived 1")
    done = _fire(tmp_path, {"after_publish": 1.0, "grace": 0})  # another point armed
    assert (done.returncode, done.stdout.strip()) == (0, "survived 1")


def test_an_armed_point_kills_the_process_and_says_where(tmp_path: Path) -> None:
    done = _fire(tmp_path, {"after_receive": 1.0, "grace": 0})
    assert done.returncode == -signal.SIGKILL
    events = [json.loads(line) for line in (tmp_path / "faultpoints.json.events").read_text().splitlines()]
    assert [e["event"] for e in events] == ["consuming", "fault_point"]
    assert events[1]["point"] == "after_receive"


def test_grace_keeps_a_fresh_worker_alive(tmp_path: Path) -> None:
    done = _fire(tmp_path, {"after_receive": 1.0, "grace": 600})
    assert (done.returncode, done.stdout.strip()) == (0, "survived 1")
