"""The ``pipeline`` command line.

Every command takes ``-t/--topology`` (default ``./topology.yaml``). A bad
argument or a bad topology exits non-zero with one readable line.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click
from pipeline.errors import PipelineError

topology_option = click.option(
    "-t", "--topology", "topology_path", default="topology.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="The topology file.")


class OneLineErrors(click.Group):
    """A click group whose usage and pipeline errors print as one line on stderr."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            return super().main(args, prog_name or "pipeline", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("pipeline: aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else "pipeline: "
            click.echo(f"{where}{e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except PipelineError as e:
            click.echo(f"pipeline: {e}", err=True)
            sys.exit(1)


def load(topology_path: str):
    """Load the topology, turning its error into the one-line CLI form."""
    from pipeline.config.topology import load_topology
    return load_topology(topology_path)


def load_for_stage(topology_path: str, stage: str):
    """Load the topology and check that it has ``stage`` (a usage error naming the stages otherwise)."""
    topology = load(topology_path)
    if stage not in topology.stages:
        raise click.BadParameter(f"no stage {stage!r} in {topology_path} (stages: {', '.join(topology.stages)})",
                                 param_hint="STAGE")
    return topology


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug output.")
def main(verbose: bool) -> None:
    """nsq-pipeline: streaming stages on real NSQ."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # pynsq logs every IDENTIFY and heartbeat at INFO
        logging.getLogger("nsq").setLevel(logging.WARNING)


@main.command()
@topology_option
def check(topology_path: str) -> None:
    """Validate the topology file; print every error as FILE:LINE:COL: field: reason."""
    from pipeline.config.topology import validate_topology
    errors = validate_topology(topology_path)
    for error in errors:
        click.echo(str(error), err=True)
    if errors:
        sys.exit(1)
    from pipeline.config.security import exposure_warnings
    for warning in exposure_warnings(load(topology_path)):
        click.echo(f"{topology_path}: warning: {warning}", err=True)
    click.echo(f"{topology_path}: ok")


@main.command("install-nsq")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the binaries (default: this environment's bin folder).")
def install_nsq_cmd(dest: Path | None) -> None:
    """Install nsqd, nsqlookupd, nsqadmin, nsq_tail, nsq_stat and nsq_to_nsq v1.3.0."""
    from pipeline.ops.install import install_nsq
    path = install_nsq(dest, log=lambda line: click.echo(line, err=True))
    click.echo(str(path))


@main.command("install-toxiproxy")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the binaries (default: this environment's bin folder).")
def install_toxiproxy_cmd(dest: Path | None) -> None:
    """Install toxiproxy-server and toxiproxy-cli (pinned) for the chaos harness."""
    from pipeline.ops.install_toxiproxy import install_toxiproxy
    path = install_toxiproxy(dest, log=lambda line: click.echo(line, err=True))
    click.echo(str(path))


@main.command()
@click.argument("stage")
@click.option("--replica", type=click.IntRange(min=0), default=0, show_default=True,
              help="This replica's number.")
@topology_option
def worker(stage: str, replica: int, topology_path: str) -> None:
    """Run one replica of STAGE until SIGTERM (then drain and exit 0)."""
    from pipeline.records import jit
    jit.defer()  # compiled kernels load after the worker is consuming (see pipeline.records.jit)
    from pipeline.stage import StageContext, load_handler
    topology = load_for_stage(topology_path, stage)
    spec = topology.stage(stage)
    # The handler is imported before the runtime so a broken one fails within
    # supervisord's startsecs and the crash loop gets back-off, not instant restarts.
    handler = load_handler(spec.handler, StageContext(stage, replica, topology.var_dir, dict(spec.params)))
    from pipeline.runtime.worker import Worker
    sys.exit(Worker(topology, stage, replica=replica, handler=handler).run())


@main.group()
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
    from producers.numbers import produce_numbers
    topology = load(topology_path)
    spec = topology.producers.get(producer_name)
    if spec is None:
        raise click.BadParameter(f"no producer {producer_name!r} in {topology_path}", param_hint="--producer")
    address = topology.nsqd_tcp_addresses()  # several nodes: spread round-robin, with failover
    with _progress(f"publishing to {spec.topic}", count) as advance:
        acked = produce_numbers(address, spec.topic, start, count, rate=rate or spec.rate, chunk=spec.chunk,
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
    from producers.ticks import parse_speed, produce_ticks, replay_ticks, synthetic_ticks
    if (replay_path is None) == (count is None):
        raise click.UsageError("give either --count (synthetic ticks) or --replay FILE")
    try:
        parse_speed(speed)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--speed") from None
    topology = load(topology_path)
    spec = topology.producers.get(producer_name)
    if spec is None:
        raise click.BadParameter(f"no producer {producer_name!r} in {topology_path}", param_hint="--producer")
    if replay_path:
        total = sum(1 for _ in replay_ticks(replay_path))  # a bad file fails here, before anything is sent
        records = replay_ticks(replay_path, run_id=run_id)
    else:
        total, records = count, synthetic_ticks(symbols, count, seed=seed, run_id=run_id)
    address = topology.nsqd_tcp_addresses()  # several nodes: partitions spread, with failover
    with _progress(f"publishing to {spec.topic}", total) as advance:
        acked = produce_ticks(address, spec.topic, records, spec=topology.topics[spec.topic],
                              rate=rate or (spec.rate if speed == "max" else 0), speed=speed, chunk=spec.chunk,
                              on_progress=advance, linger_ms=linger_ms,
                              security=_security(topology, producer_name))
    click.echo(f"published {acked} ticks to {spec.topic} on {', '.join(address)}")


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="Where to write the config ('-': stdout).")
@click.option("--compose", is_flag=True,
              help="Render the docker compose file instead (addresses must name their services).")
@topology_option
def render(output: str, compose: bool, topology_path: str) -> None:
    """Print the supervisord configuration of the topology (or, with --compose, its compose file)."""
    if compose:
        from pipeline.ops.compose import render_compose as render_text
    else:
        from pipeline.ops.supervisor_conf import render as render_text
    text = render_text(load(topology_path))
    if output == "-":
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text)


@main.command()
@topology_option
def up(topology_path: str) -> None:
    """Start (or update) the pipeline under supervisord and wait until it runs."""
    from pipeline.ops.control import Supervisor
    from pipeline.observe.views import console, print_processes
    topology = load(topology_path)
    processes = Supervisor(topology).up(log=lambda line: click.echo(line, err=True))
    print_processes(topology, processes, console())


@main.command()
@topology_option
def down(topology_path: str) -> None:
    """Stop workers (they drain), then nsqadmin, nsqd, nsqlookupd, then supervisord."""
    from pipeline.ops.control import Supervisor
    Supervisor(load(topology_path)).down(log=lambda line: click.echo(line, err=True))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@topology_option
def status(as_json: bool, topology_path: str) -> None:
    """Show processes and topic/channel figures; exit 1 unless everything is healthy."""
    import orjson

    from pipeline.observe.status import collect
    from pipeline.observe.views import console, print_status
    report = collect(load(topology_path))
    if as_json:
        click.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print_status(report, console())
    sys.exit(0 if report.healthy else 1)


@main.command(context_settings={"ignore_unknown_options": True})  # so "-1" reaches the range check
@click.argument("stage")
@click.argument("replicas", type=click.IntRange(min=1, max=64))
@topology_option
def scale(stage: str, replicas: int, topology_path: str) -> None:
    """Set STAGE's replicas in the topology file and apply it to the running pipeline."""
    from pipeline.ops.scale import scale as scale_stage
    topology = load_for_stage(topology_path, stage)
    scale_stage(topology, stage, replicas, log=lambda line: click.echo(line, err=True))


@main.command()
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


@main.command()
@click.argument("topic")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None,
              help="Stop after COUNT records (default: follow until Ctrl-C).")
