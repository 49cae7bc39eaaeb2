"""The ``pipeline`` command group: options every command shares, one-line errors, and every command.

Every command takes ``-t/--topology`` (default ``./topology.yaml``). A bad
argument or a bad topology exits non-zero with one readable line.

:data:`COMMANDS` says where each command lives. A command's module is imported
only when the command runs (or ``--help`` lists them all), and each command
imports what it runs inside itself, so ``pipeline worker`` starts with little
more than click: a worker's restart time is measured (``make bench``).
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from pipeline.errors import PipelineError

#: Every command: its name and ``module:function`` in :mod:`pipeline.cli`, grouped by concept.
COMMANDS = {
    # a topology and its processes
    "init": "project:init", "check": "stack:check", "render": "stack:render", "up": "stack:up", "down": "stack:down",
    "status": "stack:status", "scale": "stack:scale", "restart": "stack:restart", "worker": "stack:worker",
    # watching it run
    "tail": "observe:tail", "peek": "observe:peek", "logs": "observe:logs", "top": "observe:top",
    "monitor": "observe:monitor", "report": "observe:report",
    # dead letters
    "dead": "dead:dead",
    # preparing a machine
    "install-nsq": "tools:install_nsq_cmd", "install-toxiproxy": "tools:install_toxiproxy_cmd", "certs": "tools:certs",
    # the optional edge
    "gateway": "edge:gateway", "auth-server": "edge:auth_server",
    # the checkout's reference code, loaded through pipeline.cli.plugins
    "produce": "produce:produce", "demo": "reference:demo", "chaos": "reference:chaos",
    "replay": "reference:replay", "bench": "reference:bench",
}


class OneLineErrors(click.Group):
    """A click group of the :data:`COMMANDS` whose usage and pipeline errors print as one line on stderr."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)

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


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug output.")
def main(verbose: bool) -> None:
    """nsq-pipeline: streaming stages on real NSQ."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # pynsq logs every IDENTIFY and heartbeat at INFO
        logging.getLogger("nsq").setLevel(logging.WARNING)
