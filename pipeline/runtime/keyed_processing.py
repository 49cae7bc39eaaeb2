"""A keyed stage's batch decisions: each key's records once and in ``seq`` order, the state kept exact.

:class:`KeyedProcessor` is the :class:`~pipeline.runtime.processing.BatchProcessor` of a keyed
stage; :class:`KeyedEntry` is a record parked in the checkpoint until the records before it come.
See docs/ARCHITECTURE.md, "Keyed state".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import StageStateError
from pipeline.records.codecs import decode
from pipeline.runtime.keyed import Sequencer
from pipeline.runtime.processing import (
    BatchProcessor,
    Dead,
    Failed,
    Outcome,
    ProcessingContext,
    batch_columns,
    record_body,
)
from pipeline.runtime.quarantine import Crash
from pipeline.stage import plain

_UNKNOWN = object()


@dataclass(eq=False, slots=True)
class KeyedEntry:
    """One keyed record and the message it came in, as much as its dead letter needs.

    A parked record outlives its message (finished once the checkpoint holds
    the record), so it carries the message's id and attempts itself.
    """

    record: dict
    id: bytes
    attempts: int
    body: bytes | None = None  # the message body, when the message carried this record alone
    index: int | None = None  # the record's position in its envelope

    def pack(self) -> list:
        """The entry as msgpack-able data, for the checkpoint (the message body itself when there is one)."""
        single = self.body is not None
        return [self.body if single else record_body(self.record), self.id, self.attempts, single, self.index]

    @classmethod
    def unpack(cls, data: list) -> KeyedEntry:
        source, message_id, attempts, single, index = data
        return cls(decode(source), message_id, attempts, source if single else None, index)

    def dead(self, reason: str, traceback: str | None = None) -> Dead:
        body = self.body if self.body is not None else record_body(self.record)
        return Dead(self, reason, body, self.index, traceback)


class KeyedProcessor(BatchProcessor):
    """A :class:`BatchProcessor` for keyed stages: per key in ``seq`` order, once, state kept exact.

    Records pass through a :class:`~pipeline.runtime.keyed.Sequencer`; only the ones it
    releases reach the handler, in order; the ones ahead of a gap are parked
    in the checkpoint. Every decoded message is therefore finished with its
    batch. A stateful handler is snapshotted before each call and restored
    when the call raises, so a failing call changes nothing; the failing
    record is then dead-lettered at once (a later retry would apply it after
    the records behind it). A record of a message a worker died holding
    (:mod:`~pipeline.runtime.quarantine`) is applied alone, in its place in
    the order, or, once the message has used up ``crash_tries``, dead-lettered
    without running: skipped like a record whose call raised.
    """

    def __init__(self, context: ProcessingContext, *, key_field: str, seq_field: str, sequencer: Sequencer):
        super().__init__(context)
        self.key_field, self.seq_field, self.sequencer = key_field, seq_field, sequencer
        self.columns_path = 0  # batches the columnar path took (see _process_in_order_columns)
        # Whether a gap that waited gap_max_ms may be given up now; the worker
        # allows it only when nsqd holds nothing more for the partition.
        self.may_give_up: Callable[[], bool] = lambda: True
        self.duplicates = self.parked = 0
        self._handler_state: Any = _UNKNOWN
        # The stage's columnar function declines only before it changes any state (see pipeline.stage):
        # no snapshot before each call, and the worker takes one only when a checkpoint needs it.
        self.columns_atomic = bool(getattr(self.handler, "columns_atomic", False)) and self.columns_handler is not None

    def process(self, messages: list) -> Outcome:
        """Sequence the batch's records (and any whose gap expired), apply what is ready, in order."""
        if self.columns_handler is not None and not self._crashed(messages):
            columnar = self._process_in_order_columns(messages)
            if columnar is not None:
                return columnar
        outcome = Outcome()
        ready: list[KeyedEntry] = []
        in_order, key_field, seq_field = self.sequencer.in_order, self.key_field, self.seq_field
        for unit in self._decode_all(messages, outcome):
            message = unit.message
            for i, record in enumerate(unit.records):
                entry = KeyedEntry(record, message.id, message.attempts,
                                   None if unit.packed else message.body, i if unit.packed else None)
                key, seq = record.get(key_field), record.get(seq_field)
                if type(seq) is int and type(key) is str and key and in_order(key, seq):
                    ready.append(entry)  # the next of its key: no Offer needed
                else:
                    ready += self._offer(entry, outcome)
            outcome.finish.append(message)
        if self.sequencer.expiry_due() and self.may_give_up():
            ready += self.sequencer.expire()
        self._apply_in_order(ready, outcome)
        return outcome

    def _process_in_order_columns(self, messages: list) -> Outcome | None:
        """The columnar fast path of a keyed batch; None hands the batch, untouched, to the record path.

        It applies when every message is a columnar envelope with the same keys
        (see :meth:`BatchProcessor._process_columns`), nothing is parked, every
        record is the next ``seq`` of its key, no gap is due to be given up, and
        the stage's columnar function takes the batch (returns outputs it can
        publish). Then the whole batch is applied at once, as the record path
        would apply it, with no dict per record. Otherwise the stage's state is
        put back as it was (a ``columns_atomic`` stage declines before changing
        it) and the sequencer is left unchanged, so the record path sequences,
        applies or dead-letters every record exactly as usual.

        Raises:
            StageStateError: a ``columns_atomic`` stage's call raised, or emitted
                what cannot be published, after it may have changed the state;
                the worker then rewinds the replica to its last checkpoint.
        """
        found = batch_columns(messages, self.spec.max_tries)
        if found is None or self.key_field not in found or self.seq_field not in found:
            return None
        last = self.sequencer.take_in_order(found[self.key_field], plain(found[self.seq_field]))
        if last is None or (self.sequencer.expiry_due() and self.may_give_up()):
            return None
        before = None if self.columns_atomic else self._snapshot()
        self._handler_state = _UNKNOWN  # the call may change the state, whatever it returns
        encoded = self._run_columns(found, messages)
        if encoded is None:
            if before is not None:
                self._restore(before)
            elif not self.columns_declined:
                raise StageStateError(f"stage {self.name}: its columnar call raised or emitted what cannot be "
                                      "published after it may have changed the state")
            return None
        self.sequencer.advance(last)
        self.columns_path += 1
        return Outcome(outputs=encoded, finish=list(messages))

    def _offer(self, entry: KeyedEntry, outcome: Outcome) -> list[KeyedEntry]:
        key, seq = entry.record.get(self.key_field), entry.record.get(self.seq_field)
        if not isinstance(key, str) or not key:
            outcome.dead.append(entry.dead(f"field {self.key_field!r} must be a non-empty string, got {key!r:.60}"))
            return []
        if type(seq) is not int or seq < 1:
            outcome.dead.append(entry.dead(f"field {self.seq_field!r} must be a positive integer, got {seq!r:.60}"))
            return []
        offer = self.sequencer.offer(key, seq, entry)
        if offer.refused:
            outcome.dead.append(entry.dead(offer.refused))
        self.duplicates += offer.duplicate
        self.parked += offer.parked
        return offer.ready

    def _crashed(self, items: list) -> dict[bytes, Crash]:
        """Which of ``items`` (messages or entries) a worker of this replica died holding, as read at its start.

        A keyed replica alone reads its partition, so only its own successors add
        its messages to the journal: no need to read it again.
        """
        return self.quarantine.crashed_known(items) if self.quarantine is not None else {}

    def _apply_in_order(self, ready: list[KeyedEntry], outcome: Outcome) -> None:
        if not ready:
            return
        crashed = self._crashed(ready)
        if crashed:
            self._apply_around_crashes(ready, crashed, outcome)
            return
        before = self._snapshot()
        try:
            self._apply_records(ready, outcome)
            return
        except Failed:
            self._restore(before)
        for entry in ready:  # one at a time, so only the failing record is lost to the state
            self._apply_alone(entry, outcome)

    def _apply_around_crashes(self, ready: list[KeyedEntry], crashed: dict[bytes, Crash], outcome: Outcome) -> None:
        """Apply ``ready`` in order; a record of a ``crashed`` message alone, or dead-lettered once it is spent."""
        group: list[KeyedEntry] = []
        for entry in ready:
            crash = crashed.get(entry.id)
            if crash is None:
                group.append(entry)
                continue
            self._apply_in_order(group, outcome)
            group = []
            if self.quarantine.spent(crash):  # type: ignore[union-attr]  # set: crashed is not empty
                outcome.dead.append(entry.dead(crash.reason()))
            else:
                self._apply_alone(entry, outcome)
        self._apply_in_order(group, outcome)

    def _apply_alone(self, entry: KeyedEntry, outcome: Outcome) -> None:
        """Apply one record; when its call fails the state is put back and the record dead-lettered."""
        before = self._snapshot()
        try:
            self._apply_records([entry], outcome)
        except Failed as failure:
            self._restore(before)
            outcome.dead.append(entry.dead(failure.reason + " (keyed stages do not retry)", failure.traceback()))

    def _apply_records(self, entries: list[KeyedEntry], outcome: Outcome) -> None:
        self._handler_state = _UNKNOWN  # the call changes the state, whether it returns or raises
        batch, encoded = self._run_handler([e.record for e in entries], permanent=True, held=entries)
        outcome.emit(encoded)
        for index, reason in sorted(batch.rejected.items()):
            outcome.dead.append(entries[index].dead(reason))

    def handler_state(self) -> bytes | None:
        """The handler's snapshot as of now (None for a handler without state); taken once per change."""
        if self._handler_state is _UNKNOWN:
            snapshot = getattr(self.handler, "snapshot", None)
            self._handler_state = snapshot() if snapshot else None
        return self._handler_state

    def restore_handler(self, state: bytes | None) -> None:
        """Put the handler back to ``state``, a :meth:`handler_state` (or a checkpoint's)."""
        if state is not None:
            self.handler.restore(state)  # type: ignore[attr-defined]  # a state comes from its snapshot()
        self._handler_state = _UNKNOWN if state is None else state

    _snapshot, _restore = handler_state, restore_handler
