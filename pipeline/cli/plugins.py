"""The checkout's reference code, loaded at call time by the commands that run it.

``demo``, ``produce numbers|ticks``, ``chaos ...``, ``replay`` and ``bench`` run
code that sits beside the framework in the nsq-pipeline checkout
(``producers/``, ``chaos/``, ``benchmarks/``) and is not part of the installed
package. They import it through :func:`load_plugin`, by name, so the framework
never depends on it, and where it is absent the command fails with one line
that says where to find it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import click

#: The checkout's top-level modules the commands load, as the error names them.
REFERENCE = {
    "producers": "the reference producers",
    "chaos": "the chaos harness",
    "benchmarks": "the benchmarks",
}


class PluginMissing(click.ClickException):
    """Raised when a command needs a module of the checkout that cannot be imported here."""


def load_plugin(name: str) -> ModuleType:
    """Import ``name`` (such as ``"chaos.run"``) from the checkout's reference code.

    Raises:
        PluginMissing: its top-level package is not importable (exit 1, one line on stderr).
    """
    root = name.partition(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != root:
            raise
        context = click.get_current_context(silent=True)
        command = context.command_path if context is not None else "pipeline"
        raise PluginMissing(f"`{command}` needs {REFERENCE[root]} (module {root!r}), found in the nsq-pipeline "
                            "checkout; run it from there (with `make`, or as `python -m pipeline.cli ...` in its "
                            "folder)") from None
