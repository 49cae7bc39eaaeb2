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
