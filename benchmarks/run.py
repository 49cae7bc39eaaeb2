"""``python -m benchmarks.run``: every contender's throughput side by side, in one run.

Example::

    python -m benchmarks.run --scale 0.05 --repeats 1 --only primes2,nsq_to_nsq

prints a table and writes ``bench/results.json`` (raw samples, medians,
ranges, machine, command) and ``bench/results.md``. Targets are informational:
the exit code is 0 even when one is missed, 1 when a run failed, 130 on Ctrl-C.
Every process a run starts is stopped by pid before the next run starts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path

from rich.console import Console

from pipeline.config.schema import DURABILITY_FLAGS
from pipeline.records import envelope
from pipeline.records.codecs import encoder
from pipeline.errors import PipelineError
from pipeline.ops.install import nsq_binary
from producers.numbers import number_records

from . import drain, gateway, report, restart, ticks
from .contenders import (ALL_NAMES, BATCHED_BATCH, BATCHED_COUNT, BATCHED_PACK, DRAIN_CONTENDERS, GATEWAY, PENDING,
                         RESTART, STAGE_BATCH, STAGE_MAX_IN_FLIGHT, TICKS)
from .procstat import load_average, machine_info

TABLE_WIDTH = 120
RULES = (
    "Each run gets a fresh nsqd (free 127.0.0.1 ports, temporary data directory, "
    f"--mem-queue-size >= {drain.MEM_QUEUE_SIZE:,} so nothing spills to disk); runs are interleaved "
    "round-robin across contenders, so machine noise spreads over all of them.",
    "durable2: primes2's workload and stage, its nsqd started with nsq.durability: durable's flags as `pipeline up` "
    f"gives them ({' '.join(DURABILITY_FLAGS['durable'])}) instead of the large memory queue, and its topology "
    "saying so: every message, the preload too, goes through the topic's and the channel's disk queues (in the "
    "temporary directory, on the machine's disk). Durability cost: durable2's records/s and CPU per record "
    "(its workers' and nsqd's user + system CPU between the clock readings, over N) beside primes2's from the "
    "same run, with the ratios durable2 / primes2 of the medians.",
    "replicated2: primes2's stage on two nsqd (each a fresh one as above), every topic with replication: 2, as"
    " `pipeline up` would run it: the input in one partition per replica (by id), preloaded on both nodes (each"
    " message twice, as a replicated producer leaves it), each replica reading its partition on both nodes and"
    " finishing the second copy unprocessed, its outputs published to both nodes and acknowledged by both."
    " Drained when every output has its two copies. Replication cost: its records/s and CPU per record (workers"
    " and both nsqd) beside primes2's from the same run.",
    "Input: records {\"id\", \"ts\", \"number\"} for the numbers 1..N, JSON, the same bytes for every "
    "contender but batched; N = 1,000,000 x scale (100,000 x scale for the textbook consumer), preloaded into a "
    "paused channel before any contender starts.",
    f"batched: the same records (the same dicts, encoded in the same pass), N = {BATCHED_COUNT:,} x scale, "
    f"packed {BATCHED_PACK} per message with pipeline.records.envelope.pack (msgpack envelopes), so N / {BATCHED_PACK} "
    f"input messages; every topic has pack: {BATCHED_PACK}, and the stage's batch is "
    f"{BATCHED_BATCH['size']} messages ({BATCHED_BATCH['size'] * BATCHED_PACK:,} records per handler call), "
    f"wait {BATCHED_BATCH['wait_ms']} ms, max_in_flight {STAGE_MAX_IN_FLIGHT}.",
    "Clock: starts when every contender process is subscribed to the channel with RDY > 0 (our workers also "
    "logged that their compiled kernels are loaded: a worker subscribes first and loads numba in the "
    "background, see pipeline.records.jit) and the channel is unpaused; stops at the first /stats read (every 50 ms) where the output topics' message_count "
    "reaches N (prime + non_prime; prime alone for nsq_to_nsq) and the channel has nothing queued, in "
    "flight or deferred. records/s = N / that time.",
    "Clock for batched (output message counts no longer match N): stops at the first /stats read where the "
    "channel's consumers have FINished all N / pack input messages (sum of the clients' finish_count; the "
    "channel's own message_count counts messages put into the channel, so it is reached at preload) and "
    "nothing is queued, in flight or deferred. A worker FINs an envelope only after nsqd acknowledged its "
    "outputs, so every record's output is published by then. records/s counts records, not messages.",
    "Record check for batched, outside the clock: a 'verify' channel is created on prime and non_prime "
    "before the preload; after the clock stops every output envelope is read back through it and prime "
    "must hold exactly the primes in 1..N and non_prime the other numbers, each once, with the right "
    "'prime' flag (output_records in results.json); a mismatch fails the run.",
    "CPU s / M records: user + system CPU of the contender's processes between the two clock readings "
    "(/proc/<pid>/stat), scaled to 1,000,000 records; start-up CPU is recorded apart in results.json. "
    "nsqd's CPU over the same interval is shown separately.",
    "Peak RSS: VmHWM of each contender process (the largest one), read before it is stopped.",
    "Restart-to-consuming: one primes replica consumes a ~2,000 records/s trickle; it is SIGKILLed, and "
    "once nsqd dropped its connections a new replica is started at once; the figure runs from that "
    "process start to the first /stats read (every 10 ms) where the outputs grew.",
    "Contenders: textbook = High Performance Python ex. 10-9 (pynsq Reader, max_in_flight 1, PUB per "
    "message); nsq_to_nsq --max-in-flight=2500 copying to prime; primes stage: "
    f"max_in_flight {STAGE_MAX_IN_FLIGHT}, batch size {STAGE_BATCH['size']}, "
    f"wait {STAGE_BATCH['wait_ms']} ms, started as `pipeline worker primes --replica k`.",
    f"ticks (tick -> signal latency): a fresh nsqd (nsqd's default --mem-queue-size, {ticks.TICKS_MEM_QUEUE_SIZE:,}: "
    f"the pipeline holds a few dozen messages at a time); topics ticks and features (msgpack, {ticks.PARTITIONS} "
    "partitions, key symbol; features also seq: feature_seq; with --ticks-pack P above 1 also pack: P, so a "
    "message is an envelope of the records the producer or a batch has at hand, up to P) and signals (json); "
    "keyed stages features "
    f"(consumers.features:Features) and signals (consumers.signals:Signals), {ticks.PARTITIONS} replicas each, "
    f"batch {ticks.BATCH['size']} / wait_ms from --ticks-wait-ms (default {ticks.BATCH['wait_ms']}), "
    f"max_in_flight {ticks.MAX_IN_FLIGHT}, checkpoint_interval_ms from --ticks-checkpoint-ms (default "
    f"{ticks.CHECKPOINT_INTERVAL_MS}; outputs go out before their checkpoint whatever it is, so it sets how much "
    "input a crash replays, not the latency; the stage's default 50 costs 8 replicas 160 fdatasyncs a second), "
    "started as `pipeline worker STAGE --replica k`; the run starts once every partition channel has its one "
    f"client. {ticks.SYMBOLS} synthetic symbols; {ticks.WARMUP:,} warm-up ticks at the same rate are published and "
    f"drained first and not counted; then N = {ticks.BASE_COUNT:,} x scale ticks with produce_ticks(rate=R) "
    f"(R = --tick-rate, default {ticks.TICK_RATE:,}/s) from a thread. A tick's ts (ns) is stamped when "
    "produce_ticks' pacer releases it (just in time: its pacing sleep is not counted; the producer's own "
    "buffering until its next send is: at most about its linger_ms, from --ticks-linger-ms, default "
    f"{ticks.LINGER_MS:g}).",
    "ticks latency: a separate reader process (one event loop, a FastReader per topic) subscribes before "
    f"publishing to a 'bench' channel on signals and on features.0 (the first {ticks.FEATURE_PROBE} of the "
    f"{ticks.PARTITIONS} feature partitions: their ticks are enough for the tick->feature figure, and reading all "
    "of them would load the machine under test with the probe's own work), asking nsqd for no output buffering "
    "(output_buffer_size -1), as a latency-sensitive consumer of the outputs would; the workers identify with "
    f"output_buffer_size from --output-buffer-size (default {ticks.OUTPUT_BUFFER_SIZE}: no buffering; nsqd's "
    f"own default is 16384) and output_buffer_timeout from --output-buffer-timeout (default "
    f"{ticks.OUTPUT_BUFFER_TIMEOUT} ms, used with a buffer; this nsqd runs with --min-output-buffer-timeout=1ms, "
    "nsqd's own minimum is 25 ms). The reader notes time.time_ns() as each read "
    "arrives. tick->feature = arrival of the tick's feature record - ts (the reader must get one for every measured "
    "tick of the probed partitions); tick->signal = arrival of a signal "
    "- ts (a signal carries its tick's ts); duplicates (same id) count once. p50/p99/p99.9 in ms per run; the "
    "table shows their median (min–max) over runs. Input rate = ticks / publishing time. Backlog = messages "
    "queued or in flight on the workers' channels when the last tick was published; kept up = every topic "
    "and channel of the pipeline was empty (every tick turned into features, every feature read by signals, "
    f"every output read) within {ticks.KEPT_UP_S:g} s after that. CPU us per tick: user + system CPU of the workers, nsqd, the reader and the bench process (the "
    "producer thread) while the measured ticks are published and drained, over N. Peak RSS: VmHWM of each "
    "worker. Host steal %: the share of the machine's CPU time the hypervisor gave to other guests while the "
    "measured ticks were published (/proc/stat; also recorded for each drain in results.json): on a shared "
    "virtual machine, CPU this pipeline did not get, which shows first in the tail latency.",
    f"gateway: a fresh nsqd and {gateway.PROCESSES} `pipeline gateway` processes sharing its port in front of it "
    "(SO_REUSEPORT; one token, no rate limit); "
    f"{gateway.CONNECTIONS} keep-alive HTTP/1.1 connections with {gateway.DEPTH} pipelined requests each send "
    f"N = {gateway.BASE_COUNT:,} x scale single-message POST /pub requests (one JSON record each) from an asyncio "
    "client in the bench process; the clock runs from the first request to the last 200 (each 200 comes after "
    "nsqd's OK); every answer must be 200 and nsqd's message count N. CPU is the gateway processes' sum, peak "
    "RSS the largest one's.",
    "Ratios compare records/s medians from the same run (batched / primes2: batched drains "
    f"{BATCHED_COUNT // 1_000_000}x as many records); a target is informational and never fails the command.",
)


def parse_args(argv: Sequence[str] | None, prog: str = "python -m benchmarks.run") -> argparse.Namespace:
    """Parse ``--scale``, ``--repeats``, ``--only`` and ``--out``; exit 2 with a usage line on a bad one."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Measure the primes stage's throughput side by side with its baselines.")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every record count by this (default 1: 1,000,000 records)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--only", default=",".join(ALL_NAMES),
                        help=f"comma-separated figures to measure (default: all of {', '.join(ALL_NAMES)})")
    parser.add_argument("--tick-rate", type=float, default=ticks.TICK_RATE,
                        help=f"ticks/s published in the ticks figure (default {ticks.TICK_RATE:,})")
    parser.add_argument("--ticks-pack", type=int, default=ticks.PACK,
                        help="records per message on ticks and features in the ticks figure (default "
                             f"{ticks.PACK}; above 1, envelopes of what the producer or a batch has at hand)")
    parser.add_argument("--output-buffer-timeout", type=int, default=ticks.OUTPUT_BUFFER_TIMEOUT,
                        help="the keyed stages' output_buffer_timeout (ms, 1..30000) in the ticks figure "
                             f"(default {ticks.OUTPUT_BUFFER_TIMEOUT})")
    parser.add_argument("--output-buffer-size", type=int, default=ticks.OUTPUT_BUFFER_SIZE,
                        help="the keyed stages' output_buffer_size in the ticks figure "
                             f"(default {ticks.OUTPUT_BUFFER_SIZE}: no buffering; 16384 is nsqd's and the stage's)")
    parser.add_argument("--ticks-wait-ms", type=int, default=ticks.BATCH["wait_ms"],
                        help="the keyed stages' batch wait_ms in the ticks figure (default "
                             f"{ticks.BATCH['wait_ms']}; 0: a batch is what one read from nsqd brought)")
    parser.add_argument("--ticks-linger-ms", type=float, default=ticks.LINGER_MS,
                        help="the ticks producer's linger_ms, the longest a tick waits in its buffer "
                             f"(default {ticks.LINGER_MS:g})")
    parser.add_argument("--ticks-checkpoint-ms", type=int, default=ticks.CHECKPOINT_INTERVAL_MS,
                        help="the keyed stages' checkpoint_interval_ms in the ticks figure "
                             f"(default {ticks.CHECKPOINT_INTERVAL_MS}; the stage's own default is 50)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    if args.tick_rate <= 0:
        parser.error("--tick-rate must be > 0")
    if args.output_buffer_size != -1 and not 64 <= args.output_buffer_size <= 65536:
        parser.error("--output-buffer-size must be -1 or 64..65536")
    if not 1 <= args.ticks_pack <= 10000:
        parser.error("--ticks-pack must be 1..10000")
    if not 1 <= args.output_buffer_timeout <= 30000:
        parser.error("--output-buffer-timeout must be 1..30000 (ms)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not 0 <= args.ticks_wait_ms <= 60000:
        parser.error("--ticks-wait-ms must be 0..60000")
    if not 0 < args.ticks_linger_ms <= 1000:
        parser.error("--ticks-linger-ms must be in (0, 1000]")
    if not 0 <= args.ticks_checkpoint_ms <= 25000:
        parser.error("--ticks-checkpoint-ms must be 0..25000 (under half the stages' 60 s msg_timeout)")
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(ALL_NAMES))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(ALL_NAMES)})")
    return args


