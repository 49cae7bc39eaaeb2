"""``pipeline produce TOPIC --from FILE``: publish records to any declared topic; and the reference generators.

``produce TOPIC --from FILE|-`` reads JSON lines or CSV through
:class:`pipeline.Producer`. ``produce numbers|ticks`` (without ``--from``) run
the checkout's reference generators, built on the same producer.
"""
from __future__ import annotations

import contextlib
import os
import sys

import click

from pipeline.cli.common import echo_err, load, topology_option
from pipeline.cli.plugins import load_plugin


class ProduceGroup(click.Group):
    """The generators by name, and ``TOPIC --from FILE`` for any other name (or with ``--from``)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] in self.commands and not any(a == "--from" or a.startswith("--from=") for a in args):
            return super().resolve_command(ctx, args)
        return "TOPIC", produce_file, args

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "TOPIC --from FILE|- [OPTIONS] | numbers|ticks [OPTIONS]")


@click.group(cls=ProduceGroup, invoke_without_command=False)
def produce() -> None:
    """Publish records to a topic: `pipeline produce TOPIC --from FILE|-` (JSON lines, or CSV with a header).

    \b
    pipeline produce orders --from orders.jsonl
    pipeline produce orders --from orders.csv --rate 500 --on-error skip
    cat orders.jsonl | pipeline produce orders --from -

    Records are encoded, packed and partitioned as the topology declares the
    topic; a keyed topic's records are numbered per key (`seq`), continuing
    from the last run. A run that stopped early resumes after the last line
    nsqd acknowledged when the same file is given again. See
    `pipeline produce TOPIC --help` for the options.

    `pipeline produce numbers|ticks` run the reference generators of the
    nsq-pipeline checkout instead.
    """


@click.command("TOPIC", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("topic")
@click.option("--from", "source_path", required=True, metavar="FILE|-",
              help="JSON lines (one object per line) or CSV with a header; '-' reads standard input.")
@click.option("--format", "file_format", type=click.Choice(["jsonl", "csv"]), default=None,
              help="The file's format (default: csv for a .csv name, else jsonl).")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Records per second (0: as fast as nsqd accepts).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A bad line: stop there (fail; a later run resumes at it), or report it and go on (skip).")
@click.option("--no-resume", is_flag=True,
              help="Publish the whole file even if an earlier run of it stopped part way.")
@topology_option
def produce_file(topic: str, source_path: str, file_format: str | None, rate: float, on_error: str,
                 no_resume: bool, topology_path: str) -> None:
    """Publish the records of FILE (or standard input) to TOPIC, a topic declared in the topology."""
    from pipeline.client.producer import Producer
    from pipeline.records.sources import FileSource
    topology = load(topology_path)
    with Producer(topology, topic) as producer:
        resume = None if source_path == "-" or no_resume else producer.position.resumable(os.path.abspath(source_path))
        if resume is not None:
            echo_err(f"resuming {source_path} after line {resume.line}: an earlier run stopped there with every "
                     "line before it acknowledged (--no-resume sends the whole file)")
        source = FileSource(source_path, file_format, resume)
        run = _FileRun(source, producer, on_error == "skip")
        total = _count_lines(source_path) if source_path != "-" else None
        try:
            with _progress(f"{source.shown} -> {topic}", total) as advance:
                producer.on_progress = lambda _: advance(source.line)
                with contextlib.suppress(_Stopped):
                    producer.publish(run.records(), rate=rate, on_bad=run.bad_record)
                if not run.failed:
                    producer.source_mark = lambda: source.mark(done=True)
                    producer.flush()
        finally:
            source.close()
            click.echo(f"{source.shown}: read {source.line - (resume.line if resume else 0)} lines; published "
                       f"{producer.sent} records to {topic}, {producer.acked} acknowledged; refused {run.refused}"
                       + (" (bad lines, reported above)" if run.refused else ""), err=run.failed)
            if producer.copies_missing:
                click.echo(f"warning: {producer.copies_missing} copies of messages to the replicated topic {topic} "
                           "went nowhere: fewer nsqd were up than its replication (they have fewer copies)", err=True)
    if run.failed:
        sys.exit(1)


class _Stopped(Exception):
    """A bad line stopped the run (--on-error fail); every line before it was acknowledged."""


class _FileRun:
    """The records of a file for a producer; reports bad lines as FILE:LINE: reason."""

    def __init__(self, source, producer, skip: bool):
        self.source, self.producer, self.skip = source, producer, skip
        self.refused, self.failed = 0, False
        self.line = 0  # the line of the record being sent
        producer.source_mark = source.mark

    def records(self):
        from pipeline.records.partition import PartitionKeyError
        for line in self.source:
            reason = line.error
            if reason is None:
                try:
                    self.producer.check_key(line.record)
                except PartitionKeyError as e:
                    reason = e.reason
            if reason is None:
                self.line = line.number
                yield line.record
                continue
            self.refuse(line.number, reason)
            if self.failed:
                return

    def refuse(self, number: int, reason: str) -> None:
        """Report line ``number``; with --on-error fail, stop the run before it."""
        self.refused += 1
        click.echo(f"{self.source.shown}:{number}: {reason}", err=True)
        if not self.skip:
            self.failed = True
            self.producer.source_mark = lambda: self.source.mark(before_last=True)

    def bad_record(self, error) -> None:
        """A record the producer cannot publish (see Producer.publish's on_bad): its line is refused."""
        self.refuse(self.line, error.reason)
        if self.failed:
            raise _Stopped



def _count_lines(path: str) -> int | None:
    """The lines of a regular file (for the progress bar); None when it cannot be counted cheaply."""
    try:
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


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
    from pipeline.client.producer import Producer
    topology = load(topology_path)
    spec = _producer_spec(topology, producer_name, topology_path)
    with Producer(topology, spec.topic, chunk=spec.chunk) as producer, \
            _progress(f"publishing to {spec.topic}", count) as advance:
        acked = numbers.publish_numbers(producer, start, count, rate=rate or spec.rate, run_id=run_id,
                                        on_progress=advance)
    click.echo(f"published {acked} records to {spec.topic} on {', '.join(producer.addresses)}")


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
    from pipeline.client.producer import Producer
    topology = load(topology_path)
    spec = _producer_spec(topology, producer_name, topology_path)
    if replay_path is not None:
        total = sum(1 for _ in ticks.replay_ticks(replay_path))  # a bad file fails here, before anything is sent
        records = ticks.replay_ticks(replay_path, run_id=run_id)
    elif count is not None:  # exactly one of --count and --replay: checked above
        total, records = count, ticks.synthetic_ticks(symbols, count, seed=seed, run_id=run_id)
    # The producer numbers each symbol's ticks (seq) where its last run stopped: a second run is applied too.
    with Producer(topology, spec.topic, chunk=spec.chunk) as producer, \
            _progress(f"publishing to {spec.topic}", total) as advance:
        acked = ticks.publish_ticks(producer, records, rate=rate or (spec.rate if speed == "max" else 0),
                                    speed=speed, on_progress=advance, linger_ms=linger_ms)
    click.echo(f"published {acked} ticks to {spec.topic} on {', '.join(producer.addresses)}")


def _producer_spec(topology, name: str, topology_path: str):
    spec = topology.producers.get(name)
    if spec is None:
        raise click.BadParameter(f"no producer {name!r} in {topology_path}", param_hint="--producer")
    return spec


@contextlib.contextmanager
def _progress(label: str, total: int | None):
    """Show a progress bar while the block runs; yields ``advance(done)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.update(task, completed=done)

