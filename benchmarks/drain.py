"""Drain time: how long a contender takes to empty a preloaded channel into its output topics.

The rule, the same for every contender:

1. a fresh nsqd gets the input channel created *paused*, and all N records
   are published and have reached the channel;
2. the contender's processes start; once every one is subscribed with RDY > 0,
   the channel is unpaused and the clock starts;
3. /stats is read every 50 ms; the clock stops at the first read where the
   output topics hold at least N messages and the channel has nothing left
   queued, in flight or deferred.

A packed contender (``batched``) carries M = N / pack envelopes, and its output
message counts no longer match N, so its clock stops at the first read where
its consumers have FINished M messages and the channel has nothing left
queued, in flight or deferred. The worker FINs an envelope only once nsqd has
acknowledged its outputs, so by then every record's output is published.
(The channel's own ``message_count`` cannot serve: nsqd counts messages put
*into* the channel, so it is M from the preload on.) After the clock
stopped, the outputs are read back and checked record by record
(:mod:`benchmarks.verify`).

records/s = N / that time. CPU is the user + system time the contender's
processes (and, separately, nsqd; and both together) used between the two
clock readings; start-up CPU (imports, connecting) is recorded apart. Peak
RSS is VmHWM.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .broker import BenchError, Broker, Snapshot
from .contenders import Contender
from .launch import Launched, spawn, stop_all
from .procstat import cpu_seconds, machine_cpu_times, peak_rss_mb, steal_percent
from .verify import verify_outputs

POLL_INTERVAL = 0.05
SUBSCRIBE_TIMEOUT = 120.0  # the first worker ever started compiles the numba kernel
PRELOAD_RATE_FLOOR = 20_000  # records/s; below this the preload is considered stuck
#: records/s; slower is a failed run
MIN_RATE = {"textbook": 200, "nsq_to_nsq": 5_000, "primes": 5_000, "batched": 20_000}
DRAIN_TIMEOUT_BASE = 30.0
MEM_QUEUE_SIZE = 2_000_000


@dataclass
class DrainSample:
    """One drain of N records (in ``messages`` input messages) by one contender.

    ``outputs`` counts output messages; ``output_records`` the records in them (the same number
    unless packed, where it is what :mod:`benchmarks.verify` read back after the clock stopped).
    """

    records: int
    messages: int
    seconds: float
    records_per_s: float
    outputs: int
    output_records: int
    outputs_before_clock: int
    cpu_s: float
    cpu_s_per_million: float
    startup_cpu_s: float
    nsqd_cpu_s_per_million: float
    all_cpu_s_per_million: float  # the contender's processes and nsqd together
    peak_rss_mb: float
    nsqd_peak_rss_mb: float
    host_steal_pct: float | None = None  # the hypervisor's share of the machine's CPU during the drain

    def to_dict(self) -> dict:
        """The sample as JSON-ready numbers."""
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def drain_once(contender: Contender, bodies: Sequence[bytes], workdir: Path, records: int | None = None) -> DrainSample:
    """Measure ``contender`` draining ``bodies`` on a fresh nsqd under ``workdir``; stop everything after.

    ``records`` is how many records ``bodies`` hold: by default one per body, or (packed) read from them.

    Raises:
        BenchError: a process died, or something did not happen before its deadline.
    """
    if records is None:
        records = len(bodies) if contender.pack == 1 else records_in(bodies)
    brokers: list[Broker] = []
    launched: list[Launched] = []
    try:
        for k in range(contender.replication):  # a replicated contender: one nsqd per copy
            brokers.append(Broker.start(workdir / ("nsqd" if k == 0 else f"nsqd{k}"),
                                        mem_queue_size=max(MEM_QUEUE_SIZE, 2 * len(bodies)),
                                        durability=contender.durability, inputs=contender.inputs))
        parts = contender.parts(bodies)
        for broker in brokers:  # every node holds every input message, as a replicated producer leaves them
            broker.prepare(verify=contender.pack > 1)
            broker.preload_parts(parts, deadline=time.monotonic() + 30 + len(bodies) / PRELOAD_RATE_FLOOR)
        for i, argv in enumerate(contender.argvs(brokers, workdir)):
            launched.append(spawn(f"{contender.name}-{i}", argv, workdir / f"{contender.name}-{i}.log"))
        for broker in brokers:
            wait_subscribed(broker, launched, time.monotonic() + SUBSCRIBE_TIMEOUT)
        wait_kernels(launched, time.monotonic() + SUBSCRIBE_TIMEOUT)
        sample, snap = _timed_drain(contender, brokers, launched, records, len(bodies))
        if contender.pack > 1:  # outside the clock
            sample.output_records = verify_outputs(brokers[0], snap.outputs, records)
        return sample
    finally:
        try:
            stop_all(launched)
        finally:
            for broker in brokers:
                broker.stop()


def records_in(bodies: Sequence[bytes]) -> int:
    """Records in a list of msgpack envelopes (read from each one's ``n`` or ``records``)."""
    from pipeline.records import envelope

    total = 0
    for body in bodies:
        decoded = envelope.unpackb(body)
        total += decoded["n"] if "n" in decoded else len(envelope.unpack(decoded, body))
    return total


def wait_subscribed(broker: Broker, launched: Sequence[Launched], deadline: float) -> None:
    """Return once every process in ``launched`` has a connection on the channel with RDY > 0.

    Raises:
        BenchError: a process exited, or ``deadline`` passed first.
    """
    def missing() -> str | None:
        clients = broker.snapshot(clients=True).clients
        if len(clients) >= len(launched) and all(c.get("ready_count", 0) > 0 for c in clients):
            return None
        return f"{len(clients)} of {len(launched)} processes subscribed with RDY > 0 before the deadline"

    wait_ready(missing, launched, deadline, interval=0.02)


#: What a worker logs once its compiled kernels are loaded (pipeline.records.jit); until then their plain-Python twins run.
KERNELS_READY = "compiled kernels ready after"


def wait_kernels(launched: Sequence[Launched], deadline: float) -> None:
    """Return once every pipeline worker in ``launched`` logged that its compiled kernels are loaded.

    A worker subscribes first and loads numba's kernels in the background (a restarted replica consumes
    sooner); a throughput figure is of the steady state, so its clock starts after that.

    Raises:
        BenchError: a process exited, or ``deadline`` passed first.
    """
    workers = [p for p in launched if "pipeline.cli" in p.argv and "worker" in p.argv]

    def missing() -> str | None:
        loading = [p.name for p in workers if KERNELS_READY not in p.log_path.read_text(errors="replace")]
        return f"{', '.join(loading)} did not load their compiled kernels before the deadline" if loading else None

    wait_ready(missing, launched, deadline, interval=0.05)


def wait_ready(missing: Callable[[], str | None], launched: Sequence[Launched], deadline: float,
               interval: float) -> None:
    """Poll ``missing()`` until it returns None (ready); fail when a process exits or ``deadline`` passes.

    Raises:
        BenchError: a process exited, or the deadline passed; with what was still missing.
    """
    while (problem := missing()) is not None:
        check_alive(launched)
        if time.monotonic() > deadline:
            raise BenchError(f"{problem}; last output: {launched[-1].log_tail()}")
        time.sleep(interval)


def check_alive(launched: Sequence[Launched]) -> None:
    """Raise BenchError, with its last output, if any process in ``launched`` has exited."""
    for process in launched:
        if not process.alive():
            raise BenchError(f"{process.name} exited with code {process.popen.returncode}: {process.log_tail()}")


def _timed_drain(contender: Contender, brokers: Sequence[Broker], launched: Sequence[Launched], count: int,
                 messages: int) -> tuple[DrainSample, Snapshot]:
    """Release the channels, poll until drained, and read the processes' CPU and memory before they stop.

    Returns the sample and the /stats read (the first node's) that stopped the clock.
    """
    pids = [p.pid for p in launched]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    nsqd_before = sum(cpu_seconds(broker.pid) for broker in brokers)
    machine_before = machine_cpu_times()
    early = sum(broker.snapshot().output_total for broker in brokers)  # 0 unless the paused channel leaked
    started = time.monotonic()
    for broker in brokers:
        broker.release()
    snap = _poll_until_drained(contender, brokers, launched, count, messages, started)
    seconds = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    nsqd_cpu = sum(cpu_seconds(broker.pid) for broker in brokers) - nsqd_before
    per_million = 1e6 / count
    outputs = sum(snap.outputs[t] for t in contender.outputs) // contender.replication
    sample = DrainSample(
        records=count, messages=messages, seconds=seconds, records_per_s=count / seconds,
        outputs=outputs, output_records=outputs, outputs_before_clock=early,
        cpu_s=cpu, cpu_s_per_million=cpu * per_million, startup_cpu_s=cpu_before,
        nsqd_cpu_s_per_million=nsqd_cpu * per_million, all_cpu_s_per_million=(cpu + nsqd_cpu) * per_million,
        peak_rss_mb=max(peak_rss_mb(pid) for pid in pids),
        nsqd_peak_rss_mb=max(peak_rss_mb(broker.pid) for broker in brokers),
        host_steal_pct=steal_percent(machine_before, machine_cpu_times()),
    )
    return sample, snap


def _poll_until_drained(contender: Contender, brokers: Sequence[Broker], launched: Sequence[Launched],
                        count: int, messages: int, started: float) -> Snapshot:
    """Read /stats every POLL_INTERVAL until drained and the channels are empty.

    Drained: the outputs hold ``count`` messages (replicated: a copy of each on every node, their sum
    over the nodes ``replication`` times as many); packed, the consumers FINished all ``messages``.
    Returns the first node's snapshot with the outputs summed over the nodes.
    """
    deadline = started + DRAIN_TIMEOUT_BASE + count / MIN_RATE[contender.kind]
    packed = contender.pack > 1
    goal, what = (messages, "input messages FINished") if packed else (count * contender.replication, "outputs")
    tick = started
    while True:
        tick += POLL_INTERVAL
        time.sleep(max(0.0, tick - time.monotonic()))
        snaps = [broker.snapshot(clients=packed) for broker in brokers]
        snap = snaps[0]
        for other in snaps[1:]:
            snap.outputs = {t: n + other.outputs.get(t, 0) for t, n in snap.outputs.items()}
        done = snap.finished if packed else sum(snap.outputs[t] for t in contender.outputs)
        if done >= goal and all(s.channel_empty for s in snaps):
            return snap
        check_alive(launched)
        if time.monotonic() > deadline:
            raise BenchError(f"not drained after {deadline - started:.0f}s: {done} of {goal} {what}, "
                             f"channel depth {snap.depth}, in flight {snap.in_flight}")