@topology_option
def tail(topic: str, count: int | None, topology_path: str) -> None:
    """Print TOPIC's records as they are published, one JSON line each (JSON and msgpack decoded)."""
    from pipeline.observe.tail import tail_topic
    tail_topic(load(topology_path), topic, count=count, out=sys.stdout)


@main.command()
@click.option("--count", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Publish the numbers 1..COUNT.")
@topology_option
def demo(count: int, topology_path: str) -> None:
    """Start the topology, classify 1..COUNT into prime/non_prime, show the result."""
    from rich.console import Console

    from pipeline.cli.demo import print_market, print_summary, run_demo, run_market_demo
    topology = load(topology_path)
    out = Console()
    result = run_demo(topology, count, console=out)
    if "ticks" in topology.topics and "features" in topology.stages:
        print_market(run_market_demo(topology, out), out)
    print_summary(topology, result, out)


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args: tuple[str, ...]) -> None:
    """Measure throughput side by side with the baselines (`pipeline bench --help` for options)."""
    from benchmarks.run import main as run_bench
    sys.exit(run_bench(list(bench_args), prog="pipeline bench"))


@main.command()
@click.option("--interval", type=click.FloatRange(min=0.05), default=None,
              help="Seconds between samples (default: monitor.interval of the topology).")
