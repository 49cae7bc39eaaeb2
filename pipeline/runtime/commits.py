"""A keyed replica's commits: its batches between their handler call and their FIN, in order.

See docs/ARCHITECTURE.md, "Keyed state".

A keyed replica runs its batches through the handler one at a time, as they
come, and publishes each batch's outputs at once; it does not wait for the
previous batch's checkpoint. The commits follow in batch order: once a batch's
publish (and every earlier one's) is acknowledged, the state as of that batch
is written (fsynced), then its messages are FINed. Batches acknowledged while
a checkpoint is due or being written share the next one (group commit), and
checkpoints are at least ``checkpoint_interval_ms`` apart. A failed publish
rewinds: every batch not yet committed is requeued and the state goes back to
the last checkpoint, as after a crash.

No batch costs a task or a loop turn of its own: :class:`CommitQueue` moves
on from callbacks (the publish's answer, the checkpoint write's end, a timer
for an idle replica). Between checkpoints it leaves nsqd's answers to the
publishes unread (:meth:`pipeline.client.publisher.Publisher.hold_answers`): they
are needed only for the next checkpoint, and reading each as it comes would
cost a wake-up and a read per batch.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.client.fastconn import when_read_done
from pipeline.config import StageSpec
from pipeline.errors import PublishError
from pipeline.runtime.keyed import Checkpoint

log = logging.getLogger(__name__)

HOLD_ANSWERS_MIN_S = 0.002  # answers are left unread only when the next checkpoint is further off

_WAITING = object()  # a commit's publish is not answered yet
_DROPPED = PublishError("the batch was requeued by a rewind")  # a rewound commit's answer no longer counts


@dataclass(slots=True)
class KeyedCommit:
    """One keyed batch between its handler call and its FIN."""

    finish: list  # the messages to FIN once committed
    retry: list  # requeued already (for the after_ack hook)
    outputs: dict[str, list[bytes]]
    # (sequencer state, handler snapshot) right after the handler call; None when not kept (see KeyedPath.apply)
    state: tuple[dict, bytes | None] | None
    answer: Any = _WAITING  # the publish's answer: None (acknowledged) or the error
    failed: bool = False  # the runtime failed on the batch (answer holds the exception)


class CommitHost(Protocol):
    """What a :class:`CommitQueue` calls back: the keyed path of its replica."""

    @property
    def draining(self) -> bool:
        """Whether the replica drains (the next checkpoint is then due at once)."""

    def hold_answers(self, hold: bool) -> None:
        """Leave nsqd's answers to the publishes unread (True), or read them as they come (False)."""

    def published(self, outputs: dict[str, list[bytes]]) -> None:
        """A commit's outputs are acknowledged; its checkpoint is about to be written."""

    def publish_failed(self, outputs: dict[str, list[bytes]], count: int, error: BaseException) -> None:
        """A commit's publish failed; :meth:`rewind` follows."""

    def finish(self, finished: list, requeued: list) -> None:
        """A commit's checkpoint is written: FIN its messages (``requeued`` were requeued before)."""

    def state_now(self) -> tuple[dict, bytes | None]:
        """The (sequencer state, handler snapshot) as of the last batch applied."""

    def rewind(self) -> None:
        """Requeue every queued commit (:meth:`CommitQueue.drop_all`) and go back to the last checkpoint."""


