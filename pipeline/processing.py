"""From a batch of NSQ messages to what to publish and how to answer each message.

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

from dataclasses import dataclass, field
from typing import Any, Callable

from . import envelope
from .codecs import decode, encode_json, encode_msgpack, encoder
from .deadletter import DeadLetter
from .errors import DecodeError, StageOutputError
from .middleware import MiddlewareStack
from .nsqclient import MAX_MSG_SIZE
from .stage import Batch, Handler


class Failed(Exception):
    """A handler call failed; ``permanent`` when retrying cannot help."""

    def __init__(self, reason: str, permanent: bool):
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


@dataclass
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


class BatchProcessor:
    """Applies one stage's handler to batches of messages.

    Parameters:
        worker: passed to middleware hooks.
        spec: the stage's topology entry.
        topology: for output topics' codecs and ``pack``.
        handler: the stage function.
        middleware: hooks around each handler call.
        on_error: called with (record count, exception) when the handler raises.
    """

    def __init__(self, worker, name: str, spec, topology, handler: Handler, middleware: MiddlewareStack,
                 on_error: Callable[[int, BaseException], None] = lambda n, e: None):
        self.worker, self.name, self.spec = worker, name, spec
        self.handler, self.middleware, self.on_error = handler, middleware, on_error
        # handler output name -> (topic, encode one record, records per message)
        self.outputs = {out: (topic, encoder(topology.codec_for(topic)), topology.pack_for(topic))
                        for out, topic in spec.output_topics.items()}

    def process(self, messages: list) -> Outcome:
        """Decode, run the handler and encode; decide each message's fate."""
        outcome = Outcome()
        units, suspects = [], []
        for message in messages:
            try:
                unit = self._decode(message)
            except DecodeError as e:
                self._dead_message(outcome, message, e.reason)
                continue
            # A message past max_tries was last seen by a worker that died or
            # timed out on it: it runs alone so it cannot take a batch down.
            (suspects if message.attempts > self.spec.max_tries else units).append(unit)
        if units:
            try:
                self._apply(units, outcome)
            except Failed as failure:
                if len(units) == 1:
                    self._unit_failed(units[0], failure, outcome)
                else:
                    suspects = units + suspects
        for unit in suspects:
            self._isolate(unit, outcome)
        return outcome

    @staticmethod
    def _decode(message) -> Unit:
        record = decode(message.body)
        if envelope.is_envelope(record):
            return Unit(message, envelope.unpack(record, message.body), packed=True)
        return Unit(message, [record])

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
            self._dead_message(outcome, unit.message, failure.reason + tries)
            return
        # Out of tries: the envelope's records that work go on, the others are dead-lettered alone.
        for i, record in enumerate(unit.records):
            single = Unit(unit.message, [record], packed=True)
            try:
                self._apply([single], outcome, finish=False)
            except Failed as record_failure:
                outcome.dead.append(Dead(unit.message, record_failure.reason + tries, _record_body(record), i))
        outcome.finish.append(unit.message)

    def _dead_message(self, outcome: Outcome, message, reason: str) -> None:
        outcome.dead.append(Dead(message, reason, message.body))
        outcome.finish.append(message)

    def _apply(self, units: list[Unit], outcome: Outcome, finish: bool = True) -> None:
        """Run the handler over the units' records; add outputs, rejects and finishes to ``outcome``.

        Raises:
            Failed: the handler raised, or emitted something unpublishable.
        """
        records = [r for u in units for r in u.records]
        batch = Batch(records, stage=self.name)
        self.middleware.emit_before("before_process_batch", self.worker, batch)
        try:
            emitted = self.handler(batch) or {}
        except Exception as e:
            self.on_error(len(records), e)
            self.middleware.emit_after("after_process_batch", self.worker, batch, result=None, exception=e)
            raise Failed(f"handler raised {type(e).__name__}: {e}", permanent=False) from e
        self.middleware.emit_after("after_process_batch", self.worker, batch, result=emitted, exception=None)
        outcome.emit(self._encode(emitted))
        if batch.rejected:
            owners = [(u, i) for u in units for i in range(len(u.records))]
            for index, reason in sorted(batch.rejected.items()):
                unit, i = owners[index]
                if unit.packed:
                    outcome.dead.append(Dead(unit.message, reason, _record_body(unit.records[i]), i))
                else:
                    outcome.dead.append(Dead(unit.message, reason, unit.message.body))
        if finish:
            outcome.finish.extend(u.message for u in units)

    def _encode(self, emitted) -> dict[str, list[bytes]]:
        encoded: dict[str, list[bytes]] = {}
        for name, records in emitted.items():
            if name not in self.outputs:
                err = StageOutputError(f"stage {self.name} emitted to {name!r}, not one of its outputs "
                                       f"{list(self.spec.output_topics)}")
                raise Failed(str(err), permanent=True)
            topic, encode, pack = self.outputs[name]
            try:
                bodies = envelope.pack(records, pack) if pack > 1 else [encode(r) for r in records]
            except (TypeError, ValueError) as e:
                raise Failed(f"cannot encode output for {topic}: {e}", permanent=True) from e
            if any(len(b) > MAX_MSG_SIZE for b in bodies):
                raise Failed(f"an output for {topic} exceeds nsqd's max message size ({MAX_MSG_SIZE} bytes)",
                             permanent=True)
            encoded.setdefault(topic, []).extend(bodies)
        return encoded

    def dead_letter(self, dead: Dead) -> bytes:
        """The dead-letter message body for ``dead``."""
        message = dead.message
        return DeadLetter(reason=dead.reason, stage=self.name, topic=self.spec.input, channel=self.spec.channel,
                          attempts=message.attempts, message_id=message.id.decode(errors="replace"),
                          body=dead.body, envelope_index=dead.index).encode()


def _record_body(record: dict) -> bytes:
    """One record of an envelope as a message body of its own (JSON when it can be)."""
    try:
        return encode_json(record)
    except TypeError:
        return encode_msgpack(record)