@topology_option
def monitor(interval: float | None, topology_path: str) -> None:
    """Sample NSQ, supervisord, workers and the host into health.db; serve NSQ metrics; send the daily report."""
    import signal

    from pipeline.observe.monitor import Monitor
    from pipeline.config.topology import load_topology
    running = Monitor(load_topology(topology_path, environment=True), interval=interval)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: running.stop())
    running.run()


@main.command()
@click.option("--since", default="24h", show_default=True, help="How far back: 24h, 90m, 2d ...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.txt, report.html and report.eml into this folder.")
@click.option("--send", is_flag=True, help="Send it to the topology's report recipients.")
@topology_option
def report(since: str, out_dir: Path | None, send: bool, topology_path: str) -> None:
    """Build the health report from health.db now (prints the text unless --out or --send)."""
    import time

    from pipeline.observe.healthdb import HealthDB
    from pipeline.observe.report import build_report, parse_duration, render_text, to_email, write_files
    from pipeline.config.topology import load_topology
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
    if out_dir is not None:
        for path in write_files(built, out_dir, *((spec.sender, list(spec.to)) if spec else ())):
            click.echo(str(path))
    if send:
        import smtplib

        from pipeline.observe.mailer import send_email
        try:
            send_email(spec, to_email(built, spec.sender, list(spec.to)))
        except (OSError, smtplib.SMTPException) as e:
            raise click.ClickException(f"report not sent via {spec.smtp.host}:{spec.smtp.port}: {e}") from None
        click.echo(f"sent to {', '.join(spec.to)}: {built.subject}")
    if out_dir is None and not send:
        click.echo(render_text(built), nl=False)
    sys.exit(0 if built.health.verdict == "OK" else 1)


@main.command()
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


@main.group()
def chaos() -> None:
    """Chaos experiments: faults injected while the checker counts what is lost."""


@chaos.command("list")
def chaos_list() -> None:
    """List the scenarios in chaos/scenarios with their titles (and any validation errors)."""
    from chaos.scenario import list_scenarios, validate_scenario
    for path in list_scenarios():
        scenario, problems = validate_scenario(path)
        click.echo(f"{path.stem:28} {scenario.title if scenario else problems[0]}")


@chaos.command("run")
@click.argument("scenario_name", metavar="SCENARIO")
@click.option("--seed", type=int, default=None, help="Seed of the fault schedule (default: random, printed).")
@click.option("--records", type=click.IntRange(min=1), default=None, help="Records to publish (scenario's default).")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None, help="Seconds of faults (scenario's default).")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the run's topology, logs, journal and report go (default: var/chaos/NAME-SEED-TIME).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result as RELIABILITY.md-style Markdown to this file.")
def chaos_run(scenario_name: str, seed: int | None, records: int | None, duration: float | None,
              folder: Path | None, markdown: Path | None) -> None:
    """Run SCENARIO (a name from `pipeline chaos list` or a file); exit 1 unless it passes."""
    import random

    from rich.console import Console

    from chaos.report import print_result, write_reliability
    from chaos.run import run_scenario
    from chaos.scenario import find_scenario, load_scenario
    scenario = load_scenario(find_scenario(scenario_name))  # every problem is reported before anything starts
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    result = run_scenario(scenario, seed=seed, records=records, duration=duration, folder=folder,
                          log=lambda line: click.echo(f"chaos: {line}", err=True))
    print_result(result, Console())
    if markdown is not None:
        write_reliability([result], markdown)
    sys.exit(0 if result.passed else 1)


@chaos.command("suite")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of every run's fault schedule.")
@click.option("--soak-records", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Records of the soak (scenario 1 combined with 5-7).")
@click.option("--soak-duration", type=click.FloatRange(min=0.1), default=None,
              help="Seconds of faults in the soak (default: the scenario's).")
@click.option("--only-soak", is_flag=True, help="Run the soak alone.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/RELIABILITY.md"),
              show_default=True, help="Where to write the reliability report.")
