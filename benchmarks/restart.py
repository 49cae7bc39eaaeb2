"""Restart-to-consuming: how soon a killed worker's replacement is doing work again.

The rule: one replica of the primes stage consumes a steady trickle (about
2,000 records/s published over HTTP). It is SIGKILLed and reaped; once nsqd
has dropped its connections (so nothing it sent can still be counted), a
new replica is started at once, as supervisord would. The figure runs from
that process start to the first /stats read (every 10 ms) where the output
topics grew: the new replica has published its first batch, which it
FINishes as soon as nsqd answers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.records.codecs import encoder
from producers.numbers import number_records

from .broker import INPUT_TOPIC, BenchError, Broker
from .contenders import worker_argv, write_topology
from .drain import MEM_QUEUE_SIZE, SUBSCRIBE_TIMEOUT, check_alive, wait_subscribed
from .launch import Launched, spawn, stop_all

TRICKLE_RATE = 2000  # records/s
TRICKLE_TICK = 0.01  # seconds between HTTP /mpub calls
TRICKLE_START = 10**9  # numbers well away from the drain runs'
STEADY_FOR = 0.5  # seconds of consuming before the kill
POLL_INTERVAL = 0.01
RESTART_TIMEOUT = 60.0


@dataclass
class RestartSample:
    """One kill-and-restart of a worker."""

    seconds: float
    trickle_records: int

    def to_dict(self) -> dict:
        """The sample as JSON-ready numbers."""
        return {"seconds": round(self.seconds, 4), "trickle_records": self.trickle_records}


class Trickle(threading.Thread):
    """Publishes about ``rate`` records/s to the input topic until stopped or ``deadline`` (monotonic)."""

    def __init__(self, broker: Broker, rate: int, deadline: float):
        super().__init__(name="trickle", daemon=True)
        self.broker, self.rate, self.deadline = broker, rate, deadline
        self.stopped = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        """Publish one small HTTP /mpub every TRICKLE_TICK seconds, on schedule, until stopped."""
        encode = encoder("json")
        records = number_records(TRICKLE_START, 10**12, run_id="trickle")
        per_tick = max(1, round(self.rate * TRICKLE_TICK))
        tick = time.monotonic()
        try:
            while not self.stopped.is_set() and time.monotonic() < self.deadline:
                self.broker.http_mpub(INPUT_TOPIC, [encode(next(records)) for _ in range(per_tick)])
                self.sent += per_tick
                tick += TRICKLE_TICK
                self.stopped.wait(max(0.0, tick - time.monotonic()))
        except BaseException as e:  # reported by the measuring thread, which owns the outcome
            self.error = e

    def stop(self) -> None:
        """Stop publishing and wait for the thread to end."""
        self.stopped.set()
        if self.ident is not None:  # started
            self.join(timeout=10)


def restart_once(workdir: Path) -> RestartSample:
    """Measure one worker restart on a fresh nsqd under ``workdir``; stop everything after.

    Raises:
        BenchError: a process died, the trickle failed, or a deadline passed.
    """
    broker = Broker.start(workdir / "nsqd", mem_queue_size=MEM_QUEUE_SIZE)
    launched: list[Launched] = []
    trickle = Trickle(broker, TRICKLE_RATE, time.monotonic() + SUBSCRIBE_TIMEOUT + 2 * RESTART_TIMEOUT)
    try:
        broker.prepare()
        broker.release()
        topology = write_topology(workdir / "topology.yaml", broker, replicas=1)
        launched.append(spawn("primes-0", worker_argv(topology, 0), workdir / "primes-0.log"))
        wait_subscribed(broker, launched, time.monotonic() + SUBSCRIBE_TIMEOUT)
        trickle.start()
        _wait_consuming(broker, launched, trickle)
        seconds = _kill_and_restart(broker, launched, trickle, topology, workdir)
        return RestartSample(seconds, trickle.sent)
    finally:
        try:
            trickle.stop()
        finally:
            try:
                stop_all(launched)
            finally:
                broker.stop()


def _wait_consuming(broker: Broker, launched: list[Launched], trickle: Trickle) -> None:
    """Return once the worker has published outputs for STEADY_FOR seconds."""
    deadline = time.monotonic() + RESTART_TIMEOUT
    while broker.snapshot().output_total == 0:
        _check(launched, trickle, deadline, "the first worker never published an output")
        time.sleep(POLL_INTERVAL)
    time.sleep(STEADY_FOR)


def _kill_and_restart(broker: Broker, launched: list[Launched], trickle: Trickle, topology: Path,
                      workdir: Path) -> float:
    """SIGKILL the worker, start its replacement, and return seconds until the replacement publishes."""
    old = launched[0]
    old.popen.kill()
    old.popen.wait(timeout=10)
    deadline = time.monotonic() + RESTART_TIMEOUT
    while True:  # until nsqd has read everything the dead process sent
        snap = broker.snapshot(clients=True)
        if not snap.clients and not snap.producers:
            break
        if time.monotonic() > deadline:
            raise BenchError("nsqd still lists the killed worker's connections")
        time.sleep(POLL_INTERVAL)
    before = snap.output_total
    started = time.monotonic()
    launched.append(spawn("primes-0-restarted", worker_argv(topology, 0), workdir / "primes-0-restarted.log"))
    while broker.snapshot().output_total <= before:
        _check(launched[1:], trickle, started + RESTART_TIMEOUT, "the restarted worker never published")
        time.sleep(POLL_INTERVAL)
    return time.monotonic() - started


def _check(launched: list[Launched], trickle: Trickle, deadline: float, what: str) -> None:
    """Raise BenchError if a process exited, the trickle failed, or ``deadline`` passed."""
    check_alive(launched)
    if trickle.error is not None:
        raise BenchError(f"trickle publisher failed: {trickle.error}") from trickle.error
    if time.monotonic() > deadline:
        raise BenchError(f"{what} within {RESTART_TIMEOUT:g}s: {launched[-1].log_tail()}")
