"""Commands that serve the optional edge: gateway and auth-server."""
from __future__ import annotations

import click

from pipeline.cli.common import load, topology_option


@click.command()
@topology_option
def gateway(topology_path: str) -> None:
    """Serve the authenticated /pub and /mpub edge of the topology's gateway section until SIGTERM."""
    _serve_section(topology_path, "gateway", "pipeline.edge.gateway_http")


@click.command("auth-server")
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

