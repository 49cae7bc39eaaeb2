"""Drain time: how long a contender takes to empty a preloaded channel into its output topics.

The rule, the same for every contender:

1. a fresh nsqd gets the input channel created *paused*, and all N records
   are published and have reached the channel;
2. the contender's processes start; once every one is subscribed with RDY > 0,
   the channel is unpaused and the clock starts;
3. /stats is read every 50 ms; the clock stops at the first read where the
   output topics hold at least N messages and the channel has nothing left
   queued, in flight or deferred.

records/s = N / that time. CPU is the user + system time the contender's
processes (and, separately, nsqd) used between the two clock readings;
start-up CPU (imports, connecting) is recorded apart. Peak RSS is VmHWM.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .broker import BenchError, Broker, Snapshot
from .contenders import Contender
from .launch import Launched, spawn, stop_all
from .procstat import cpu_seconds, peak_rss_mb

POLL_INTERVAL = 0.05
SUBSCRIBE_TIMEOUT = 120.0  # the first worker ever started compiles the numba kernel
PRELOAD_RATE_FLOOR = 20_000  # records/s; below this the preload is considered stuck
MIN_RATE = {"textbook": 200, "nsq_to_nsq": 5_000, "primes": 5_000}  # records/s; slower is a failed run
DRAIN_TIMEOUT_BASE = 30.0
MEM_QUEUE_SIZE = 2_000_000


@dataclass
class DrainSample:
    """One drain of N records by one contender."""

    records: int
    seconds: float
    records_per_s: float
    outputs: int
    outputs_before_clock: int
    cpu_s: float
    cpu_s_per_million: float
    startup_cpu_s: float
    nsqd_cpu_s_per_million: float
    peak_rss_mb: float
    nsqd_peak_rss_mb: float

    def to_dict(self) -> dict:
        """The sample as JSON-ready numbers."""
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def drain_once(contender: Contender, bodies: Sequence[bytes], workdir: Path) -> DrainSample:
    """Measure ``contender`` draining ``bodies`` on a fresh nsqd under ``workdir``; stop everything after.

    Raises:
        BenchError: a process died, or something did not happen before its deadline.
    """
    broker = Broker.start(workdir / "nsqd", mem_queue_size=max(MEM_QUEUE_SIZE, 2 * len(bodies)))
    launched: list[Launched] = []
    try:
        broker.prepare()
        broker.preload(bodies, deadline=time.monotonic() + 30 + len(bodies) / PRELOAD_RATE_FLOOR)
        for i, argv in enumerate(contender.argvs(broker, workdir)):
            launched.append(spawn(f"{contender.name}-{i}", argv, workdir / f"{contender.name}-{i}.log"))
        wait_subscribed(broker, launched, time.monotonic() + SUBSCRIBE_TIMEOUT)
        return _timed_drain(contender, broker, launched, len(bodies))
    finally:
        try:
            stop_all(launched)
        finally:
            broker.stop()


def wait_subscribed(broker: Broker, launched: Sequence[Launched], deadline: float) -> None:
    """Return once every process in ``launched`` has a connection on the channel with RDY > 0.

    Raises:
        BenchError: a process exited, or ``deadline`` passed first.
    """
    while True:
        clients = broker.snapshot(clients=True).clients
        if len(clients) >= len(launched) and all(c.get("ready_count", 0) > 0 for c in clients):
            return
        check_alive(launched)
        if time.monotonic() > deadline:
            raise BenchError(f"{len(clients)} of {len(launched)} processes subscribed with RDY > 0 "
                             f"before the deadline; last output: {launched[-1].log_tail()}")
        time.sleep(0.02)


def check_alive(launched: Sequence[Launched]) -> None:
    """Raise BenchError, with its last output, if any process in ``launched`` has exited."""
    for process in launched:
        if not process.alive():
            raise BenchError(f"{process.name} exited with code {process.popen.returncode}: {process.log_tail()}")


def _timed_drain(contender: Contender, broker: Broker, launched: Sequence[Launched], count: int) -> DrainSample:
    """Release the channel, poll until drained, and read the processes' CPU and memory before they stop."""
    pids = [p.pid for p in launched]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    nsqd_before = cpu_seconds(broker.pid)
    early = broker.snapshot().output_total  # 0 unless the paused channel leaked
    started = time.monotonic()
    broker.release()
    snap = _poll_until_drained(contender, broker, launched, count, started)
    seconds = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    nsqd_cpu = cpu_seconds(broker.pid) - nsqd_before
    per_million = 1e6 / count
    return DrainSample(
        records=count, seconds=seconds, records_per_s=count / seconds,
        outputs=sum(snap.outputs[t] for t in contender.outputs), outputs_before_clock=early,
        cpu_s=cpu, cpu_s_per_million=cpu * per_million, startup_cpu_s=cpu_before,
        nsqd_cpu_s_per_million=nsqd_cpu * per_million,
        peak_rss_mb=max(peak_rss_mb(pid) for pid in pids), nsqd_peak_rss_mb=peak_rss_mb(broker.pid),
    )


def _poll_until_drained(contender: Contender, broker: Broker, launched: Sequence[Launched],
                        count: int, started: float) -> Snapshot:
    """Read /stats every POLL_INTERVAL until the outputs hold ``count`` and the channel is empty."""
    deadline = started + DRAIN_TIMEOUT_BASE + count / MIN_RATE[contender.kind]
    tick = started
    while True:
        tick += POLL_INTERVAL
        time.sleep(max(0.0, tick - time.monotonic()))
        snap = broker.snapshot()
        done = sum(snap.outputs[t] for t in contender.outputs)
        if done >= count and snap.channel_empty:
            return snap
        check_alive(launched)
        if time.monotonic() > deadline:
            raise BenchError(f"not drained after {deadline - started:.0f}s: {done} of {count} outputs, "
                             f"channel depth {snap.depth}, in flight {snap.in_flight}")
