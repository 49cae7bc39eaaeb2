"""Middleware: cross-cutting behaviour hooked into the worker runtime (docs/ARCHITECTURE.md).

A middleware subclasses :class:`Middleware` and overrides the hooks it needs;
every hook is a no-op by default. ``before_*`` hooks run in the order the
middleware was added, ``after_*`` hooks in reverse. A hook that raises is
logged at ``critical`` with its traceback and does not stop the worker: a
metrics bug must never lose a message.

Example::

    class CountDeadLetters(Middleware):
        def __init__(self):
            self.count = 0

        def after_dead_letter(self, worker, message, reason):
            self.count += 1

    Worker(topology, "primes", middleware=[CountDeadLetters()])
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.stage import Batch

log = logging.getLogger(__name__)


class WorkerView(Protocol):
    """What a hook may read of the worker that calls it (a :class:`pipeline.runtime.worker.Worker`).

    The spec, topology, reader and publisher are typed loosely: their classes
    live in layers above this module (config, client).
    """

    @property
    def name(self) -> str:
        """The stage's name."""

    @property
    def replica(self) -> int:
        """This replica's number."""

    @property
    def spec(self) -> Any:
        """The stage's topology entry (a :class:`pipeline.config.schema.StageSpec`)."""

    @property
    def topology(self) -> Any:
        """The loaded topology (a :class:`pipeline.config.topology.Topology`)."""

    @property
    def input_topic(self) -> str:
        """The topic this replica consumes (its partition's, for a keyed stage)."""

    @property
    def stats(self) -> Mapping[str, int]:
        """The runtime's counters (messages received, finished, requeued, ...)."""

    @property
    def reader(self) -> Any:
        """The subscription to the input topic (a ``FastReader``; None before the worker starts)."""

    @property
    def publisher(self) -> Any:
        """The publisher of outputs and dead letters (None before the worker starts)."""

    @property
    def draining(self) -> bool:
        """Whether the worker is draining (SIGTERM or ``stop()``)."""


class Middleware:
    """Base class of worker middleware; override the hooks you need."""

    def after_worker_boot(self, worker: WorkerView) -> None:
        """Called once the worker is connected and about to consume."""

    def before_worker_shutdown(self, worker: WorkerView) -> None:
        """Called when the worker starts draining (SIGTERM or stop())."""

    def after_receive(self, worker: WorkerView, message: Any) -> None:
        """Called for each message as it arrives, before it is batched."""

    def before_process_batch(self, worker: WorkerView, batch: Batch) -> None:
        """Called with the decoded batch before the stage's handler runs."""

    def after_process_batch(self, worker: WorkerView, batch: Batch, *,
                            result: Mapping[str, list[Any]] | None, exception: BaseException | None) -> None:
        """Called after the handler ran, with what it emitted or what it raised."""

    def after_dead_letter(self, worker: WorkerView, message: Any, reason: str) -> None:
        """Called for each message routed to the dead-letter topic."""

    def before_publish(self, worker: WorkerView, outputs: Mapping[str, Sequence[bytes]]) -> None:
        """Called before a batch's outputs and dead letters are published."""

    def after_publish(self, worker: WorkerView, outputs: Mapping[str, Sequence[bytes]], *,
                      exception: BaseException | None) -> None:
        """Called when nsqd acknowledged the outputs (or the publish failed), before FIN/REQ."""

    def after_ack(self, worker: WorkerView, finished: Sequence[Any], requeued: Sequence[Any]) -> None:
        """Called after the batch's messages were finished or requeued."""


class MiddlewareStack:
    """Runs the hooks of several middleware in order, isolating their failures."""

    def __init__(self, middleware: Iterable[Middleware] = ()):
        self.middleware = list(middleware)
        self._hooked: dict[str, list[Middleware]] = {}  # hook -> the middleware that override it, in order

    def add(self, middleware: Middleware) -> None:
        """Append ``middleware``: its before-hooks run last, its after-hooks first."""
        self.middleware.append(middleware)
        self._hooked.clear()

    def implements(self, hook: str) -> bool:
        """Whether some middleware overrides ``hook`` (so a per-message hook costs nothing when none does)."""
        return bool(self._implementers(hook))

    def _implementers(self, hook: str) -> list[Middleware]:
        found = self._hooked.get(hook)
        if found is None:
            base = getattr(Middleware, hook)
            found = self._hooked[hook] = [m for m in self.middleware if getattr(type(m), hook, base) is not base]
        return found

    def emit_before(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` on every middleware that overrides it, in order."""
        for m in self._implementers(hook):
            self._call(m, hook, args, kwargs)

    def emit_after(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` on every middleware that overrides it, in reverse order."""
        for m in reversed(self._implementers(hook)):
            self._call(m, hook, args, kwargs)

    @staticmethod
    def _call(m: Middleware, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            getattr(m, hook)(*args, **kwargs)
        except Exception:
            log.critical("middleware %s.%s failed", type(m).__name__, hook, exc_info=True)
