"""Tick -> feature and tick -> signal latency of the keyed market pipeline under a steady tick rate.

The rule:

1. a fresh nsqd gets a ``bench`` channel on ``signals`` and on the first
   :data:`FEATURE_PROBE` partitions of ``features`` (``features.0``: a quarter
   of the feature records is plenty for the tick->feature figure, and reading
   every partition would load the machine under test with the probe's own
   work), and a reader process subscribes to them;
2. the 8 keyed workers start (``features`` and ``signals``, replicas 0..3);
   the run waits until every partition channel has its one client;
3. a thread publishes N synthetic ticks (16 symbols) with
   ``produce_ticks(rate=R)``; each tick's ``ts`` is stamped when the pacer
   releases it into the producer (see :func:`stamped`);
4. the reader (a separate process, so reading adds no latency to the bench's
   producer thread or the other way round; one event loop for all its
   subscriptions, each asking nsqd for no output buffering) notes
   ``time.time_ns()`` as each read arrives; after the run it decodes the
   messages: latency = arrival - ts, per feature record and per signal record
   (a signal carries its tick's ts).

Figures: p50 / p99 / p99.9 of both latencies in ms, the achieved input rate,
the pipeline backlog (messages queued or in flight on the workers' channels)
when the last tick was published, how long the outputs took to complete after
that, and each worker's peak RSS. Kept up = every topic and channel of the
pipeline was empty within :data:`KEPT_UP_S` of the last tick's publication.

``python -m benchmarks.ticks read ...`` is the reader process.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import yaml

from pipeline.records.partition import Router
from pipeline.ops.processes import start_nsqd
from pipeline.config import Topology, load_topology
from producers.ticks import LINGER_MS, synthetic_ticks

from .broker import BenchError, Broker
from .drain import SUBSCRIBE_TIMEOUT, check_alive, wait_kernels, wait_ready
from .launch import Launched, spawn, stop_all
from .procstat import cpu_seconds, machine_cpu_times, peak_rss_mb, steal_percent

PARTITIONS = 4
SYMBOLS = 16
TICK_RATE = 20_000  # ticks/s, the figure
TICK_SECONDS = 10  # at scale 1
BASE_COUNT = TICK_RATE * TICK_SECONDS
MAX_IN_FLIGHT = 500
# A latency-minded configuration: a batch is what one read from nsqd brought (wait_ms 0), and nsqd writes
# each message to a worker at once (output_buffer_size -1) instead of holding it up to the buffer timeout.
BATCH = {"size": 256, "wait_ms": 0}  # wait_ms: --ticks-wait-ms
OUTPUT_BUFFER_SIZE = -1  # no buffering; nsqd's default 16384 (with the 1 ms timeout) is the other choice to compare
#: Records per message on ticks and features (1: one each; above 1, envelopes of up to that many of what
#: the producer or a batch has at hand: nothing waits for an envelope to fill).
PACK = 64
OUTPUT_BUFFER_TIMEOUT = 1  # ms; this nsqd allows down to 1 (--min-output-buffer-timeout, 25 ms by default)
#: The keyed stages' checkpoint_interval_ms (--ticks-checkpoint-ms). Outputs are published before their
#: checkpoint whatever it is, so it bounds how much input a crash replays, not the latency; the stage's
#: default (50) costs the 8 replicas 160 fdatasyncs a second, CPU (~4 us per tick) the pipeline then lacks.
CHECKPOINT_INTERVAL_MS = 250
#: The feature partitions the probe reads (the first ones); tick->feature is measured on their ticks only.
FEATURE_PROBE = 1
READ_CHANNEL = "bench"
MIN_BUFFER_TIMEOUT = "1ms"  # nsqd lets a client ask for this (its own floor is 25 ms)
STAGES = (("features", "ticks", "consumers.features:Features", "features"),
          ("signals", "features", "consumers.signals:Signals", "signals"))
KEPT_UP_S = 1.0
FIN_INTERVAL_S = 0.05  # the reader finishes what it read this often
#: nsqd's default: the pipeline holds a few dozen messages at a time. (The drains' 2,000,000 keeps their
#: preloads in memory; here it would only give nsqd's collector channel buffers of 16 MB each to scan.)
TICKS_MEM_QUEUE_SIZE = 10_000
#: Ticks published (at the same rate) and drained before the measured ones; not in the figures.
WARMUP = 2000
DRAIN_TIMEOUT = 120.0  # after the last tick: a pipeline that cannot keep up needs time to catch up
POLL_INTERVAL = 0.05
PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))


def write_topology(path: Path, broker: Broker, output_buffer_size: int = OUTPUT_BUFFER_SIZE,
                   output_buffer_timeout: int = OUTPUT_BUFFER_TIMEOUT, pack: int = PACK,
                   wait_ms: int = BATCH["wait_ms"], checkpoint_ms: int = CHECKPOINT_INTERVAL_MS) -> Topology:
    """Write and load ticks -> features -> signals, 4 partitions, against ``broker``."""
    keyed = {"codec": "msgpack", "partitions": PARTITIONS, "key": "symbol", **({"pack": pack} if pack > 1 else {})}
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": broker.tcp, "http": broker.process.http}],
                "var_dir": str(path.parent / "var")},
        "topics": {"ticks": dict(keyed), "features": {**keyed, "seq": "feature_seq"}, "signals": {"codec": "json"}},
        "stages": {name: {"handler": handler, "input": source, "channel": name, "outputs": [out], "keyed": True,
                          "replicas": PARTITIONS, "max_in_flight": MAX_IN_FLIGHT, "batch": {**BATCH, "wait_ms": wait_ms},
                          "output_buffer_size": output_buffer_size, "output_buffer_timeout": output_buffer_timeout,
                          "checkpoint_interval_ms": checkpoint_ms}
                   for name, source, handler, out in STAGES},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_topology(path)


def stamped(ticks: Iterable[dict]) -> Iterator[dict]:
    """Yield ``ticks``, re-stamping each one's ``ts`` when the producer asks for the next one.

    ``produce_ticks`` takes a tick from the iterator, then (when ahead of its rate) sleeps until
    the tick is due, then buffers it; it encodes buffered ticks only when it sends them (before
    its next pacing sleep). A tick created before that sleep would count the sleep as latency,
    so its ``ts`` is set again once the producer comes back for the next tick: the moment the
    pacer released it, as if created just in time. The producer's own buffering until the next
    send (a few ms at most at a steady rate) stays in the figure.
    """
    previous = None
    for tick in ticks:
        if previous is not None:
            previous["ts"] = time.time_ns()
        yield tick
        previous = tick
    if previous is not None:
        previous["ts"] = time.time_ns()


class Producer(threading.Thread):
    """Publishes ``ticks`` at ``rate`` with :func:`producers.ticks.produce_ticks`."""

    def __init__(self, broker: Broker, topology: Topology, ticks: Iterable[dict], rate: float,
                 linger_ms: float = LINGER_MS):
        super().__init__(name="ticks-producer", daemon=True)
        self.broker, self.topology, self.ticks, self.rate = broker, topology, ticks, rate
        self.linger_ms = linger_ms
        self.acked = 0
        self.started_at = self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        from producers.ticks import produce_ticks
        try:
            self.started_at = time.monotonic()
            self.acked = produce_ticks(self.broker.tcp, "ticks", self.ticks, spec=self.topology.topics["ticks"],
                                       rate=self.rate, linger_ms=self.linger_ms)
        except BaseException as e:  # reported by the measuring thread
            self.error = e
        finally:
            self.ended_at = time.monotonic()


def read_argv(broker: Broker, topics: list[str], out: Path) -> list[str]:
    """The reader process's command line."""
    return [sys.executable, "-m", "benchmarks.ticks", "read", "--tcp", broker.tcp, "--channel", READ_CHANNEL,
            "--topics", ",".join(topics), "--out", str(out)]


