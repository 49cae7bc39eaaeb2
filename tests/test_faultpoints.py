"""Worker fault points: present only when the chaos harness asks, deadly only when armed."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_topology
from pipeline.runtime.middleware import faultpoints
from pipeline.runtime.middleware.faultpoints import FaultPoints, from_environment
from pipeline.runtime.worker import Worker

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
    assert [e["event"] for e in events] == ["fault_point"]
    assert events[0]["point"] == "after_receive"


def test_grace_keeps_a_fresh_worker_alive(tmp_path: Path) -> None:
    done = _fire(tmp_path, {"after_receive": 1.0, "grace": 600})
    assert (done.returncode, done.stdout.strip()) == (0, "survived 1")


def test_a_worker_notes_its_first_subscription_to_each_nsqd(nsq_factory, tmp_path: Path, topic: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Given fault points enabled (disarmed) and a stage reading three nsqd, the third SIGSTOPped
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    monkeypatch.setenv(faultpoints.ENV, str(tmp_path / "faultpoints.json"))
    events_path = tmp_path / "faultpoints.json.events"
    os.kill(nodes[2].pid, signal.SIGSTOP)

    def subscribed() -> list[dict]:
        lines = events_path.read_text().splitlines() if events_path.exists() else []
        return [e for e in map(json.loads, lines) if e["event"] == "subscribed"]

    async def run() -> tuple[list[dict], list[dict]]:
        worker = Worker(_topology(tmp_path, nodes, topic), "primes")
        try:
            await worker.start()
            await _until(lambda: len(subscribed()) == 2)
            while_stopped = subscribed()
            os.kill(nodes[2].pid, signal.SIGCONT)
            await _until(lambda: len(subscribed()) == 3)
            return while_stopped, subscribed()
        finally:
            os.kill(nodes[2].pid, signal.SIGCONT)
            await worker.drain()

    # When the worker starts, Then it notes the two nodes that answer, and the third once it resumes
    while_stopped, events = asyncio.run(run())
    assert {e["node"] for e in while_stopped} == {nodes[0].tcp, nodes[1].tcp}
    assert events[2]["node"] == nodes[2].tcp and events[2]["t"] > while_stopped[1]["t"]
    assert {e["pid"] for e in events} == {os.getpid()}


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _topology(tmp_path: Path, nodes, topic: str):
    doc = {"nsq": {"nsqd": [{"name": f"n{i}", "tcp": n.tcp, "http": n.http} for i, n in enumerate(nodes)],
                   "var_dir": str(tmp_path / "var")},
           "topics": {topic: {}, f"{topic}_prime": {}, f"{topic}_non_prime": {}},
           "stages": {"primes": {"handler": "consumers.primes:classify", "input": topic, "channel": "primes",
                                 "outputs": {"prime": f"{topic}_prime", "non_prime": f"{topic}_non_prime"},
                                 "replicas": 1}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_topology(path)
