"""The demo behind ``make demo``: numbers 1..N through the primes stage, shown live.

It starts the default topology locally, publishes the numbers, follows the
stage's output topics on nsqd's ``/stats`` until every record came out, and
prints the counts with where to look next. The reference producers it
publishes with live in the checkout; the ``demo`` command loads them
(:mod:`pipeline.cli.plugins`) and hands them in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.client import nsqd_http
from pipeline.client.producer import Producer
from pipeline.errors import PipelineError
from pipeline.ops.control import Supervisor
from pipeline.ops.install import bin_dir

STAGE, PRODUCER = "primes", "numbers"
TICKS, SYMBOLS, SHOWN_SIGNALS = 20_000, 8, 5


@dataclass
class DemoResult:
    """What came out of the stage, per output topic (dead letters included)."""

    counts: dict[str, int]
    elapsed: float


def run_demo(topology, numbers: ModuleType, count: int = 100_000, timeout: float = 300.0,
             console: Console | None = None) -> DemoResult:
    """Bring the topology up, publish 1..``count`` with ``numbers.publish_numbers``, wait; return the output counts."""
    console = console or Console()
    Supervisor(topology).up(log=lambda line: console.print(f"[dim]{line}[/dim]", soft_wrap=True))
    stage = topology.stage(STAGE)
    producer = topology.producers[PRODUCER]
    http = topology.nsqd_http_addresses()[0]
    topics = [*stage.outputs, topology.dead_letter_topic(STAGE)]
    before = {t: nsqd_http.topic_message_count(http, t) for t in topics}
    started = time.monotonic()
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        published = progress.add_task(f"published to {producer.topic}", total=count)
        processed = progress.add_task(f"classified by {STAGE}", total=count)
        with Producer(topology, producer.topic, chunk=producer.chunk) as publisher:
            numbers.publish_numbers(publisher, 1, count,
                                    on_progress=lambda done: progress.update(published, completed=done))
        counts = _follow(http, topics, before, count, started + timeout,
                         lambda done: progress.update(processed, completed=done))
    return DemoResult(counts, time.monotonic() - started)


def _follow(http, topics, before, count, deadline, on_progress) -> dict[str, int]:
    while True:
        counts = {t: nsqd_http.topic_message_count(http, t) - before[t] for t in topics}
        on_progress(min(count, sum(counts.values())))
        if sum(counts.values()) >= count:
            return counts
        if time.monotonic() > deadline:
            raise PipelineError(f"only {sum(counts.values())} of {count} records came out of {STAGE} in time; "
                                f"see var/log/ and `pipeline down`")
        time.sleep(0.2)


def print_market(counts: dict[str, int], console: Console) -> None:
    """Print the market pipeline's counts."""
    console.print(f"[bold]{counts['features']:,} feature records[/bold] (one per tick) and "
                  f"[bold]{counts['signals']:,} signals[/bold] so far; archived under var/archive/.")


def print_summary(topology, result: DemoResult, console: Console) -> None:
    """Print the output counts and where to look next."""
    table = Table(title=f"{STAGE}: records out per topic ({result.elapsed:.1f} s)")
    table.add_column("topic")
    table.add_column("records", justify="right")
    for topic, n in result.counts.items():
        table.add_row(topic, f"{n:,}")
    console.print(table)
    console.print(f"[bold]{result.counts.get('prime', 0):,} primes[/bold] among the numbers published.")
    for line in next_steps(topology):
        console.print(line, soft_wrap=True, highlight=False)  # one line each, however narrow the terminal


def next_steps(topology, topic: str = "prime") -> list[str]:
    """The lines that say where to look next, each a command or URL to copy whole.

    The ``nsq_tail`` command reads ``topic`` through an ephemeral channel; ``topic``
    is made to have a durable channel first (``keep`` if it has none), so that
    channel never takes the topic's backlog away.
    """
    from pipeline.ops.keep import ensure_kept
    ensure_kept(topology, topic, log=lambda line: None)
    lookupd = topology.lookupd_http_addresses()
    source = f"--lookupd-http-address={lookupd[0]}" if lookupd else \
        f"--nsqd-tcp-address={topology.nsqd_tcp_addresses()[0]}"
    lines = [f"nsqadmin:  http://{topology.nsq.admin}/"] if topology.nsq.admin else []
    lines += [f"watch it:  {bin_dir() / 'nsq_tail'} {source} --topic={topic} -n 5", "stop it:   make down"]
    return lines


def run_market_demo(topology, ticks: ModuleType, console: Console, timeout: float = 300.0) -> dict[str, int]:
    """Publish ``ticks.synthetic_ticks``, wait until every tick has its features, print a few signals; return counts."""
    from pipeline.client.nsqclient import NsqSubscriber
    from pipeline.observe.tail import record_json, tail_channel
    from pipeline.records.codecs import decode
    http, tcp = topology.nsqd_http_addresses()[0], topology.nsqd_tcp_addresses()[0]
    features = topology.physical_topics("features")
    before = {t: nsqd_http.topic_message_count(http, t) for t in [*features, "signals"]}
    with NsqSubscriber(tcp, "signals", tail_channel()) as signals:
        # numbered where the last run stopped, so a second demo's ticks are applied too
        with Producer(topology, "ticks") as publisher:
            ticks.publish_ticks(publisher, ticks.synthetic_ticks(SYMBOLS, TICKS, seed=1))
        console.print(f"published {TICKS:,} ticks for {SYMBOLS} symbols to ticks.0..{len(features) - 1}; "
                      f"first signals:")
        shown, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in signals.messages(timeout=0.2):
                if shown < SHOWN_SIGNALS:
                    console.print(f"  {record_json(decode(message.body))}", soft_wrap=True)
                    shown += 1
            counts = {t: nsqd_http.topic_message_count(http, t) - before[t] for t in before}
            if sum(counts[t] for t in features) >= TICKS:
                break
        else:
            raise PipelineError("the features stage did not keep up; see `pipeline status` and var/log/")
    return {"features": sum(counts[t] for t in features), "signals": counts["signals"]}
