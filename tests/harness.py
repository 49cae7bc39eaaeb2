"""Helpers for tests that run stage workers against a real nsqd.

Each test gets its own topology file with fresh topic names, workers as real
subprocesses (so they can be SIGKILLed and SIGTERMed), and a collector that
reads the output topics through its own channel.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nsqhttp import channel_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.records.codecs import decode
from pipeline.records.envelope import records_of
from pipeline.client.nsqclient import NsqSubscriber
from pipeline.ops.processes import stop_pid

ROOT = Path(__file__).resolve().parent.parent
CHECK_CHANNEL = "check"


@dataclass
class Names:
    """The topic names of one test's primes pipeline."""

    input: str
    prime: str
    non_prime: str

    @property
    def dead(self) -> str:
        return f"{self.input}.dead"

    @property
    def outputs(self) -> list[str]:
        return [self.prime, self.non_prime, self.dead]


def write_topology(tmp_path: Path, nsqd, topic: str, *, lookupd=None, handler="consumers.primes:classify",
                   replicas: int = 2, packs: dict[str, int] | None = None, **stage) -> tuple[Path, Names]:
    """Write a primes topology over the test's nsqd (and lookupd) with fresh topics; return (path, names)."""
    names = Names(topic, f"{topic}_prime", f"{topic}_non_prime")
    nsq = {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")}
    if lookupd is not None:
        nsq["lookupd"] = [{"tcp": lookupd.tcp, "http": lookupd.http}]
    spec = {"handler": handler, "input": names.input, "channel": "primes",
            "outputs": {"prime": names.prime, "non_prime": names.non_prime}, "replicas": replicas, **stage}
    doc = {"nsq": nsq,
           "topics": {names.input: {"codec": "json"}, names.prime: {"codec": "json"},
                      names.non_prime: {"codec": "msgpack"}},
           "stages": {"primes": spec},
           "producers": {"numbers": {"topic": names.input}}}
    for name, pack in (packs or {}).items():  # keys: input, prime, non_prime
        doc["topics"][getattr(names, name)]["pack"] = pack
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    for out in names.outputs:  # a channel per output before anything is published: nothing is missed
        nsqd_http.create_channel(nsqd.http, out, CHECK_CHANNEL)
    return path, names


@dataclass
class Workers:
    """Stage replicas running as subprocesses of the test."""

    topology: Path
    stage: str = "primes"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, replica: int) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        log = open(self.topology.parent / f"worker-{replica}-{len(self.procs)}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", self.stage,
                                 "--replica", str(replica), "-t", str(self.topology)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def wait_subscribed(self, http: str, topic: str, count: int, timeout: float = 60.0) -> None:
        def subscribed() -> bool:
            for p in self.procs:
                assert p.poll() is None or p.returncode == 0, f"worker exited {p.returncode}: {self.log_tail()}"
            stats = channel_stats(http, topic, "primes")
            return bool(stats) and len(stats.get("clients") or []) >= count
        wait_until(subscribed, timeout, message=f"{count} workers never subscribed to {topic}")

    def log_tail(self) -> str:
        logs = sorted(self.topology.parent.glob("worker-*.log"))
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.returncode = stop_pid(p.pid, grace=15)  # stop_pid reaped it; tell Popen


def collect(tcp: str, topics: list[str], done, timeout: float) -> dict[str, list[dict]]:
    """Read ``topics`` on the check channel until ``done(collected)`` holds; fail after ``timeout`` s."""
    collected: dict[str, list[dict]] = defaultdict(list)
    subs = [NsqSubscriber(tcp, t, CHECK_CHANNEL) for t in topics]
    deadline = time.monotonic() + timeout
    try:
        while not done(collected):
            if time.monotonic() > deadline:
                counts = {t: len(v) for t, v in collected.items()}
                raise AssertionError(f"outputs incomplete after {timeout:g}s: {counts}")
            for topic, sub in zip(topics, subs):
                for message in sub.messages(timeout=0.05):
                    collected[topic].extend(records_of([decode(message.body)]))
    finally:
        for sub in subs:
            sub.close()
    return collected


def ids_seen(collected: dict[str, list[dict]], topics: list[str]) -> list[str]:
    """Every id on ``topics``, duplicates included."""
    return [r["id"] for t in topics for r in collected.get(t, [])]


def sigterm(proc: subprocess.Popen) -> None:
    """Send SIGTERM to a worker subprocess."""
    os.kill(proc.pid, signal.SIGTERM)
