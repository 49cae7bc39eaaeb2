"""nsq-pipeline: streaming stages on real NSQ.

What a user writes against: the stage contract, middleware, the topology and
the errors. A stage is a function from a batch to what it emits::

    from pipeline import Batch, Emit

    def classify(batch: Batch) -> Emit:
        return {"even": [r for r in batch.records if r["n"] % 2 == 0]}

and ``topology.yaml`` names it (``handler: mystages:classify``); ``pipeline up``
runs it, and :mod:`pipeline.testing` runs it in a test (``run_stage``) with the
runtime's own rules. The names are imported on first use, so ``import pipeline`` (and so
every ``pipeline`` command) does not load numpy or the topology schema until
something needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.errors import (
    DecodeError,
    HandlerLoadError,
    PipelineError,
    PublishError,
    PublishRefused,
    StageOutputError,
    StageStateError,
    TopologyError,
)

if TYPE_CHECKING:
    from pipeline.client.producer import Producer
    from pipeline.config import Topology, load_topology
    from pipeline.middleware import Middleware
    from pipeline.stage import Batch, Columns, Emit, Handler, Record, StageContext, StatefulStage, plain

__version__ = "0.1.0"

#: Public name -> the module it is imported from on first use.
_LAZY = {
    **dict.fromkeys(["Batch", "Columns", "Emit", "Handler", "Record", "StageContext", "StatefulStage", "plain"],
                    "pipeline.stage"),
    "Middleware": "pipeline.middleware",
    **dict.fromkeys(["Topology", "load_topology"], "pipeline.config"),
    "Producer": "pipeline.client.producer",
}

__all__ = [
    "Batch", "Columns", "DecodeError", "Emit", "Handler", "HandlerLoadError", "Middleware", "PipelineError",
    "Producer", "PublishError", "PublishRefused", "Record", "StageContext", "StageOutputError", "StageStateError",
    "StatefulStage", "Topology", "TopologyError", "__version__", "load_topology", "plain",
]


def __getattr__(name: str) -> Any:
    """Import a public name of :data:`_LAZY` from its module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
