"""The dead letters of every stage, read without removing any (``pipeline dead ls`` and ``pipeline dead show``).

A stage's dead letters are on ``<input>.dead`` (:mod:`pipeline.records.deadletter`
says what each holds), where ``pipeline up`` gives them the durable channel
``keep``. They are counted from nsqd's ``/stats`` (the topic's own depth plus
everything ``keep`` holds: queued, in flight and deferred) and read through
:func:`pipeline.observe.peek.peek_messages`, which requeues every letter it
reads: listing or showing them removes none. The letters of a stage on a
replicated topic are replicated too (a copy on two nodes each); each is
counted and shown once. A read is bounded:
:data:`READ_LIMIT` letters per stage and nsqd at most. Example::

    for row in summarize(load_topology("topology.yaml")):
        print(row.stage, row.count, row.reasons.most_common(3))
"""
from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from pipeline.client.nsqclient import NsqMessage
from pipeline.config import KEEP_CHANNEL
from pipeline.errors import ChannelNotFound, DecodeError
from pipeline.observe.peek import peek_messages
from pipeline.observe.tail import format_body, record_json
from pipeline.ops.keep import topic_states
from pipeline.records.codecs import decode

#: The most letters read per stage (and nsqd) for ``dead ls``'s reasons and ``dead show --reason``.
READ_LIMIT = 10_000
#: A letter whose body is no dead letter is counted under this reason.
UNREADABLE = "(not a dead letter: undecodable)"

Log = Callable[[str], None]


@dataclass
class StageLetters:
    """One stage's dead letters: how many nsqd holds, and what the ones read say.

    Stages reading one input share its dead-letter topic; each row then counts the
    letters read that name its stage, and ``topic_count`` is the topic's total.
    """

    stage: str
    topic: str
    topic_count: int  # letters nsqd holds for the topic: in the topic, and queued, in flight or deferred in keep
    topic_read: int = 0  # letters of the topic read
    read: int = 0  # of those, this stage's
    oldest_ns: int | None = None  # the oldest ``dead_at`` among them, ns since the epoch
    reasons: Counter[str] = field(default_factory=Counter)
    problem: str | None = None  # why the letters could not be read
    shared: bool = False

    @property
    def count(self) -> int:
        """The stage's dead letters: the topic's count, or on a shared topic those read that name the stage."""
        return self.read if self.shared else self.topic_count

    @property
    def complete(self) -> bool:
        """Whether every letter of the topic was read, so the reasons add up to the count."""
        return self.topic_read >= self.topic_count

    def to_dict(self) -> dict[str, Any]:
        """The row as plain data, for ``--json``."""
        return {"stage": self.stage, "topic": self.topic, "letters": self.count, "read": self.read,
                "complete": self.complete, "oldest_dead_at": self.oldest_ns,
                "reasons": dict(self.reasons.most_common()), "problem": self.problem}


def letter_record(body: bytes) -> dict[str, Any] | None:
    """The dead letter in a message body (JSON, or msgpack for a big one); None when it is not one."""
    try:
        record = decode(body)
    except DecodeError:
        return None
    return record if isinstance(record, dict) and "reason" in record else None


