"""Ctrl-C during a chaos run: rollbacks heal every fault and no process, proxy or toxic of ours is left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nsqhttp import wait_until
from pipeline.ops.processes import pid_alive

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

# Every kind of lasting fault at once, held far longer than the test waits.
SCENARIO = """\
title: interrupted
pipeline: {replicas: 2, msg_timeout: 3}
workload: {records: 100000, rate: 300}
steady_state:
  - {probe: workers_running, tolerance: {min: 2}}
method:
  duration: 600
  faults:
    - {fault: kill_worker, signal: STOP, probability: 1, duration: 600}
    - {fault: toxic, toxic: latency, attributes: {latency: 100}, probability: 1, duration: 600}
    - {fault: fault_point, point: after_publish, chance: 0.001, probability: 1}
    - {fault: nsqd_stop, start: 0.5, probability: 1, duration: 600}
expect: {lost: {max: 0}}
"""


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_ctrl_c_runs_the_rollbacks_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Given a run in the middle of its method, with a worker and nsqd stopped, a toxic and a fault point armed
    scenario = tmp_path / "interrupted.yaml"
    scenario.write_text(SCENARIO)
    folder = tmp_path / "run"
    log = open(tmp_path / "chaos.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "chaos", "run", str(scenario), "--seed", "3",
                             "--folder", str(folder)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=_interruptible)
    try:
        wait_until(lambda: len(_fault_log(folder)) >= 4 or proc.poll() is not None, 120,
                   message="the method never started its faults")
        assert proc.poll() is None, (tmp_path / "chaos.log").read_text()
        pids = json.loads((folder / "pids.json").read_text())
        assert {"toxiproxy", "supervisord", "nsqd-n0:nsqd-n0", "primes:primes-0"} <= pids.keys()
        # When Ctrl-C reaches the harness
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # A harness that ignores Ctrl-C: SIGABRT makes the fault handler write every thread's stack to its log
            os.kill(proc.pid, signal.SIGABRT)
            proc.wait(timeout=30)
            _kill_listed(folder)  # what it started would outlive it (each in a session of its own)
            pytest.fail("the harness did not end within 120 s of Ctrl-C; its log and threads:\n"
                        + (tmp_path / "chaos.log").read_text()[-20000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "chaos.log").read_text()
    # Then it reports the interruption and exits 130, having stopped every process it started
    assert code == 130, output
    assert "pipeline: aborted" in output
    pids = json.loads((folder / "pids.json").read_text())
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert _processes_mentioning(str(folder)) == []
    assert not (folder / "faultpoints.json").exists()  # the fault point was disarmed
    healed = [text for _, text in _fault_log(folder) if text.startswith("healed")]
    assert sorted(healed) == ["healed fault_point", "healed kill_worker", "healed nsqd_stop", "healed toxic"]


def _interruptible() -> None:
    """Give the harness Ctrl-C as a terminal's foreground command gets it.

    A shell without job control starts background commands with SIGINT ignored (`make test &`,
    `nohup`, some CI runners), and their children inherit that; Python then installs no
    KeyboardInterrupt handler, and the harness would never see this test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_listed(folder: Path) -> None:
    """SIGKILL every process the harness listed in pids.json that is still alive."""
    try:
        pids = json.loads((folder / "pids.json").read_text())
    except (OSError, ValueError):
        return
    for pid in pids.values():
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _fault_log(folder: Path) -> list[tuple[float, str]]:
    """The monkey's fault log so far (it appends a JSON line per injection and heal)."""
    try:
        return [tuple(json.loads(line)) for line in (folder / "faults.jsonl").read_text().splitlines()]
    except OSError:
        return []
