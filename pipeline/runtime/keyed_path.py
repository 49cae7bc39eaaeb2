"""A keyed replica's batches: handler now, commit in order, restore and rewind, gaps given up.

A keyed stage's batches go through the handler one at a time, in order;
their commits (publish OK, then checkpoint, then FIN) follow in the same
order (:mod:`pipeline.runtime.commits`), so a checkpoint never holds
unpublished effects. :class:`KeyedPath` is the :class:`~pipeline.runtime.commits.CommitHost`
of its replica's commit queue. See docs/ARCHITECTURE.md, "Keyed state".
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tornado.ioloop import PeriodicCallback

from pipeline.client import nsqd_http
from pipeline.middleware import WorkerView
from pipeline.runtime.acks import Acks
from pipeline.runtime.commits import CommitQueue, KeyedCommit
from pipeline.runtime.keyed import Checkpoint, Sequencer
from pipeline.runtime.keyed_processing import KeyedEntry, KeyedProcessor

log = logging.getLogger(__name__)

GAP_CHECK_MS = 100  # how often a keyed stage looks for gaps that waited long enough


def new_sequencer(spec: Any) -> Sequencer:
    """An empty sequencer for a keyed stage's records, with the stage's gap limits."""
    return Sequencer(spec.gap_max_count, spec.gap_wait_ms, pack_item=KeyedEntry.pack, unpack_item=KeyedEntry.unpack)


class KeyedPath:
    """Takes a keyed replica's batches through the handler and its commit queue.

    Parameters:
        worker: the replica (its spec, topology, publisher and whether it drains).
        processor: the stage's keyed processor.
        checkpoint: the replica's checkpoint file.
        acks: how the replica answers its messages.
        spawn: runs a coroutine as one of the worker's tasks (a drain waits for them).
    """

    def __init__(self, worker: WorkerView, processor: KeyedProcessor, checkpoint: Checkpoint, acks: Acks,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Future]):
        self.worker, self.processor, self.checkpoint, self.acks, self.spawn = worker, processor, checkpoint, acks, spawn
        self.spec, self.stats = worker.spec, acks.stats
        self.label = f"stage {worker.name} replica {worker.replica}"
        self.queue: list = []  # messages batched and not yet through the handler
        self.commits = CommitQueue(self, self.spec, checkpoint, acks.stats, self.label)
        self.halted = False  # set after a runtime failure, until the commits rewound the state
        self.gaps_may_go = False  # set while a check found nsqd holding nothing more for the partition
        processor.may_give_up = lambda: self.gaps_may_go
        self._backlog_check: asyncio.Future | None = None
        self._gap_wait_logged = 0.0
        self._gap_timer: PeriodicCallback | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Restore the last checkpoint and start looking for gaps that waited long enough."""
        self.restore_checkpoint()
        self._gap_timer = PeriodicCallback(self._expire_gaps, GAP_CHECK_MS)
        self._gap_timer.start()

    def stop_gap_checks(self) -> None:
        """Look for expired gaps no more (the worker drains)."""
        if self._gap_timer is not None:
            self._gap_timer.stop()

    def close(self) -> None:
        """Close the checkpoint file (the worker stopped)."""
        self.checkpoint.close()

    # -- batches: handler now, commit in order -----------------------------------

    def take(self, messages: list) -> None:
        """Take one batch: through the handler at once, unless a rewind is due first."""
        self.queue += messages
        self.run()

    def run(self) -> None:
        """Take every queued message through the handler, in order (unless halted)."""
        while self.queue and not self.halted:
            messages, self.queue = self.queue, []
            self.apply(messages)

    def apply(self, messages: list) -> None:
        """Run one keyed batch through the handler, queue its commit and start its publish."""
        stats, processor, acks = self.stats, self.processor, self.acks
        stats["batches"] += 1
        stats["received"] += len(messages)
        try:
            outcome = processor.process(messages)
            for message in outcome.retry:
                acks.requeue_backoff(message)
            self._report_gaps()
            stats["duplicates"], stats["parked"] = processor.duplicates, processor.parked
            outputs = acks.outputs(outcome)
            # The state after this batch, when a checkpoint may need it before the batches behind it are
            # acknowledged; else only the last batch's state is ever written, taken when that is due.
            keep = not processor.columns_atomic or self.commits.checkpoint_wait() <= 0
            state = self.state_now() if keep else None
        except Exception as e:
            # A bug of ours, not of the stage: the state may be half-updated, so
            # nothing more goes through the handler until the commits before
            # this one are done and the state is back at the last checkpoint.
            log.critical("stage %s: batch of %d messages failed in the runtime; rewinding to the last checkpoint",
                         self.worker.name, len(messages), exc_info=True)
            self.halted = True
            self.commits.add(KeyedCommit(messages, [], {}, None, answer=e, failed=True))
            return
        acks.before_publish(outputs)
        commit = KeyedCommit(outcome.finish, outcome.retry, outputs, state)
        self.commits.add(commit)  # first: the publish may answer at once (no connection)
        self.worker.publisher.send(outputs, self.spec.publish_timeout, functools.partial(self.commits.answered, commit))

    # -- CommitHost ----------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """Whether the worker drains (its checkpoint is then due at once)."""
        return self.worker.draining

    def hold_answers(self, hold: bool) -> None:
        """Leave nsqd's answers to the publishes unread (True) or read them as they come."""
        self.worker.publisher.hold_answers(hold)

    def published(self, outputs: dict[str, list[bytes]]) -> None:
        """A commit's outputs are acknowledged."""
        self.acks.published(outputs)

    def publish_failed(self, outputs: dict[str, list[bytes]], count: int, error: BaseException) -> None:
        """A commit's publish failed (a rewind follows)."""
        self.acks.publish_failed(outputs, count, error)

    def finish(self, finished: list, requeued: list) -> None:
        """A commit's checkpoint is written: FIN its messages."""
        self.acks.finish(finished, requeued)

    def state_now(self) -> tuple[dict, bytes | None]:
        """The sequencer's and the stage's state as of the last batch applied, as a checkpoint holds them."""
        return self.processor.sequencer.state(), self.processor.handler_state()

    def rewind(self) -> None:
        """Requeue every batch not yet committed and go back to the last checkpoint, as after a crash.

        The handler already applied those batches; their redelivered records
        would otherwise be taken for duplicates and their outputs never published.
        """
        for commit in self.commits.drop_all():
            self.acks.requeue_now(commit.finish)
        self.restore_checkpoint()
        self.halted = False
        self.run()
        self.commits.advance()

    # -- state and gaps --------------------------------------------------------------

    def restore_checkpoint(self) -> None:
        """Load the last checkpoint into the sequencer and the stage (as at a restart)."""
        saved = self.checkpoint.load()
        processor = self.processor
        processor.sequencer = new_sequencer(self.spec)
        if saved is None:  # the first start: the initial state is what a rewind goes back to
            self.checkpoint.save(processor.sequencer.state(), processor.handler_state())
            return
        sequencer_state, handler_state = saved
        processor.sequencer.restore(sequencer_state)
        if hasattr(processor.handler, "restore"):
            processor.restore_handler(handler_state)
        log.info("%s restored its checkpoint (%d keys, %d records parked)", self.label,
                 len(processor.sequencer.applied), processor.sequencer.parked_count())

    def _report_gaps(self) -> None:
        gaps = self.processor.sequencer.gaps
        if gaps > self.stats["gaps"]:
            log.warning("%s: gave up %d missing seq(s) after waiting %d ms (%d in all); state now "
                        "differs from a run that had them", self.label, gaps - self.stats["gaps"],
                        self.spec.gap_wait_ms, gaps)
            self.stats["gaps"] = gaps

    def _expire_gaps(self) -> None:
        if not self.worker.draining and self._backlog_check is None and self.processor.sequencer.expiry_due():
            self._backlog_check = self.spawn(self._give_up_gaps_if_drained())

    async def _give_up_gaps_if_drained(self) -> None:
        """Give up the gaps that waited gap_max_ms, unless nsqd still holds messages that may fill them.

        A crashed replica's messages come back after msg_timeout at the end of
        the channel's queue: behind a backlog they can take far longer than
        gap_max_ms, and are still on their way, not lost.
        """
        try:
            backlog = await asyncio.to_thread(self._input_backlog)
            if backlog:
                self._log_waiting_gap(backlog)
                return
            self.gaps_may_go = True
            self.apply([])
        finally:
            self.gaps_may_go = False
            self._backlog_check = None

    def _input_backlog(self) -> int | None:
        """Messages nsqd holds for this replica's channel (None when an nsqd cannot say)."""
        total, topic = 0, self.worker.input_topic
        for http in self.worker.topology.nsqd_http_addresses():
            try:
                total += nsqd_http.channel_backlog(http, topic, self.spec.channel)
            except nsqd_http.NsqdHTTPError as e:
                log.warning("%s: cannot read the backlog of %s (%s); not giving up a gap", self.label, topic, e)
                return None
        return total

    def _log_waiting_gap(self, backlog: int | None) -> None:
        now = time.monotonic()
        if now - self._gap_wait_logged >= 10.0:
            self._gap_wait_logged = now
            log.info("%s: a gap waited %d ms; still waiting, %s messages queued for %s", self.label,
                     self.spec.gap_wait_ms, "unknown" if backlog is None else backlog, self.worker.input_topic)
