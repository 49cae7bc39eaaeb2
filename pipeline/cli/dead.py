"""``pipeline dead``: the stages' dead letters: list and show them (removing none), re-drive and purge them."""
from __future__ import annotations

import sys

import click

from pipeline.cli.common import echo_err, load, load_for_stage, topology_option


@click.group()
def dead() -> None:
    """Dead letters: list, show, re-drive and purge them."""


@dead.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@topology_option
def ls(as_json: bool, topology_path: str) -> None:
    """Per stage: its dead letters, the oldest, and their reasons with counts; removes none."""
    from pipeline.observe.deadletters import READ_LIMIT, print_summary, summarize
    rows = summarize(load(topology_path), limit=READ_LIMIT, log=echo_err)
    if as_json:
        import orjson
        click.echo(orjson.dumps([row.to_dict() for row in rows], option=orjson.OPT_INDENT_2).decode())
    else:
        print_summary(rows, sys.stdout)


@dead.command()
@click.argument("stage")
@click.option("-n", "--count", type=click.IntRange(min=1), default=10, show_default=True,
              help="Show up to COUNT letters, oldest first.")
@click.option("--reason", default=None, help="Only letters whose reason contains TEXT (any case).",
              metavar="TEXT")
@click.option("--json", "as_json", is_flag=True, help="Print each letter as its JSON object, one a line.")
@topology_option
def show(stage: str, count: int, reason: str | None, as_json: bool, topology_path: str) -> None:
    """Show STAGE's dead letters: reason, attempts, time, traceback and decoded body; removes none."""
    from pipeline.observe.deadletters import show_letters
    topology = load_for_stage(topology_path, stage)
    shown = show_letters(topology, stage, count=count, reason=reason, out=sys.stdout, as_json=as_json,
                         log=echo_err)
    if not shown:
        what = f" with {reason!r} in the reason" if reason else ""
        echo_err(f"no dead letters of {stage}{what} on {topology.dead_letter_topic(stage)}")


@dead.command()
@click.argument("stage")
@click.option("--reason", metavar="TEXT", help="Only letters whose reason contains TEXT; the others stay.")
@click.option("--limit", type=click.IntRange(min=1), help="Stop after N letters.")
@click.option("--dry-run", is_flag=True, help="Count what would be re-driven; change nothing.")
@click.option("--force", is_flag=True, help="Re-drive a keyed stage's letters too (README, \"Dead letters\").")
@click.option("--chunk", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="Letters re-driven per publish.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="At most this many letters a second.")
@topology_option
def redrive(stage: str, reason: str | None, limit: int | None, dry_run: bool, force: bool, chunk: int,
            rate: float | None, topology_path: str) -> None:
    """Republish STAGE's dead letters to its input, each finished only after nsqd's OK.

    A redrive killed halfway re-drives some letters twice when run again (the
    records keep their ids) and loses none. Prints the counts: re-driven,
    skipped (reason did not match), left.
    """
    from pipeline.ops.redrive import redrive as run
    topology = load_for_stage(topology_path, stage)
    click.echo(str(run(topology, stage, reason=reason, limit=limit, dry_run=dry_run, force=force, chunk=chunk,
                       rate=rate, log=echo_err)))


@dead.command()
@click.argument("stage")
@click.option("--yes", is_flag=True, help="Really remove them: nothing is removed without it.")
@topology_option
def purge(stage: str, yes: bool, topology_path: str) -> None:
    """Remove every dead letter of STAGE for good; prints how many."""
    topology = load_for_stage(topology_path, stage)
    if not yes:
        raise click.UsageError(f"this removes every dead letter of {stage} for good; nothing removed "
                               "(add --yes to remove them)")
    from pipeline.ops.redrive import purge as run
    click.echo(f"removed {run(topology, stage, log=echo_err)} dead letters of {stage}")
