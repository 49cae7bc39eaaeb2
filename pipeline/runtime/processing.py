"""From a batch of NSQ messages to what to publish and how to answer each message (docs/ARCHITECTURE.md).

:class:`BatchProcessor` holds the stage contract's decisions, free of any I/O:
decode (an undecodable message is dead-lettered whole), run the handler once
over every record of the batch, and when it raises, again message by message
so one bad message cannot hold the others back. A message whose records keep
failing is retried until ``max_tries``; then each failing record is
dead-lettered alone and the rest of its records go on. The worker publishes
the :class:`Outcome` and only then finishes or requeues the messages.

A message is a *unit*: one record, or the records of an envelope (``pack``).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from typing import Any

import numpy as np
import orjson

from pipeline.config import MAX_MSG_SIZE, StageSpec, Topology
from pipeline.errors import DecodeError, StageOutputError
from pipeline.middleware import MiddlewareStack, WorkerView
from pipeline.records import bulkjson, envelope
from pipeline.records.codecs import (
    MSGPACK_MAP_MARKERS,
    beyond_orjson,
    decode,
    encode_json,
    encode_msgpack,
    encoder,
)
from pipeline.records.deadletter import DeadLetter
from pipeline.records.partition import PartitionKeyError, Router
from pipeline.runtime.quarantine import NO_BOX, Crash, Quarantine
from pipeline.runtime.results import check_result, handler_frames
from pipeline.stage import Batch, ColumnBatch, Columns, Handler, plain

_ATTEMPTS, _BODY = operator.attrgetter("attempts"), operator.attrgetter("body")
_NO_CRASHES: dict[bytes, Crash] = {}  # never changed: what a batch with no redelivered message is told


def _joined(parts: list) -> list | np.ndarray:
    """One column from its parts (one per message): as it is for one part; arrays of one dtype joined
    as an array; anything else as one list of Python values."""
    if len(parts) == 1:
        return parts[0]
    if set(map(type, parts)) == {np.ndarray} and len({p.dtype for p in parts}) == 1:
        return np.concatenate(parts)
    joined: list = []
    for part in parts:
        joined += plain(part)
    return joined


class Failed(Exception):
    """A handler call failed; ``permanent`` when retrying cannot help; ``error``, what the handler raised."""

    def __init__(self, reason: str, permanent: bool, error: BaseException | None = None):
        super().__init__(reason)
        self.reason, self.permanent, self.error = reason, permanent, error

    def traceback(self) -> str | None:
        """The last frames of what the handler raised, for a dead letter (None when it did not raise)."""
        return handler_frames(self.error) if self.error is not None else None


@dataclass(slots=True)
class Unit:
    """One message and the records it carries (several when it is an envelope)."""

    message: Any
    records: list[dict]
    packed: bool = False


@dataclass
class Dead:
    """A message, or one record of an envelope, bound for the dead-letter topic."""

    message: Any
    reason: str
    body: bytes
    index: int | None = None  # the record's position in its envelope
    traceback: str | None = None  # the last frames of what the handler raised, when it raised


@dataclass
class Outcome:
    """What one batch's messages become: outputs to publish, and their fate after."""

    outputs: dict[str, list[bytes]] = field(default_factory=dict)
    finish: list = field(default_factory=list)
    retry: list = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)

    def emit(self, encoded: dict[str, list[bytes]]) -> None:
        for topic, bodies in encoded.items():
            self.outputs.setdefault(topic, []).extend(bodies)


def _ignore_error(count: int, error: BaseException) -> None:
    """The default ``on_error``: the outcome already says what became of the records."""