def summarize(topology, *, limit: int = READ_LIMIT, log: Log = lambda line: None) -> list[StageLetters]:
    """One row per stage: its dead-letter count, and reasons and oldest time from up to ``limit`` letters per nsqd.

    A dead-letter topic without a durable channel gets ``keep`` first (one line to ``log``).

    Raises:
        NsqdHTTPError: an nsqd's HTTP API does not answer.
        PublishError: an nsqd refuses the subscription.
    """
    rows: list[StageLetters] = []
    by_topic: dict[str, list[str]] = {}
    for name in topology.stages:
        by_topic.setdefault(topology.dead_letter_topic(name), []).append(name)
    for topic, stages in by_topic.items():
        try:
            letters = [m for _, m in peek_messages(topology, topic, limit, log=log)]
            problem = None
        except ChannelNotFound as e:
            letters, problem = [], str(e)
        count = sum(state.depth + (state.channels[KEEP_CHANNEL].undelivered if KEEP_CHANNEL in state.channels
                                   else 0) for state in topic_states(topology, topic))
        if (copies := topology.copies(topic)) > 1:
            # a replicated stage's letters are on two nodes each: count and read every letter once
            distinct = list({m.body: m for m in letters}.values())
            count = len(distinct) if len(letters) >= count else -(-count // copies)
            letters = distinct
        for name in stages:
            rows.append(_row(name, topic, count, letters, problem, shared=len(stages) > 1))
    return rows


def _row(stage: str, topic: str, count: int, letters: list[NsqMessage], problem: str | None,
         shared: bool) -> StageLetters:
    row = StageLetters(stage, topic, count, len(letters), problem=problem, shared=shared)
    for message in letters:
        record = letter_record(message.body)
        if shared and (record is None or record.get("stage") != stage):
            continue
        row.read += 1
        if record is None:
            row.reasons[UNREADABLE] += 1
            continue
        row.reasons[" ".join(str(record["reason"]).split())] += 1  # one line, whatever the exception said
        dead_at = record.get("dead_at")
        if isinstance(dead_at, int) and (row.oldest_ns is None or dead_at < row.oldest_ns):
            row.oldest_ns = dead_at
    return row


def show_letters(topology, stage: str, *, count: int, reason: str | None = None, out: TextIO,
                 as_json: bool = False, log: Log = lambda line: None) -> int:
    """Print up to ``count`` of ``stage``'s dead letters, oldest first, removing none; return how many.

    ``reason`` keeps the letters whose reason contains it (case-insensitive), among
    the first :data:`READ_LIMIT` per nsqd. ``as_json`` prints each letter as the
    JSON object published, one a line; otherwise each is a block: reason, stage,
    attempts, time, traceback and the decoded body.

    Raises:
        ChannelNotFound: the dead-letter topic has durable channels but no ``keep``.
        NsqdHTTPError, PublishError: as :func:`summarize`.
    """
    topic = topology.dead_letter_topic(stage)
    shared = sum(topology.dead_letter_topic(name) == topic for name in topology.stages) > 1
    limit = READ_LIMIT if reason or shared else count
    shown = 0
    copies: set[bytes] | None = set() if topology.copies(topic) > 1 else None  # bodies shown, if replicated
    for tcp, message in peek_messages(topology, topic, limit, log=log):
        if copies is not None:
            if message.body in copies:
                continue  # the other copy of a letter shown already
            copies.add(message.body)
        record = letter_record(message.body)
        if record is not None and shared and record.get("stage") != stage:
            continue
        if reason is not None and (record is None or reason.lower() not in str(record["reason"]).lower()):
            continue
        if as_json:
            out.write((record_json(record) if record is not None else _raw_json(message)) + "\n")
        else:
            out.write("\n".join(letter_lines(topic, tcp, message, record)) + "\n\n")
        shown += 1
        if shown >= count:
            break
    out.flush()
    return shown


def _raw_json(message: NsqMessage) -> str:
    return record_json({"undecodable": base64.b64encode(message.body).decode("ascii")})


def letter_lines(topic: str, tcp: str, message: NsqMessage, record: dict[str, Any] | None) -> list[str]:
    """The block ``dead show`` prints for one letter."""
    head = f"{topic} {message.id.decode('ascii', errors='replace')} (nsqd {tcp})"
    if record is None:
        return [head, f"  {UNREADABLE}: {message.body[:200]!r}"]
    lines = [head, f"  reason:    {record['reason']}",
             f"  stage:     {record.get('stage', '?')} (read {record.get('topic', '?')}/{record.get('channel', '?')})",
             f"  attempts:  {record.get('attempts', '?')}", f"  dead at:   {format_ns(record.get('dead_at'))}"]
    if record.get("envelope_index") is not None:
        lines.append(f"  record:    {record['envelope_index']} of its envelope")
    if record.get("traceback"):
        lines += ["  traceback:", *(f"    {line}" for line in str(record["traceback"]).rstrip().splitlines())]
    lines += [f"  body:      {line}" for line in body_lines(record)]
    return lines


def body_lines(record: dict[str, Any]) -> list[str]:
    """The dead letter's original body, decoded as ``pipeline tail`` prints it (its raw text when not a record)."""
    if "body_bytes" in record:
        body = bytes(record["body_bytes"])
    elif "body" in record:
        body = str(record["body"]).encode("utf-8")
    elif "body_base64" in record:
        body = base64.b64decode(record["body_base64"])
    else:
        return ["(none)"]
    lines = [line for line, is_record in format_body(body, "body") if is_record]
    if not lines:
        text = body.decode("utf-8", errors="replace")
        lines = [f"{text[:500]!r} (not a record)" if len(text) <= 500 else f"{text[:500]!r}... (not a record)"]
    if record.get("body_truncated_from"):
        lines.append(f"(cut from {record['body_truncated_from']:,} bytes to fit nsqd's message size)")
    return lines


def format_ns(ns: Any) -> str:
    """A ``dead_at`` (ns since the epoch) as UTC time to the millisecond; ``?`` when absent."""
    if not isinstance(ns, int):
        return "?"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def print_summary(rows: list[StageLetters], out: TextIO) -> None:
    """Print ``dead ls``'s table: a line per stage, then its reasons with their counts, most frequent first."""
    width = max([len(r.stage) for r in rows] + [5])
    topic_width = max([len(r.topic) for r in rows] + [17])
    out.write(f"{'stage':<{width}}  {'dead-letter topic':<{topic_width}}  {'letters':>8}  oldest\n")
    for row in rows:
        oldest = format_ns(row.oldest_ns) if row.oldest_ns is not None else "-"
        out.write(f"{row.stage:<{width}}  {row.topic:<{topic_width}}  {row.count:>8,}  {oldest}\n")
        indent = " " * (width + 2)
        if row.problem:
            out.write(f"{indent}not read: {row.problem}\n")
        for reason, n in row.reasons.most_common():
            out.write(f"{indent}{n:>8,}  {reason}\n")
        if not row.complete and not row.problem:
            out.write(f"{indent}(reasons and oldest from the {row.read:,} letters read of {row.count:,})\n")
    out.flush()
