"""``pipeline produce numbers|ticks``: publish records from the checkout's reference producers."""
from __future__ import annotations

import contextlib

import click

from pipeline.cli.common import load, topology_option
from pipeline.cli.plugins import load_plugin


@click.group()
def produce() -> None:
    """Publish records from a reference producer."""


@produce.command("numbers")
@click.option("--start", type=int, default=1, show_default=True, help="First number.")
@click.option("--count", type=click.IntRange(min=1), required=True, help="How many numbers.")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Records per second (0: as fast as nsqd accepts).")
@click.option("--producer", "producer_name", default="numbers", show_default=True,
              help="The producer entry in the topology.")
@click.option("--run-id", default=None, help="Prefix of the record ids (default: random).")
@topology_option
def produce_numbers_cmd(start: int, count: int, rate: float, producer_name: str,
                        run_id: str | None, topology_path: str) -> None:
    """Publish {"id", "ts", "number"} records for START .. START+COUNT-1."""
    numbers = load_plugin("producers.numbers")
    topology = load(topology_path)
    spec = topology.producers.get(producer_name)
    if spec is None:
        raise click.BadParameter(f"no producer {producer_name!r} in {topology_path}", param_hint="--producer")
    address = topology.nsqd_tcp_addresses()  # several nodes: spread round-robin, with failover
    with _progress(f"publishing to {spec.topic}", count) as advance:
        acked = numbers.produce_numbers(address, spec.topic, start, count, rate=rate or spec.rate, chunk=spec.chunk,
                                codec=topology.codec_for(spec.topic), pack=topology.pack_for(spec.topic),
                                run_id=run_id, on_progress=advance,
                               security=_security(topology, producer_name))
    click.echo(f"published {acked} records to {spec.topic} on {', '.join(address)}")


@produce.command("ticks")
@click.option("--symbols", type=click.IntRange(min=1), default=8, show_default=True, help="Synthetic symbols.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Synthetic ticks in all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic prices.")
@click.option("--replay", "replay_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Replay a CSV file with columns ts,symbol,price,size instead.")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Ticks per second (0: as fast as nsqd accepts).")
@click.option("--speed", default="max", show_default=True,
              help="Replay pace: 'max', or a factor of the file's own pace (1 = original).")
@click.option("--producer", "producer_name", default="ticks", show_default=True,
              help="The producer entry in the topology.")
@click.option("--run-id", default=None, help="Prefix of the record ids (default: random).")
@click.option("--linger-ms", type=click.FloatRange(min=0, max=1000, min_open=True), default=5.0, show_default=True,
              help="When paced, the longest a tick waits in the producer's buffer before it is sent.")
@topology_option
def produce_ticks_cmd(symbols: int, count: int | None, seed: int, replay_path: str | None, rate: float,
                      speed: str, producer_name: str, run_id: str | None, linger_ms: float,
                      topology_path: str) -> None:
    """Publish ticks {"id", "ts", "symbol", "seq", "price", "size"} to their partitions."""
    ticks = load_plugin("producers.ticks")
    if (replay_path is None) == (count is None):
        raise click.UsageError("give either --count (synthetic ticks) or --replay FILE")
    try:
        ticks.parse_speed(speed)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--speed") from None
    topology = load(topology_path)
    spec = topology.producers.get(producer_name)
    if spec is None:
        raise click.BadParameter(f"no producer {producer_name!r} in {topology_path}", param_hint="--producer")
    if replay_path is not None:
        total = sum(1 for _ in ticks.replay_ticks(replay_path))  # a bad file fails here, before anything is sent
        records = ticks.replay_ticks(replay_path, run_id=run_id)
    elif count is not None:  # exactly one of --count and --replay: checked above
        total, records = count, ticks.synthetic_ticks(symbols, count, seed=seed, run_id=run_id)
    address = topology.nsqd_tcp_addresses()  # several nodes: partitions spread, with failover
    with _progress(f"publishing to {spec.topic}", total) as advance:
        acked = ticks.produce_ticks(address, spec.topic, records, spec=topology.topics[spec.topic],
                              rate=rate or (spec.rate if speed == "max" else 0), speed=speed, chunk=spec.chunk,
                              on_progress=advance, linger_ms=linger_ms,
                              security=_security(topology, producer_name))
    click.echo(f"published {acked} ticks to {spec.topic} on {', '.join(address)}")


def _security(topology, identity: str | None):
    """TLS and AUTH for a blocking client of ``identity`` (nothing when the topology has neither)."""
    from pipeline.config.security import client_security
    return client_security(topology, identity)


@contextlib.contextmanager
def _progress(label: str, total: int):
    """Show a progress bar while the block runs; yields ``advance(done)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.update(task, completed=done)

