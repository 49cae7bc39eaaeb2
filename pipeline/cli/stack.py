"""Commands that run a topology: check, render, up, down, status, scale, worker and restart."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.common import echo_err, load, load_for_stage, topology_option


@click.command()
@click.option("--no-import", is_flag=True, help="Validate the file only; do not import the stages' handlers.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds the handlers may take to import.")
@topology_option
def check(no_import: bool, timeout: float, topology_path: str) -> None:
    """Validate the topology file, then import and build every stage's handler as its worker will.

    Nothing is started or published. Every problem prints as FILE:LINE:COL: field: reason; exit 1 if any.
    """
    from pipeline.config import validate_topology
    errors = validate_topology(topology_path)
    if not errors:
        from pipeline.config.security import exposure_warnings
        for warning in exposure_warnings(load(topology_path)):
            click.echo(f"{topology_path}: warning: {warning}", err=True)
        if not no_import:
            from pipeline.ops.handlers import check_handlers
            errors = check_handlers(topology_path, timeout=timeout)
    for error in errors:
        click.echo(str(error), err=True)
    if errors:
        sys.exit(1)
    click.echo(f"{topology_path}: ok")


@click.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="Where to write the config ('-': stdout).")
@click.option("--compose", is_flag=True,
              help="Render the docker compose file instead (addresses must name their services).")
@topology_option
def render(output: str, compose: bool, topology_path: str) -> None:
    """Print the supervisord configuration of the topology (or, with --compose, its compose file)."""
    from pipeline.ops.compose import render_compose
    from pipeline.ops.supervisor_conf import render
    text = (render_compose if compose else render)(load(topology_path))
    if output == "-":
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text)


@click.command()
@topology_option
def up(topology_path: str) -> None:
    """Start (or update) the pipeline under supervisord and wait until it runs."""
    from pipeline.observe.views import console, print_processes
    from pipeline.ops.control import Supervisor
    topology = load(topology_path)
    processes = Supervisor(topology).up(log=echo_err)
    print_processes(topology, processes, console())


@click.command()
@topology_option
def down(topology_path: str) -> None:
    """Stop workers (they drain), then nsqadmin, nsqd, nsqlookupd, then supervisord."""
    from pipeline.ops.control import Supervisor
    Supervisor(load(topology_path)).down(log=echo_err)


@click.command()
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


@click.command(context_settings={"ignore_unknown_options": True})  # so "-1" reaches the range check
@click.argument("stage")
@click.argument("replicas", type=click.IntRange(min=1, max=64))
@topology_option
def scale(stage: str, replicas: int, topology_path: str) -> None:
    """Set STAGE's replicas in the topology file and apply it to the running pipeline."""
    from pipeline.ops.scale import scale as scale_stage
    topology = load_for_stage(topology_path, stage)
    scale_stage(topology, stage, replicas, log=echo_err)


@click.command()
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


@click.command()
@click.argument("stages", metavar="[STAGE]...", nargs=-1)
@click.option("--timeout", type=click.FloatRange(min=1), default=90.0, show_default=True,
              help="Seconds each replica has to be RUNNING and consuming again.")
@topology_option
def restart(stages: tuple[str, ...], timeout: float, topology_path: str) -> None:
    """Restart the replicas of STAGE (default: every stage) one at a time, so they load new code.

    Each replica drains on SIGTERM, starts again, and is consuming before the
    next one stops. One line per replica: old pid → new pid, seconds.
    """
    from pipeline.ops.restart import restart as roll
    topology = load(topology_path)
    unknown = [stage for stage in stages if stage not in topology.stages]
    if unknown:  # every name is checked before anything is restarted
        raise click.BadParameter(f"no stage {unknown[0]!r} in {topology_path} (stages: {', '.join(topology.stages)}); "
                                 "nothing restarted", param_hint="STAGE")
    roll(topology, stages, log=click.echo, timeout=timeout)