def worker_argv(topology: Topology, stage: str, replica: int) -> list[str]:
    """One replica of a keyed stage, as supervisord would start it."""
    return [sys.executable, "-m", "pipeline.cli", "worker", stage, "--replica", str(replica), "-t",
            str(topology.path)]


def channels(broker: Broker) -> dict[tuple[str, str], dict]:
    """Every channel in /stats by (topic, channel), with its clients, plus each topic's message_count."""
    doc = json.loads(broker._request("GET", "/stats", {"format": "json", "include_clients": "true"}))
    found = {}
    for topic in doc.get("topics") or []:
        found[topic["topic_name"], ""] = {"message_count": topic["message_count"], "depth": topic["depth"],
                                          "backend_depth": topic["backend_depth"]}
        for channel in topic.get("channels") or []:
            found[topic["topic_name"], channel["channel_name"]] = channel
    return found


def _pending(channel: dict | None) -> int:
    if not channel:
        return 0
    return channel["depth"] + channel["backend_depth"] + channel["in_flight_count"] + channel["deferred_count"]


def ticks_once(workdir: Path, count: int, rate: float = TICK_RATE,
               output_buffer_size: int = OUTPUT_BUFFER_SIZE, output_buffer_timeout: int = OUTPUT_BUFFER_TIMEOUT,
               pack: int = PACK, wait_ms: int = BATCH["wait_ms"], linger_ms: float = LINGER_MS,
               checkpoint_ms: int = CHECKPOINT_INTERVAL_MS) -> dict:
    """Measure the latencies for ``count`` ticks at ``rate`` on a fresh nsqd under ``workdir``; stop everything after.

    Raises:
        BenchError: a process died, the producer failed, or a deadline passed.
    """
    # The workers ask for their stage's output_buffer_size/timeout, the reader for no buffering at all;
    # the flags let a stage ask for a timeout down to 1 ms.
    broker = Broker(start_nsqd(workdir / "nsqd", extra=[f"--mem-queue-size={TICKS_MEM_QUEUE_SIZE}",
                                                        f"--output-buffer-timeout={MIN_BUFFER_TIMEOUT}",
                                                        f"--min-output-buffer-timeout={MIN_BUFFER_TIMEOUT}"]))
    launched: list[Launched] = []
    producers: list[Producer] = []
    try:
        topology = write_topology(workdir / "topology.yaml", broker, output_buffer_size, output_buffer_timeout, pack,
                                  wait_ms, checkpoint_ms)
        features, inputs = topology.physical_topics("features"), topology.physical_topics("ticks")
        outputs = [*features[:FEATURE_PROBE], "signals"]
        for topic in outputs:
            broker._post("/topic/create", topic=topic)
            broker._post("/channel/create", topic=topic, channel=READ_CHANNEL)
        reader_out = workdir / "latencies.npz"
        reader = spawn("reader", read_argv(broker, outputs, reader_out), workdir / "reader.log")
        launched.append(reader)
        workers = []
        for stage, *_ in STAGES:
            for k in range(PARTITIONS):
                workers.append(spawn(f"{stage}-{k}", worker_argv(topology, stage, k), workdir / f"{stage}-{k}.log"))
        launched += workers
        watched = ([(t, "features") for t in inputs] + [(t, "signals") for t in features]
                   + [(t, READ_CHANNEL) for t in outputs])
        _wait_clients(broker, launched, watched, time.monotonic() + SUBSCRIBE_TIMEOUT)
        wait_kernels(launched, time.monotonic() + SUBSCRIBE_TIMEOUT)

        ticks = _ticks(count)
        # Warm-up (not measured): the first batches pay for imports, JIT and connections.
        producer = _publish(broker, topology, stamped(islice(ticks, WARMUP)), WARMUP, rate, producers, linger_ms)
        _wait_outputs(broker, launched, inputs + outputs, watched, WARMUP, producer.ended_at)
        measured_from = time.time_ns()  # every measured tick is stamped after this
        cpu_before = {p.name: cpu_seconds(p.pid) for p in workers}
        others_before = {name: cpu_seconds(pid) for name, pid in
                         (("nsqd", broker.pid), ("reader", reader.pid), ("producer", os.getpid()))}
        machine_before = machine_cpu_times()
        producer = _publish(broker, topology, stamped(ticks), count, rate, producers, linger_ms)
        steal = steal_percent(machine_before, machine_cpu_times())
        published = producer.ended_at
        stats = channels(broker)
        backlog = sum(_pending(stats.get(key)) for key in watched[:2 * PARTITIONS])
        caught_up = _wait_outputs(broker, launched, inputs + outputs, watched, WARMUP + count, published)
        by_worker = {p.name: cpu_seconds(p.pid) - cpu_before[p.name] for p in workers}
        cpu = sum(by_worker.values())
        by_stage = {stage: sum(v for name, v in by_worker.items() if name.rpartition("-")[0] == stage)
                    for stage, *_ in STAGES}
        others = {name: round(cpu_seconds(pid) - others_before[name], 3) for name, pid in
                  (("nsqd", broker.pid), ("reader", reader.pid), ("producer", os.getpid()))}
        rss = {p.name: round(peak_rss_mb(p.pid), 1) for p in workers}
        reader.stop()
        if not reader_out.exists():
            raise BenchError(f"the reader wrote no latencies: {reader.log_tail()}")
        with np.load(reader_out) as got:
            feat_ms = got["features"][got["features_ts"] >= measured_from] / 1e6
            sig_ms = got["signals"][got["signals_ts"] >= measured_from] / 1e6
            duplicates = int(got["duplicates"])
        seconds = producer.ended_at - producer.started_at
        sample = {
            "ticks": count, "rate_target": rate, "published": producer.acked,
            "input_rate": producer.acked / seconds if seconds > 0 else 0.0, "publish_s": seconds,
            "features": int(feat_ms.size), "features_expected": _probed_ticks(topology, count),
            "signals": int(sig_ms.size), "duplicates": duplicates,
            **{f"feature_{name}_ms": _percentile(feat_ms, q) for name, q in PERCENTILES},
            **{f"signal_{name}_ms": _percentile(sig_ms, q) for name, q in PERCENTILES},
            "feature_max_ms": float(feat_ms.max()) if feat_ms.size else None,
            "backlog_at_end": backlog, "caught_up_s": caught_up, "kept_up": caught_up <= KEPT_UP_S,
            "cpu_s": cpu, "cpu_us_per_tick": {"workers": round(cpu * 1e6 / count, 1),
                                              **{k: round(v * 1e6 / count, 1) for k, v in by_stage.items()},
                                              **{k: round(v * 1e6 / count, 1) for k, v in others.items()}},
            "peak_rss_mb": max(rss.values()), "worker_peak_rss_mb": rss,
            "nsqd_peak_rss_mb": peak_rss_mb(broker.pid), "host_steal_pct": steal,
        }
        if sample["features"] < sample["features_expected"]:
            raise BenchError(f"the reader got {sample['features']} feature records of {sample['features_expected']}"
                             f" (the measured ticks of {', '.join(features[:FEATURE_PROBE])})")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in sample.items()}
    finally:
        try:
            for running in producers:
                running.join(10)  # a producer stuck on a dead nsqd ends when nsqd is stopped
        finally:
            try:
                stop_all(launched)
            finally:
                broker.stop()