def new_results(args: argparse.Namespace) -> dict:
    """The results document before any run: settings, rules, machine, and one entry per selected figure."""
    if "nsq_to_nsq" in args.only:
        nsq_binary("nsq_to_nsq")  # fail now, not once per run, if it is not installed
    contenders: dict[str, dict] = {}
    for c in DRAIN_CONTENDERS:
        if c.name in args.only:
            contenders[c.name] = {"label": c.label, "kind": c.kind, "processes": c.processes,
                                  "records": c.count(args.scale), "pack": c.pack,
                                  "messages": c.messages(args.scale), "durability": c.durability,
                                  "replication": c.replication}
    if RESTART in args.only:
        contenders[RESTART] = {"label": "restart-to-consuming, primes stage, 1 replica", "kind": "restart",
                               "processes": 1, "records": None}
    if TICKS in args.only:
        contenders[TICKS] = {"label": f"(e) ticks -> features -> signals latency, {ticks.PARTITIONS} partitions, "
                                      f"{2 * ticks.PARTITIONS} workers, {args.tick_rate:,.0f} ticks/s",
                             "kind": "ticks", "processes": 2 * ticks.PARTITIONS,
                             "records": ticks_count(args.scale), "rate": args.tick_rate}
    if GATEWAY in args.only:
        contenders[GATEWAY] = {"label": f"gateway single-message /pub, {gateway.PROCESSES} processes, "
                                        f"{gateway.CONNECTIONS} keep-alive connections",
                               "kind": "gateway", "processes": gateway.PROCESSES,
                               "records": max(1, round(gateway.BASE_COUNT * args.scale))}
    for entry in contenders.values():
        entry.update(repeats=args.repeats, status="ok", samples=[], errors=[], summary={})
    for name, label in PENDING.items():
        if name in args.only:
            contenders[name] = {"label": label, "kind": "pending", "status": "not available yet",
                                "samples": [], "errors": []}
    return {
        "command": {"line": shlex.join(sys.orig_argv), "argv": list(sys.orig_argv), "cwd": str(Path.cwd())},
        "settings": {"scale": args.scale, "repeats": args.repeats, "only": args.only,
                     "poll_interval_s": drain.POLL_INTERVAL, "restart_poll_interval_s": restart.POLL_INTERVAL,
                     "trickle_rate": restart.TRICKLE_RATE, "tick_rate": args.tick_rate,
                     "output_buffer_size": args.output_buffer_size,
                     "output_buffer_timeout_ms": args.output_buffer_timeout, "ticks_pack": args.ticks_pack,
                     "ticks_wait_ms": args.ticks_wait_ms, "ticks_linger_ms": args.ticks_linger_ms,
                     "ticks_checkpoint_ms": args.ticks_checkpoint_ms},
        "rules": list(RULES),
        "machine": machine_info(nsq_binary("nsqd")),
        "contenders": contenders,
    }


