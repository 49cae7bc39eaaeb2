"""Commands that watch a running topology: tail, peek, logs, top, monitor and report."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.common import load, load_for_stage, topology_option


@click.command()
@click.argument("topic")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None,
              help="Stop after COUNT records (default: follow until Ctrl-C).")
@topology_option
def tail(topic: str, count: int | None, topology_path: str) -> None:
    """Print TOPIC's records as they are published, one JSON line each (JSON and msgpack decoded).

    The tail reads copies through an ephemeral channel; on a topic without a durable
    channel it first creates the channel keep, so its queued messages stay there.
    """
    from pipeline.observe.tail import tail_topic
    tail_topic(load(topology_path), topic, count=count, out=sys.stdout)


@click.command()
@click.argument("topic")
@click.option("-n", "--count", type=click.IntRange(min=1), default=10, show_default=True,
              help="Show up to COUNT records.")
@click.option("--channel", default=None,
              help="Read this durable channel instead of keep (on a stage's channel, each look counts as an attempt).")
@topology_option
def peek(topic: str, count: int, channel: str | None, topology_path: str) -> None:
    """Print TOPIC's queued records, oldest first, one JSON line each, removing none."""
    from pipeline.observe.peek import peek_topic
    peek_topic(load(topology_path), topic, count=count, channel=channel, out=sys.stdout, err=sys.stderr)


@click.command()
@click.argument("stage")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True,
              help="Lines to show from the end of each replica's log.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@topology_option
def logs(stage: str, lines: int, follow: bool, topology_path: str) -> None:
    """Show the logs of STAGE's replicas."""
    from pipeline.observe.logs import stage_logs
    topology = load_for_stage(topology_path, stage)
    stage_logs(topology, stage, lines=lines, follow=follow, out=sys.stdout)


@click.command()
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print the table once (rates over one interval) and exit.")
@topology_option
def top(interval: float, once: bool, topology_path: str) -> None:
    """A live table of every stage and channel: rates, depth, in flight, requeues, dead letters, restarts, p99."""
    from pipeline.observe.top import run
    from pipeline.observe.views import console
    try:
        run(load(topology_path), console(), interval=interval, once=once)
    except KeyboardInterrupt:
        pass


@click.command()
@click.option("--interval", type=click.FloatRange(min=0.05), default=None,
              help="Seconds between samples (default: monitor.interval of the topology).")
@topology_option
def monitor(interval: float | None, topology_path: str) -> None:
    """Sample NSQ, supervisord, workers and the host into health.db; serve NSQ metrics; send the daily report."""
    import signal

    from pipeline.config import load_topology
    from pipeline.observe.monitor import Monitor
    running = Monitor(load_topology(topology_path, environment=True), interval=interval)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: running.stop())
    running.run()


@click.command()
@click.option("--since", default="24h", show_default=True, help="How far back: 24h, 90m, 2d ...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write report.txt, report.html, report.eml and a PNG per chart into this folder.")
@click.option("--send", is_flag=True, help="Send it to the topology's report recipients.")
@topology_option
def report(since: str, out_dir: Path | None, send: bool, topology_path: str) -> None:
    """Build the health report from health.db now: print its text (not with --send alone), write or send it."""
    import time

    from pipeline.config import load_topology
    from pipeline.observe.healthdb import HealthDB
    from pipeline.observe.report import build_report, parse_duration, render_text, to_email, write_files
    try:
        seconds = parse_duration(since)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    topology = load_topology(topology_path, environment=send)
    if send and topology.report is None:
        raise click.UsageError(f"--send needs a report section in {topology_path}")
    db_path = topology.var_dir / "health.db"
    if not db_path.exists():
        raise click.UsageError(f"no samples yet: {db_path} does not exist (is `pipeline monitor` running?)")
    db = HealthDB(db_path)
    now = time.time()
    built = build_report(topology, db, until=now, since=now - seconds)
    spec = topology.report
    if out_dir is not None or not send:
        click.echo(render_text(built), nl=False)
    if out_dir is not None:
        written = write_files(built, out_dir, *((spec.sender, list(spec.to)) if spec else ()))
        click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)
    if send and spec is not None:  # --send without a report section was refused above
        import smtplib

        from pipeline.observe.mailer import send_email
        try:
            send_email(spec, to_email(built, spec.sender, list(spec.to)))
        except (OSError, smtplib.SMTPException) as e:
            raise click.ClickException(f"report not sent via {spec.smtp.host}:{spec.smtp.port}: {e}") from None
        click.echo(f"sent to {', '.join(spec.to)}: {built.subject}")
    sys.exit(0 if built.health.verdict == "OK" else 1)