@dataclass(frozen=True, slots=True)
class ProcessingContext:
    """What a processor is given of its stage and replica.

    ``topology`` gives the output topics' codecs, ``pack`` and partitioning;
    ``worker`` is passed to the middleware hooks (None in tests of the
    decisions alone); ``on_error`` is called with (record count, exception)
    when the handler raises, or with a :class:`~pipeline.errors.StageOutputError`
    when it returns anything but a mapping of the stage's outputs (see
    :func:`~pipeline.runtime.results.check_result`); ``quarantine`` (None in
    tests of the decisions alone) notes the messages in the handler's hands and
    knows the ones that were there when a worker died (:mod:`.quarantine`).
    """

    name: str
    spec: StageSpec
    topology: Topology
    handler: Handler
    middleware: MiddlewareStack
    worker: WorkerView | None = None
    on_error: Callable[[int, BaseException], None] = _ignore_error
    quarantine: Quarantine | None = None


class BatchProcessor:
    """Applies one stage's handler to batches of messages, as ``context`` describes."""

    def __init__(self, context: ProcessingContext):
        # Copied out of the context: the per-batch and per-message code reads them often.
        self.worker, self.name, self.spec = context.worker, context.name, context.spec
        self.handler, self.middleware, self.on_error = context.handler, context.middleware, context.on_error
        self.quarantine = context.quarantine
        topology = context.topology
        self.columns_handler = getattr(self.handler, "columns", None)
        self.columns_declined = False  # whether the last columnar call returned None (see _run_columns)
        # handler output name -> (topic, encode a list of records, records per message, partition router)
        self.outputs = {out: (topic, _encoder_of_lists(topology.codec_for(topic)), topology.pack_for(topic),
                              Router.of(topology, topic)) for out, topic in self.spec.output_topics.items()}

    def process(self, messages: list) -> Outcome:
        """Decode, run the handler and encode; decide each message's fate."""
        most = max(map(_ATTEMPTS, messages), default=0)
        quarantine = self.quarantine
        crashed = quarantine.crashed(messages) if most > 1 and quarantine is not None else _NO_CRASHES
        outcome = Outcome()
        if crashed and quarantine is not None:  # a worker died holding some: no fast path; the spent never run
            messages = quarantine.triage(messages, crashed, partial(self._dead_message, outcome))
        elif self.columns_handler is not None and (columnar := self._process_columns(messages)) is not None:
            return columnar
        elif (records := self._plain_records(messages, most)) is not None:
            try:
                self._apply_plain(messages, records, outcome)
            except Failed as failure:
                self._failed([Unit(m, [r]) for m, r in zip(messages, records, strict=False)], failure, outcome)
            return outcome
        units: list[Unit]
        suspects: list[Unit]
        units, suspects = [], []
        for unit in self._decode_all(messages, outcome):
            # A message past max_tries was last seen by a worker that died or timed out on it, a crashed one
            # by a worker that died holding it (see .quarantine): it runs alone so it cannot take a batch down.
            message = unit.message
            (suspects if message.attempts > self.spec.max_tries or message.id in crashed else units).append(unit)
        if units:
            try:
                self._apply(units, outcome)
            except Failed as failure:
                self._failed(units, failure, outcome)
        for unit in suspects:
            self._isolate(unit, outcome)
        return outcome

    def _failed(self, units: list[Unit], failure: Failed, outcome: Outcome) -> None:
        """The handler failed on ``units`` together: decide a lone unit's fate, else run each alone."""
        if len(units) == 1:
            self._unit_failed(units[0], failure, outcome)
            return
        for unit in units:
            self._isolate(unit, outcome)

    def _plain_records(self, messages: list, most: int) -> list[dict] | None:
        """The records of a batch of plain JSON messages, decoded together; None hands it to :meth:`_decode_all`.

        This is the common case of one JSON record per message, decoded with
        no Python code per message: it applies only when every message is
        within max_tries (``most`` is the batch's largest ``attempts``) and its
        body is a JSON object (not an envelope) that orjson decodes exactly (no run of 20 digits, see
        :mod:`pipeline.records.codecs`). Anything else, including one malformed body,
        goes the general way, which decodes each message alone and
        dead-letters the bad ones, so the result is the same either way.
        """
        if not messages or most > self.spec.max_tries:
            return None
        bodies = list(map(_BODY, messages))
        if beyond_orjson(b" ".join(bodies)):
            return None
        try:
            records = list(map(orjson.loads, bodies))
        except ValueError:
            return None
        if set(map(type, records)) != {dict} or any(map(operator.contains, records, repeat(envelope.MARKER))):
            return None
        return records

    def _apply_plain(self, messages: list, records: list[dict], outcome: Outcome) -> None:
        """:meth:`_apply` for messages of one record each (``records[i]`` from ``messages[i]``).

        Raises:
            Failed: the handler raised, or emitted something unpublishable.
        """
        batch, outcome.outputs = self._run_handler(records, permanent=False, held=messages)
        for index, reason in sorted(batch.rejected.items()):
            outcome.dead.append(Dead(messages[index], reason, messages[index].body))
        outcome.finish = list(messages)

    def _process_columns(self, messages: list) -> Outcome | None:
        """The columnar fast path (see :mod:`pipeline.stage`); None hands the batch to the record path.

        It applies only when every message is a columnar envelope with the same
        keys, within max_tries, and the columnar function returns Columns for
        outputs of the stage (packed ones are packed straight from the columns,
        others are encoded record by record); anything else (including the
        function raising) falls back, and the record path runs the batch as usual.
        """
        found = batch_columns(messages, self.spec.max_tries)
        encoded = self._run_columns(found, messages) if found is not None else None
        return Outcome(outputs=encoded, finish=list(messages)) if encoded is not None else None

    def _run_columns(self, found: Columns, held: list) -> dict[str, list[bytes]] | None:
        """Call the columnar function on ``found`` (the records of the messages ``held``), with the middleware
        hooks around it; its encoded outputs.

        None when it declined (returned None), raised, returned anything else
        but a mapping of outputs (reported to ``on_error`` as the handler's
        failures are), or emitted what cannot be published: the record path
        then runs the batch (and owns any error). :attr:`columns_declined`
        tells the first case from the others.
        """
        batch = ColumnBatch(found, stage=self.name)
        self.middleware.emit_before("before_process_batch", self.worker, batch)
        problem: Exception | None = None
        box = self.quarantine.box if self.quarantine is not None else NO_BOX
        box.hold(held)
        try:
            emitted = self.columns_handler(found)  # type: ignore[misc]  # set: callers check it is not None
            box.clear()
            if emitted is not None:
                check_result(emitted, self.outputs, self.name, columnar=True)
        except Exception as e:
            box.clear()
            emitted, problem = None, e
            self.on_error(len(found), e)
        self.columns_declined = emitted is None and problem is None
        encoded = self._encode_columns(emitted) if emitted is not None else None
        self.middleware.emit_after("after_process_batch", self.worker, batch,
                                   result=emitted if encoded is not None else None, exception=problem)
        return encoded

    def _encode_columns(self, emitted: Mapping[str, list | Columns]) -> dict[str, list[bytes]] | None:
        """Encode a columnar handler's ``{output: Columns or list of records}`` (checked by
        :func:`~pipeline.runtime.results.check_result`); None when it cannot be published."""
        encoded: dict[str, list[bytes]] = {}
        for name, columns in emitted.items():
            topic, _, pack, router = self.outputs[name]
            if isinstance(columns, list) or pack <= 1:
                # records (a few signals), or one record per message: encoded as the record path does
                try:
                    for physical, bodies in self._encode({name: columns}).items():
                        encoded.setdefault(physical, []).extend(bodies)
                except Failed:
                    return None
                continue
            if len(columns) == 0:
                continue
            parts: dict[str, Columns] = {topic: columns}
            if router.partitioned:
                rows = router.route_rows(columns[router.key]) if router.key in columns else None  # type: ignore[index,operator]  # partitioned, so key is set
                if rows is None:
                    return None  # the record path names the bad key
                parts = {t: columns if len(r) == len(columns) else columns.take(r) for t, r in rows.items()}
            for physical, part in parts.items():
                try:
                    bodies = envelope.pack_columns(part.keys, list(part.data.values()), len(part), pack)
                except (TypeError, ValueError, OverflowError):
                    return None
                if max(map(len, bodies)) > MAX_MSG_SIZE:
                    return None
                encoded.setdefault(physical, []).extend(bodies)
        return encoded

    def _decode_all(self, messages: list, outcome: Outcome) -> list[Unit]:
        """Decode every message; an undecodable one is dead-lettered whole."""
        units: list[Unit] = []
        append, marker = units.append, envelope.MARKER
        for message in messages:  # the hot loop of every batch: no helper calls but decode
            body = message.body
            try:
                record = decode(body)
                append(Unit(message, envelope.unpack(record, body), True) if marker in record
                       else Unit(message, [record]))
            except DecodeError as e:
                self._dead_message(outcome, message, e.reason)
        return units

    def _isolate(self, unit: Unit, outcome: Outcome) -> None:
        try:
            self._apply([unit], outcome)
        except Failed as failure:
            self._unit_failed(unit, failure, outcome)

    def _unit_failed(self, unit: Unit, failure: Failed, outcome: Outcome) -> None:
        attempts = unit.message.attempts
        if not failure.permanent and attempts < self.spec.max_tries:
            outcome.retry.append(unit.message)
            return
        tries = "" if failure.permanent else f" (attempt {attempts} of max_tries {self.spec.max_tries})"
        if not unit.packed:
            self._dead_message(outcome, unit.message, failure.reason + tries, failure.traceback())
            return
        # Out of tries: the envelope's records that work go on, the others are dead-lettered alone.
        for i, record in enumerate(unit.records):
            single = Unit(unit.message, [record], packed=True)
            try:
                self._apply([single], outcome, finish=False)
            except Failed as record_failure:
                outcome.dead.append(Dead(unit.message, record_failure.reason + tries, record_body(record), i,
                                         record_failure.traceback()))
        outcome.finish.append(unit.message)

    def _dead_message(self, outcome: Outcome, message, reason: str, traceback: str | None = None) -> None:
        outcome.dead.append(Dead(message, reason, message.body, traceback=traceback))
        outcome.finish.append(message)

    def _apply(self, units: list[Unit], outcome: Outcome, finish: bool = True) -> None:
        """Run the handler over the units' records; add outputs, rejects and finishes to ``outcome``.

        Raises:
            Failed: the handler raised, or emitted something unpublishable.
        """
        batch, encoded = self._run_handler([r for u in units for r in u.records], permanent=False,
                                           held=[u.message for u in units])
        outcome.emit(encoded)
        if batch.rejected:
            owners = [(u, i) for u in units for i in range(len(u.records))]
            for index, reason in sorted(batch.rejected.items()):
                unit, i = owners[index]
                if unit.packed:
                    outcome.dead.append(Dead(unit.message, reason, record_body(unit.records[i]), i))
                else:
                    outcome.dead.append(Dead(unit.message, reason, unit.message.body))
        if finish:
            outcome.finish.extend(u.message for u in units)

    def _run_handler(self, records: list[dict], permanent: bool, held: list) -> tuple[Batch, dict[str, list[bytes]]]:
        """Call the handler on ``records`` (from the messages or keyed entries ``held``, noted in the black box
        for the call) with the middleware hooks around it; return the batch and its encoded outputs.

        Raises:
            Failed: the handler raised or returned anything but a mapping of the
                stage's outputs to lists of records or Columns (``permanent`` as
                given, either way), or emitted something unpublishable.
        """
        batch = Batch(records, stage=self.name)
        self.middleware.emit_before("before_process_batch", self.worker, batch)
        box = self.quarantine.box if self.quarantine is not None else NO_BOX
        box.hold(held)
        try:
            emitted = self.handler(batch)
        except Exception as e:
            box.clear()  # only here and below: a BaseException (SystemExit) ends the process with the box held
            raise self._handler_failed(batch, e, Failed(f"handler raised {type(e).__name__}: {e}", permanent, e)) from e
        box.clear()
        try:
            check_result(emitted, self.outputs, self.name)
        except StageOutputError as e:
            raise self._handler_failed(batch, e, Failed(e.reason, permanent)) from e
        self.middleware.emit_after("after_process_batch", self.worker, batch, result=emitted, exception=None)
        return batch, self._encode(emitted)

    def _handler_failed(self, batch: Batch, error: Exception, failed: Failed) -> Failed:
        """Report a handler call that raised ``error`` or returned a bad result (``error`` says which); ``failed``."""
        self.on_error(len(batch), error)
        self.middleware.emit_after("after_process_batch", self.worker, batch, result=None, exception=error)
        return failed

    def _encode(self, emitted) -> dict[str, list[bytes]]:
        encoded: dict[str, list[bytes]] = {}
        for name, records in emitted.items():
            if isinstance(records, Columns):  # check_result let through lists and Columns only
                records = records.records()
            topic, encode, pack, router = self.outputs[name]
            try:
                routed = router.route(records) if len(router.topics) > 1 else {topic: records}
            except PartitionKeyError as e:
                raise Failed(f"output for partitioned topic {topic}: {e.reason}", permanent=True) from e
            for physical, part in routed.items():
                try:
                    bodies = envelope.pack(part, pack) if pack > 1 else encode(part)
                except (TypeError, ValueError) as e:
                    raise Failed(f"cannot encode output for {topic}: {e}", permanent=True) from e
                if bodies and max(map(len, bodies)) > MAX_MSG_SIZE:
                    raise Failed(f"an output for {topic} exceeds nsqd's max message size ({MAX_MSG_SIZE} bytes)",
                                 permanent=True)
                encoded.setdefault(physical, []).extend(bodies)
        return encoded

    def dead_letter(self, dead: Dead) -> bytes:
        """The dead-letter message body for ``dead``."""
        message = dead.message
        return DeadLetter(reason=dead.reason, stage=self.name, topic=self.spec.input, channel=self.spec.channel,
                          attempts=message.attempts, message_id=message.id.decode(errors="replace"),
                          body=dead.body, envelope_index=dead.index, traceback=dead.traceback).encode()