def ticks_count(scale: float) -> int:
    """Measured ticks at ``scale`` (200,000 at 1: ten seconds at 20,000/s): at least one."""
    return max(1, round(ticks.BASE_COUNT * scale))


def input_bodies(wanted: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[bytes]]:
    """The bodies of the numbers 1..count for each ``(pack, count)`` in ``wanted``, encoded once per run.

    Pack 1 is one JSON record per body, the same bytes for every contender (each gets a prefix of the
    longest list); above 1, msgpack envelopes of ``pack`` records made by :func:`pipeline.records.envelope.pack`.
    Every form is encoded from the same record dicts, in one pass over them.
    """
    wanted = set(wanted)
    if not wanted:
        return {}
    packs = sorted({pack for pack, _ in wanted})
    longest_json = max((count for pack, count in wanted if pack == 1), default=0)
    packed = {key: [] for key in wanted if key[0] > 1}
    json_bodies: list[bytes] = []
    encode = encoder("json")
    step = math.lcm(*packs) * max(1, 10_000 // math.lcm(*packs))  # whole envelopes per chunk
    records = number_records(1, max(count for _, count in wanted), run_id="bench")
    done = 0
    while chunk := list(islice(records, step)):
        if done < longest_json:
            json_bodies += [encode(r) for r in chunk[:longest_json - done]]
        for (pack, count), bodies in packed.items():
            if done < count:
                bodies += envelope.pack(chunk[:count - done], pack)
        done += len(chunk)
    out: dict[tuple[int, int], list[bytes]] = dict(packed)
    for pack, count in wanted:
        if pack == 1:
            out[pack, count] = json_bodies if count == longest_json else json_bodies[:count]
    return out


def run_all(args: argparse.Namespace, results: dict, workroot: Path, progress: Console) -> bool:
    """Run every selected figure ``--repeats`` times, round-robin; return True when every run succeeded."""
    entries = results["contenders"]
    drains = [c for c in DRAIN_CONTENDERS if c.name in entries]
    bodies = input_bodies((c.pack, c.count(args.scale)) for c in drains)
    ok = True
    for rep in range(1, args.repeats + 1):
        for contender in drains:
            workdir = workroot / f"{contender.name}-{rep}"
            count = contender.count(args.scale)
            inputs = bodies[contender.pack, count]
            measure = lambda c=contender, b=inputs, d=workdir, n=count: drain.drain_once(c, b, d, n).to_dict()
            ok &= _one_run(entries[contender.name], f"{contender.name} run {rep}/{args.repeats}", progress, measure)
        if RESTART in entries:
            workdir = workroot / f"{RESTART}-{rep}"
            ok &= _one_run(entries[RESTART], f"{RESTART} run {rep}/{args.repeats}", progress,
                           lambda d=workdir: restart.restart_once(d).to_dict())
        if TICKS in entries:
            workdir = workroot / f"{TICKS}-{rep}"
            ok &= _one_run(entries[TICKS], f"{TICKS} run {rep}/{args.repeats}", progress,
                           lambda d=workdir: ticks.ticks_once(d, ticks_count(args.scale), args.tick_rate,
                                                              args.output_buffer_size,
                                                              args.output_buffer_timeout, args.ticks_pack,
                                                              args.ticks_wait_ms, args.ticks_linger_ms,
                                                              args.ticks_checkpoint_ms))
        if GATEWAY in entries:
            workdir = workroot / f"{GATEWAY}-{rep}"
            ok &= _one_run(entries[GATEWAY], f"{GATEWAY} run {rep}/{args.repeats}", progress,
                           lambda d=workdir: gateway.gateway_once(d, entries[GATEWAY]["records"]))
    return ok


def _one_run(entry: dict, what: str, progress: Console, measure) -> bool:
    """Call ``measure()`` and file its sample, or its error, under ``entry``; return True on success."""
    progress.print(f"{what} ...", end=" ")
    try:
        sample = measure()
    except Exception as e:  # one failed run must not lose the others' figures
        if not isinstance(e, PipelineError):
            traceback.print_exc()
        entry["errors"].append(f"{what}: {e}")
        entry["status"] = "failed"
        progress.print(f"[red]failed[/red]: {e}")
        return False
    entry["samples"].append(sample)
    if "signal_p99_ms" in sample:
        progress.print(f"{sample['ticks']:,} ticks at {sample['input_rate']:,.0f}/s: tick->feature p99 "
                       f"{sample['feature_p99_ms']:.1f} ms, tick->signal p99 {report.ms(sample['signal_p99_ms'])} ms, "
                       f"backlog {sample['backlog_at_end']:,}")
    elif "records_per_s" in sample:
        progress.print(f"{sample['records']:,} records in {sample['seconds']:.2f} s = "
                       f"{sample['records_per_s']:,.0f} records/s")
    else:
        progress.print(f"{sample['seconds']:.2f} s")
    return True


def finish(results: dict) -> None:
    """Add summaries, ratios, target checks and the end-of-run load average."""
    for entry in results["contenders"].values():
        if entry["kind"] == "restart":
            entry["summary"] = report.summarize(entry["samples"], report.RESTART_METRICS)
        elif entry["kind"] == "ticks":
            entry["summary"] = report.summarize(entry["samples"], report.TICKS_METRICS)
        elif entry["kind"] == "gateway":
            entry["summary"] = report.summarize(entry["samples"], report.GATEWAY_METRICS)
        elif entry["kind"] != "pending":
            entry["summary"] = report.summarize(entry["samples"], report.DRAIN_METRICS)
    results["ratios"] = report.ratios(results)
    results["durability_cost"] = report.durability_cost(results)
    results["replication_cost"] = report.durability_cost(results, report.REPLICATED_PAIRS)
    results["targets"] = report.targets(results)
    results["machine"]["load_average_at_end"] = load_average()


def write_outputs(results: dict, out: Path) -> None:
    """Write ``out/results.json`` and ``out/results.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report.markdown(results))


def _stdout_console() -> Console:
    """A console on stdout; wide enough for the table when stdout is a file or pipe (rich would use 80)."""
    console = Console()
    return console if console.is_terminal else Console(width=TABLE_WIDTH)


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into KeyboardInterrupt, so a killed benchmark still stops what it started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        """Unwind like Ctrl-C, through every ``finally`` that stops a process."""
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None, prog: str = "python -m benchmarks.run") -> int:
    """Run the benchmark; return 0 when every run succeeded (targets met or not), 1 when one failed.

    Raises:
        KeyboardInterrupt: on Ctrl-C or SIGTERM, once every process it started is stopped.
    """
    args = parse_args(argv, prog)
    progress = Console(stderr=True)
    results = new_results(args)
    workroot = Path(tempfile.mkdtemp(prefix="nsq-bench-"))
    ok = None
    try:
        with _sigterm_interrupts():
            ok = run_all(args, results, workroot, progress)
    finally:
        if ok is False:  # a run failed: its processes' logs tell why
            progress.print(f"logs of the runs kept in {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    finish(results)
    write_outputs(results, args.out)
    report.print_report(results, _stdout_console())
    progress.print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; the processes it had started were stopped", file=sys.stderr)
        sys.exit(130)
    except PipelineError as e:  # e.g. NSQ binaries not installed
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
