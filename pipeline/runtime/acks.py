"""How a replica answers its messages: FIN after the publish, REQ now or with backoff, dead letters.

Shared by the plain path (:mod:`pipeline.runtime.worker`) and the keyed path
(:mod:`pipeline.runtime.keyed_path`); each answer updates the runtime's
counters and calls the middleware hooks that go with it. See
docs/ARCHITECTURE.md, "The stage contract".
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline.client.fastconn import finish_all
from pipeline.middleware import MiddlewareStack, WorkerView
from pipeline.runtime.processing import BatchProcessor, Dead, Outcome

log = logging.getLogger(__name__)

MAX_REQUEUE_DELAY = 3600.0


class Acks:
    """The answers of one replica to nsqd, with their counters and hooks.

    Parameters:
        worker: passed to the middleware hooks.
        processor: encodes the dead letters.
        stats: the runtime's counters (the worker's).
        dead_topic: the stage's dead-letter topic.
        middleware: the hooks to call.
    """

    def __init__(self, worker: WorkerView, processor: BatchProcessor, stats: Counter[str], dead_topic: str,
                 middleware: MiddlewareStack):
        self.worker, self.processor, self.stats = worker, processor, stats
        self.dead_topic, self.middleware = dead_topic, middleware
        self.name, self.requeue_delay = worker.name, worker.spec.requeue_delay

    def outputs(self, outcome: Outcome) -> dict[str, list[bytes]]:
        """What to publish for ``outcome``: its outputs and, under the dead-letter topic, its dead letters."""
        outputs = outcome.outputs
        if outcome.dead:
            outputs[self.dead_topic] = [self.dead_letter(dead) for dead in outcome.dead]
        return outputs

    def dead_letter(self, dead: Dead) -> bytes:
        """The dead-letter message for ``dead``, logged, counted and reported to the middleware."""
        self.stats["dead_lettered"] += 1
        message = dead.message
        where = "" if dead.index is None else f" (record {dead.index} of its envelope)"
        log.warning("stage %s: dead-lettering message %s%s after %d attempts: %s", self.name,
                    message.id.decode(errors="replace"), where, message.attempts, dead.reason)
        self.middleware.emit_after("after_dead_letter", self.worker, message, dead.reason)
        return self.processor.dead_letter(dead)

    def before_publish(self, outputs: dict[str, list[bytes]]) -> None:
        """Call the ``before_publish`` hooks with a batch's outputs."""
        self.middleware.emit_before("before_publish", self.worker, outputs)

    def published(self, outputs: dict[str, list[bytes]]) -> None:
        """nsqd acknowledged ``outputs``: count them and call the ``after_publish`` hooks."""
        self.middleware.emit_after("after_publish", self.worker, outputs, exception=None)
        for topic, bodies in outputs.items():
            self.stats[f"out:{topic}"] += len(bodies)

    def publish_failed(self, outputs: dict[str, list[bytes]], count: int, error: BaseException) -> None:
        """Publishing ``outputs`` failed; the ``count`` messages behind them are about to be requeued."""
        self.stats["publish_errors"] += 1
        log.warning("stage %s: publish failed, requeueing %d messages: %s", self.name, count, error)
        self.middleware.emit_after("after_publish", self.worker, outputs, exception=error)

    def finish(self, finished: Sequence[Any], requeued: Sequence[Any]) -> None:
        """FIN a batch's messages (its others, ``requeued``, were requeued already); call ``after_ack``."""
        finish_all(finished)
        self.stats["finished"] += len(finished)
        self.middleware.emit_after("after_ack", self.worker, finished, requeued)

    def finish_copies(self, messages: Sequence[Any]) -> None:
        """FIN second copies of a replicated topic's messages, whose first copy was (or is being) applied."""
        finish_all(messages)
        self.stats["copies_finished"] += len(messages)

    def requeue_now(self, messages: Sequence[Any]) -> None:
        """Requeue without delay or backoff: the failure was not the message's fault."""
        for message in messages:
            if not message.has_responded():
                message.requeue(backoff=False, time_ms=0)
        self.stats["requeued"] += len(messages)

    def requeue_backoff(self, message: Any) -> None:
        """Requeue a message the handler failed on, after ``requeue_delay`` doubled per earlier attempt."""
        delay = min(self.requeue_delay * 2 ** (message.attempts - 1), MAX_REQUEUE_DELAY)
        message.requeue(backoff=True, time_ms=int(delay * 1000))
        self.stats["requeued"] += 1
