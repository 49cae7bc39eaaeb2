"""Dead letters: the record a message becomes when it can never be processed.

A dead letter keeps the message's raw body, so nothing is lost: ``body`` holds
it as text when it is valid UTF-8, ``body_base64`` otherwise. It is JSON on the
``<input>.dead`` topic so ``nsq_tail`` and curl users can read it as it is.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from .codecs import decode, encode_json


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
        try:
            record["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            record["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return record

    def encode(self) -> bytes:
        """The dead letter as a JSON message body."""
        return encode_json(self.to_record())


def raw_body(dead_letter_body: bytes) -> bytes:
    """Recover the original message body from a dead-letter message (for replays)."""
    record = decode(dead_letter_body)
    if "body" in record:
        return record["body"].encode("utf-8")
    return base64.b64decode(record["body_base64"])
