"""Dead letters: the record a message becomes when it can never be processed.

A dead letter keeps the message's raw body, so nothing is lost: ``body`` holds
it as text when it is valid UTF-8, ``body_base64`` otherwise. It is JSON on the
``<input>.dead`` topic so ``nsq_tail`` and curl users can read it as it is.

A body near nsqd's message size limit may not fit once escaped or base64'd:
then the dead letter is msgpack with the raw bytes in ``body_bytes``, and only
if even that is too big is the body cut to fit, with ``body_truncated_from``
giving its real length (nsqd would refuse the dead letter otherwise, and the
message would be retried forever).

When the handler raised, ``traceback`` holds the last few frames of what it
raised and the exception, as Python prints them (a couple of thousand
characters at most); a dead letter without it (bad input, a handler that
returned something other than its outputs, or one written before the field
existed) simply has no such key.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from pipeline.config import MAX_MSG_SIZE
from pipeline.records.codecs import decode, encode_json, encode_msgpack

_ROOM = 256  # for the msgpack framing of the metadata when the body must be cut


@dataclass(frozen=True)
class DeadLetter:
    """Why one message was dead-lettered, and where it came from."""

    reason: str
    stage: str
    topic: str
    channel: str
    attempts: int
    message_id: str
    body: bytes
    envelope_index: int | None = None  # set when the record came out of a batched envelope
    traceback: str | None = None  # the last frames of the exception the handler raised, when it raised

    def to_record(self) -> dict:
        """The record published on the dead-letter topic."""
        record = {
            "reason": self.reason,
            "stage": self.stage,
            "topic": self.topic,
            "channel": self.channel,
            "attempts": self.attempts,
            "nsq_message_id": self.message_id,
            "dead_at": time.time_ns(),
        }
        if self.envelope_index is not None:
            record["envelope_index"] = self.envelope_index
        if self.traceback is not None:
            record["traceback"] = self.traceback
        try:
            record["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            record["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return record

    def encode(self, limit: int = MAX_MSG_SIZE) -> bytes:
        """The dead letter as a message body of at most ``limit`` bytes: JSON when it fits, else msgpack."""
        record = self.to_record()
        encoded = encode_json(record)
        if len(encoded) <= limit:
            return encoded
        record.pop("body", None)
        record.pop("body_base64", None)
        record["body_bytes"] = self.body
        encoded = encode_msgpack(record)
        if len(encoded) <= limit:
            return encoded
        record["body_truncated_from"] = len(self.body)
        record["body_bytes"] = self.body[:max(0, limit - (len(encoded) - len(self.body)) - _ROOM)]
        return encode_msgpack(record)


def raw_body(dead_letter_body: bytes) -> bytes:
    """Recover the original message body from a dead-letter message (for replays)."""
    record = decode(dead_letter_body)
    if "body_bytes" in record:
        return record["body_bytes"]
    if "body" in record:
        return record["body"].encode("utf-8")
    return base64.b64decode(record["body_base64"])