def _probed_ticks(topology: Topology, count: int) -> int:
    """How many of the ``count`` measured ticks go to the partitions the probe reads (the same seeded ticks again)."""
    router = Router.for_spec("ticks", topology.topics["ticks"])
    probed = set(topology.physical_topics("ticks")[:FEATURE_PROBE])
    return sum(router.topic_of(tick) in probed for tick in islice(_ticks(count), WARMUP, None))


def _ticks(count: int) -> Iterator[dict]:
    """The warm-up and ``count`` measured ticks, the same every run (one seq per symbol)."""
    return synthetic_ticks(SYMBOLS, WARMUP + count, seed=1, run_id="bench")


def _publish(broker: Broker, topology: Topology, ticks: Iterable[dict], count: int, rate: float,
             started: list[Producer], linger_ms: float = LINGER_MS) -> Producer:
    """Publish ``count`` of ``ticks`` at ``rate`` in a thread; return the finished producer.

    Raises:
        BenchError: it failed, published fewer, or did not finish in time.
    """
    producer = Producer(broker, topology, ticks, rate, linger_ms)
    started.append(producer)
    producer.start()
    producer.join(30 + 3 * count / rate)
    if producer.is_alive():
        raise BenchError(f"the producer did not finish {count} ticks at {rate:g}/s in time")
    if producer.error is not None:
        raise BenchError(f"ticks producer failed: {producer.error}") from producer.error
    if producer.acked != count:
        raise BenchError(f"nsqd acknowledged {producer.acked} of {count} ticks")
    return producer


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def _wait_clients(broker: Broker, launched: list[Launched], watched: list[tuple[str, str]], deadline: float) -> None:
    """Return once every (topic, channel) in ``watched`` has exactly one client with RDY > 0."""
    def missing() -> str | None:
        stats = channels(broker)
        absent = [f"{t}/{c}" for t, c in watched
                  if not (len(clients := (stats.get((t, c)) or {}).get("clients") or []) == 1
                          and clients[0].get("ready_count", 0) > 0)]
        return f"no single subscribed client on {', '.join(absent)}" if absent else None

    wait_ready(missing, launched, deadline, interval=0.05)


