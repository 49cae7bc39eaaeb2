"""Testing a project's own stages: run one in-process with the runtime's rules, check it, run a topology.

Layer 7, beside ``pipeline.cli``: may import every layer; nothing imports it but users' tests.
Its pytest fixtures are the plugin ``pipeline`` (:mod:`.fixtures`). Map: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.testing.checks import assert_columns_match, check_keyed, redelivered
    from pipeline.testing.cluster import NsqCluster, RunningTopology, copy_topology
    from pipeline.testing.runner import DeadRecord, StageRun, StageRunner, make_runner, run_stage, stage_topology

#: Public name -> its module. Imported on first use: the pytest plugin (``.fixtures``) is loaded by
#: every pytest run of the environment, and its package must not load the runtime for it.
_LAZY = {
    **dict.fromkeys(["DeadRecord", "StageRun", "StageRunner", "make_runner", "run_stage", "stage_topology"],
                    "pipeline.testing.runner"),
    **dict.fromkeys(["assert_columns_match", "check_keyed", "redelivered"], "pipeline.testing.checks"),
    **dict.fromkeys(["NsqCluster", "RunningTopology", "copy_topology"], "pipeline.testing.cluster"),
}

__all__ = [
    "DeadRecord", "NsqCluster", "RunningTopology", "StageRun", "StageRunner", "assert_columns_match", "check_keyed",
    "copy_topology", "make_runner", "redelivered", "run_stage", "stage_topology",
]


def __getattr__(name: str) -> Any:
    """Import a public name of :data:`_LAZY` from its module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
