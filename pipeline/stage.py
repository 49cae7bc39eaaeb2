"""The stage contract: a function from a batch of decoded records to what it emits.

A stage is any callable ``handler(batch) -> Emit``::

    from pipeline.stage import Batch, Emit

    def classify(batch: Batch) -> Emit:
        out = {"even": [], "odd": []}
        for i, record in enumerate(batch.records):
            n = record.get("n")
            if not isinstance(n, int):
                batch.reject(i, "field 'n' must be an integer")
                continue
            out["even" if n % 2 == 0 else "odd"].append(record)
        return out

The runtime owns acknowledgement: a stage never finishes or requeues a message.
It returns the records to publish, keyed by output topic, and raises when it
cannot process the batch (the runtime then retries, and dead-letters a record
that keeps failing). A record that can never succeed (bad input) is passed to
:meth:`Batch.reject` with a reason; the runtime dead-letters it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import HandlerLoadError

Record = dict[str, Any]
Emit = Mapping[str, list[Record]]
Handler = Callable[["Batch"], Emit]


@dataclass
class Batch:
    """The decoded records a stage processes in one call.

    Parameters:
        records: the decoded records, in arrival order.
        stage: the stage's name, for messages and metrics.
        rejected: index -> reason for records the stage refused (filled by :meth:`reject`).
    """

    records: list[Record]
    stage: str = ""
    rejected: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def reject(self, index: int, reason: str) -> None:
        """Mark record ``index`` as invalid; the runtime dead-letters it with ``reason``."""
        self.rejected[index] = reason


def load_handler(path: str) -> Handler:
    """Import the stage function named by ``module.path:function``.

    Raises:
        HandlerLoadError: the module cannot be imported or the name is not callable.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise HandlerLoadError(f"handler {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HandlerLoadError(f"handler {path!r}: cannot import {module_name!r}: {e}") from e
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise HandlerLoadError(f"handler {path!r}: {module_name!r} has no callable {attr!r}")
    return handler