def chaos_suite(seed: int, soak_records: int, soak_duration: float | None, only_soak: bool, markdown: Path) -> None:
    """Run every scenario in full, then the soak; write the reliability report; exit 1 unless all pass."""
    from rich.console import Console

    from chaos.report import print_result, write_reliability
    from chaos.run import run_scenario
    from chaos.scenario import list_scenarios, load_scenario
    scenarios = [load_scenario(p) for p in list_scenarios()]  # all validated before any runs
    results = []
    for scenario in scenarios:
        if scenario.name != "soak" and only_soak:
            continue
        records, duration = (soak_records, soak_duration) if scenario.name == "soak" else (None, None)
        result = run_scenario(scenario, seed=seed, records=records, duration=duration,
                              log=lambda line, n=scenario.name: click.echo(f"chaos {n}: {line}", err=True))
        print_result(result, Console())
        results.append(result)
        write_reliability(results, markdown)
    click.echo(f"wrote {markdown}")
    sys.exit(0 if all(r.passed for r in results) else 1)


@chaos.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
def chaos_check(paths: tuple[str, ...]) -> None:
    """Validate scenario files; print every error as FILE:LINE:COL: field: reason."""
    from chaos.scenario import validate_scenario
    failed = False
    for path in paths:
        for problem in validate_scenario(path)[1]:
            click.echo(str(problem), err=True)
            failed = True
    if failed:
        sys.exit(1)
    click.echo(f"{len(paths)} scenario(s) ok")


@main.command()
@click.option("--missing", is_flag=True, required=True, help="Republish acknowledged records that never arrived.")
@click.option("--run", "run_folder", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="The chaos run's folder (journal.jsonl, arrivals.jsonl).")
@click.option("--topic", default="numbers", show_default=True, help="The input topic to republish to.")
@click.option("--nsqd", "nsqd_tcp", default=None, help="nsqd TCP address (default: the run's topology's nsqd).")
def replay(missing: bool, run_folder: Path, topic: str, nsqd_tcp: str | None) -> None:
    """Republish the records a chaos run's journal says nsqd acknowledged but no sink saw."""
    from chaos.replay import replay_missing
    if nsqd_tcp is None:
        nsqd_tcp = load(str(run_folder / "topology.yaml")).nsq.nsqd[0].tcp
    count = replay_missing(run_folder, nsqd_tcp, topic)
    click.echo(f"replayed {count} missing records to {topic} on {nsqd_tcp}")


@main.command()
@topology_option
def gateway(topology_path: str) -> None:
    """Serve the authenticated /pub and /mpub edge of the topology's gateway section until SIGTERM."""
    _serve_section(topology_path, "gateway", "pipeline.edge.gateway_http")


@main.command("auth-server")
@topology_option
def auth_server(topology_path: str) -> None:
    """Answer nsqd's --auth-http-address from the topology's identities until SIGTERM."""
    _serve_section(topology_path, "auth", "pipeline.edge.authserver")


def _serve_section(topology_path: str, section: str, module: str) -> None:
    """Run ``module.serve`` for the topology, which must have ``section``."""
    import asyncio
    import importlib

    topology = load(topology_path)
    if getattr(topology, section) is None:
        raise click.UsageError(f"{topology_path} has no {section} section")
    asyncio.run(importlib.import_module(module).serve(topology))


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/tls"),
              show_default=True, help="Folder for the CA, nsqd's and the clients' certificates and keys.")
@click.option("--host", "hosts", multiple=True, default=("127.0.0.1", "localhost"), show_default=True,
              help="A host name or IP address nsqd's certificate is valid for (repeatable).")
def certs(out_dir: Path, hosts: tuple[str, ...]) -> None:
    """Create a development CA and certificates for TLS between the pipeline and nsqd."""
    from pipeline.ops.certs import create_dev_certs
    paths = create_dev_certs(out_dir, list(hosts))
    click.echo(f"wrote a CA, nsqd's certificate ({', '.join(hosts)}) and a client certificate to {out_dir}/;"
               " add to topology.yaml:", err=True)
    click.echo(paths.topology_section(), nl=False)


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