def batch_columns(messages: list, max_tries: int) -> Columns | None:
    """The records of ``messages`` as one :class:`Columns`, when every one is a columnar envelope with the
    same keys within ``max_tries``; else None."""
    keys: list[str] | None
    parts: list[list[Any]]
    keys, parts, n = None, None, 0  # type: ignore[assignment]  # parts is None only until keys is set
    for message in messages:
        body = message.body
        if message.attempts > max_tries or not body or body[0] not in MSGPACK_MAP_MARKERS:
            return None
        try:
            found = envelope.columns_of(envelope.unpackb(body))
        except Exception:
            return None
        if found is None:
            return None
        if keys is None:
            keys, parts, n = found[0], [[c] for c in found[1]], found[2]
        elif found[0] != keys:
            return None
        else:
            for column_parts, more in zip(parts, found[1]):  # noqa: B905 - per-record hot path; lengths checked by found[0] != keys
                column_parts.append(more)
            n += found[2]
    if keys is None or len(set(keys)) != len(keys):
        return None
    return Columns(dict(zip(keys, map(_joined, parts), strict=False)), n)


def _encoder_of_lists(codec: str) -> Callable[[list[dict]], list[bytes]]:
    """A function encoding each record of a list with ``codec`` (JSON: in one orjson call, see :mod:`.bulkjson`)."""
    if codec == "json":
        return bulkjson.dumps_each
    encode = encoder(codec)
    return lambda records: list(map(encode, records))


def record_body(record: dict) -> bytes:
    """One record of an envelope as a message body of its own (JSON when it can be)."""
    try:
        return encode_json(record)
    except TypeError:
        return encode_msgpack(record)