def _wait_outputs(broker: Broker, launched: list[Launched], topics: list[str], watched: list[tuple[str, str]],
                  count: int, published: float) -> float:
    """Wait until every topic and channel of the pipeline is empty; return the seconds that took after ``published``.

    A keyed worker finishes its inputs only after its outputs were published, so once the
    ``ticks`` channels, the ``features`` channels and the bench's channels hold nothing queued,
    in flight or deferred (and the topics nothing not yet copied into their channels), every
    tick's feature and signal has reached the reader, whether messages carry one record or
    an envelope of several.
    """
    deadline = published + DRAIN_TIMEOUT + count / 2000
    while True:
        stats = channels(broker)
        empty = (all(_pending(stats.get(key)) == 0 for key in watched)
                 and all((stats.get((t, "")) or {}).get("depth", 0) + (stats.get((t, "")) or {}).get("backend_depth", 0)
                         == 0 for t in topics))
        if empty:
            return time.monotonic() - published
        check_alive(launched)
        if time.monotonic() > deadline:
            pending = {f"{t}/{c}": _pending(stats.get((t, c))) for t, c in watched}
            raise BenchError(f"the pipeline did not drain after the last tick: {pending}")
        time.sleep(POLL_INTERVAL)


# ---------------------------------------------------------------- the reader process