class CommitQueue:
    """The commits of one keyed replica (see the module's description).

    Parameters:
        host: called back as each commit is acknowledged, checkpointed and finished, or fails.
        spec: the stage's topology entry (``max_in_flight``, ``checkpoint_interval_ms``, ``publish_timeout``).
        checkpoint: the replica's checkpoint file.
        stats: the runtime's counters (``checkpoints`` is counted here).
        label: names the replica in logs (``stage NAME replica N``).
    """

    def __init__(self, host: CommitHost, spec: StageSpec, checkpoint: Checkpoint, stats: Counter[str], label: str):
        self.host, self.spec, self.checkpoint, self.stats, self.label = host, spec, checkpoint, stats, label
        self.commits: deque[KeyedCommit] = deque()
        self.done = asyncio.Event()  # set while no commit is queued or being written
        self.done.set()
        self.uncommitted = 0  # messages of the queued commits
        self._last_checkpoint = 0.0
        self._writing: asyncio.Future | None = None  # the checkpoint being written
        self._timer: asyncio.TimerHandle | None = None
        self._advance_due = False  # an advance waits for the end of the read in hand

    def add(self, commit: KeyedCommit) -> None:
        """Queue the commit of a batch just handled (before its publish starts: it may answer at once)."""
        self.commits.append(commit)
        self.uncommitted += len(commit.finish)
        self.done.clear()
        wait = self.checkpoint_wait()
        if wait <= 0 and self._timer is not None:
            # Due (or half the in-flight window waits): this batch takes the checkpoint timer's turn.
            self.checkpoint_now()
        elif commit.answer is not _WAITING:
            self.advance()
        elif wait > 0:
            self._wait_for_checkpoint(wait)

    def answered(self, commit: KeyedCommit, error: PublishError | None) -> None:
        """The answer to ``commit``'s publish: None when nsqd acknowledged every output, else the error."""
        if commit.answer is _DROPPED:
            return  # requeued by a rewind meanwhile
        commit.answer = error
        if self.commits and self.commits[0].answer is not _WAITING and not self._advance_due:
            # After the whole read: it may hold the answers of the batches behind this one too (held
            # answers come in together), and they then share this checkpoint.
            self._advance_due = True
            when_read_done(self._advance_after_read)

    def checkpoint_wait(self) -> float:
        """Seconds until the next checkpoint is due: checkpoint_interval_ms after the last one, or now when
        half the in-flight window waits for it or the worker drains."""
        if self.host.draining or self.uncommitted * 2 >= self.spec.max_in_flight:
            return 0.0
        return self._last_checkpoint + self.spec.checkpoint_interval_ms / 1000.0 - time.monotonic()

    def checkpoint_now(self) -> None:
        """Take the checkpoint now rather than when its timer says (its time came, or the worker drains)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.host.hold_answers(False)  # the answers come in now and move the commits on
        self.advance()

    def drop_all(self) -> deque[KeyedCommit]:
        """Take every queued commit out (a rewind requeues their messages); answers still to come are ignored."""
        commits, self.commits = self.commits, deque()
        self.uncommitted = 0
        for commit in commits:
            commit.answer = _DROPPED
        self.host.hold_answers(False)
        return commits

    def advance(self) -> None:
        """Commit what can be: the acknowledged batches at the head, in one checkpoint, once one is due."""
        if self._writing is not None:
            return  # the write's end comes back here
        commits, host = self.commits, self.host
        if not commits:
            host.hold_answers(False)  # nothing waits for them: no reason to leave them unread
            self.done.set()
            return
        head = commits[0]
        if head.answer is _WAITING:
            return
        if head.answer is not None:
            if not head.failed:  # else the runtime failed on the batch (logged already)
                host.publish_failed(head.outputs, len(head.finish), head.answer)
            host.rewind()
            return
        wait = self.checkpoint_wait()
        if wait > 0:
            self._wait_for_checkpoint(wait)
            return
        group, state = self._group()
        if not group:
            return  # the next answer comes back here; a batch applied meanwhile keeps its state
        for commit in group:
            host.published(commit.outputs)
            self.uncommitted -= len(commit.finish)
        self._last_checkpoint = time.monotonic()
        self.stats["checkpoints"] += 1
        # Encoded here: the thread only writes, with no GIL to take back and forth.
        data = self.checkpoint.encode(*state)  # type: ignore[misc]  # state is None only when group is empty
        self._writing = asyncio.get_running_loop().run_in_executor(None, self.checkpoint.write, data)
        self._writing.add_done_callback(functools.partial(self._checkpointed, group))

    def _group(self) -> tuple[list[KeyedCommit], tuple[dict, bytes | None] | None]:
        """Take the commits of the next checkpoint off the queue, with the state it holds ([] when none yet)."""
        state: tuple[dict, bytes | None] | None
        commits = self.commits
        acknowledged = 1
        while acknowledged < len(commits) and commits[acknowledged].answer is None:
            acknowledged += 1
        if acknowledged == len(commits):  # nothing applied after them: the state now is theirs
            state = self.host.state_now()
        else:
            kept = [i for i in range(acknowledged) if commits[i].state is not None]
            if not kept:
                return [], None
            acknowledged, state = kept[-1] + 1, commits[kept[-1]].state
        return [commits.popleft() for _ in range(acknowledged)], state

    def _wait_for_checkpoint(self, wait: float) -> None:
        """Come back when the next checkpoint is due; until then nsqd's answers to the publishes wait unread.

        The first batch after the checkpoint is due takes it (see :meth:`add`); the timer, set a little
        later, is for when no batch comes, so a steady stream pays no wake-up for it. The wait is bounded
        by half the publish timeout, so no answer is taken for missing.
        """
        if self._timer is None:
            later = wait + self.spec.checkpoint_interval_ms / 2000.0
            self._timer = asyncio.get_running_loop().call_later(min(later, self.spec.publish_timeout / 2),
                                                                 self.checkpoint_now)
        if wait >= HOLD_ANSWERS_MIN_S:
            self.host.hold_answers(True)

    def _advance_after_read(self) -> None:
        self._advance_due = False
        self.advance()

    def _checkpointed(self, group: list[KeyedCommit], written: asyncio.Future) -> None:
        """The checkpoint of ``group`` is written (or failed): FIN its messages (or rewind), then go on."""
        self._writing = None
        if written.exception() is not None:
            log.critical("%s: writing the checkpoint failed; rewinding", self.label, exc_info=written.exception())
            self.commits.extendleft(reversed(group))
            self.uncommitted += sum(len(commit.finish) for commit in group)
            self.host.rewind()
            return
        for commit in group:
            self.host.finish(commit.finish, commit.retry)
        self.advance()
