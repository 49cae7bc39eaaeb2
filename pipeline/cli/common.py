"""What every command module shares: the ``-t/--topology`` option and loading the topology."""
from __future__ import annotations

import click

topology_option = click.option(
    "-t", "--topology", "topology_path", default="topology.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="The topology file.")


def echo_err(line: str) -> None:
    """Print one progress line on stderr (the ``log`` of the operations the commands run)."""
    click.echo(line, err=True)


def load(topology_path: str):
    """Load the topology, turning its error into the one-line CLI form."""
    from pipeline.config import load_topology
    return load_topology(topology_path)


def load_for_stage(topology_path: str, stage: str):
    """Load the topology and check that it has ``stage`` (a usage error naming the stages otherwise)."""
    topology = load(topology_path)
    if stage not in topology.stages:
        raise click.BadParameter(f"no stage {stage!r} in {topology_path} (stages: {', '.join(topology.stages)})",
                                 param_hint="STAGE")
    return topology