async def _read_until_stopped(tcp: str, topics: list[str], channel: str, got: dict[str, list]) -> None:
    """Subscribe to every topic on one event loop; note each read's arrival time with its bodies until SIGTERM.

    The readers ask nsqd for no output buffering (output_buffer_size -1), as a latency-sensitive consumer
    of the pipeline's outputs would: a record is written to the reader as soon as nsqd has it, so the
    figure is the pipeline's latency, not nsqd's buffering for the probe.
    """
    import asyncio

    from pipeline.client.fastclient import FastReader
    from pipeline.client.fastconn import finish_all

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    unfinished: list = []

    def finish() -> None:
        # Every FIN_INTERVAL_S rather than per read: a FIN per read would cost this process and nsqd a
        # system call and a wake-up per message, CPU the pipeline under test would not get.
        finish_all(unfinished)
        unfinished.clear()
        if not stop.is_set():
            loop.call_later(FIN_INTERVAL_S, finish)

    def reader(topic: str) -> FastReader:
        into = got[topic]

        def on_messages(messages: list) -> None:
            arrived = time.time_ns()  # once per read: every message of it arrived then
            into.extend((arrived, m.body) for m in messages)
            unfinished.extend(messages)
        return FastReader(topic=topic, channel=channel, batch_handler=on_messages, nsqd_tcp_addresses=[tcp],
                          max_in_flight=2500, output_buffer_size=-1)

    readers = [reader(topic) for topic in topics]
    finish()
    await stop.wait()
    finish()
    for running in readers:
        running.close()


def reader_main(argv: list[str]) -> int:
    """Read the topics until SIGTERM, then write each record's arrival - ts (ns) to ``--out`` (npz)."""
    import asyncio

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ticks read")
    parser.add_argument("--tcp", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    topics = args.topics.split(",")
    got: dict[str, list] = {topic: [] for topic in topics}
    from pipeline.records.codecs import decode
    from pipeline.records.envelope import records_of

    # The probe must not pause: a collection while it reads (hundreds of ms for a full one over everything
    # imported and read so far) would delay every arrival behind it and count as the pipeline's latency.
    # What it keeps while reading holds no reference cycles, so the collector waits until it is done.
    gc.freeze()
    gc.disable()
    try:
        asyncio.run(_read_until_stopped(args.tcp, topics, args.channel, got))
    finally:
        gc.enable()
        gc.unfreeze()
    seen: set[str] = set()
    duplicates = 0
    latencies: dict[str, list[int]] = {"features": [], "signals": []}
    stamps: dict[str, list[int]] = {"features": [], "signals": []}
    for topic, received in got.items():
        kind = "signals" if topic == "signals" else "features"
        for arrived, body in received:
            for record in records_of([decode(body)]):  # one record, or an envelope of several
                if record["id"] in seen:
                    duplicates += 1
                    continue
                seen.add(record["id"])
                latencies[kind].append(arrived - record["ts"])
                stamps[kind].append(record["ts"])
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez(tmp, features=np.array(latencies["features"], dtype=np.int64),
             signals=np.array(latencies["signals"], dtype=np.int64),
             features_ts=np.array(stamps["features"], dtype=np.int64),
             signals_ts=np.array(stamps["signals"], dtype=np.int64), duplicates=np.int64(duplicates))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["read"]:
        print("usage: python -m benchmarks.ticks read --tcp ADDR --channel NAME --topics A,B --out FILE.npz",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(reader_main(sys.argv[2:]))
