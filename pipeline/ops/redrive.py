"""``pipeline dead redrive`` and ``pipeline dead purge``: a stage's dead letters back to its input, or gone.

A stage's dead letters wait on ``<input>.dead`` (see :mod:`pipeline.records.deadletter`),
in its durable ``keep`` channel (:data:`pipeline.config.KEEP_CHANNEL`). A redrive reads
that channel on every nsqd, one connection at a time (creating ``keep`` first on a
topic that has no channel at all, so its backlog moves into it), and for each
letter of the stage:

- republishes the letter's original body to the physical topic it came from
  (the letter's ``topic``: the stage's input, or one of its partitions),
  waits for nsqd's OK, and only then FINs the letter. A redrive killed halfway
  has published some bodies whose letters it had not finished yet: they are
  re-driven again by the next run (a duplicate, with the record's own ``id``),
  and none is lost. The letters a dead run held come back after
  :data:`MSG_TIMEOUT`;
- leaves a letter that does not match ``--reason``, belongs to another stage
  on the same input, or cannot be re-driven (not a dead letter, a body cut to
  fit nsqd's size limit, a topic that is not the stage's input) in flight,
  unanswered, and requeues it unchanged (REQ, no delay) when the run ends.

A run ends after ``limit`` letters, or once no new letter came for
:data:`QUIET` seconds and nsqd's ``/stats`` hold no letter this run has not
seen; letters in flight to another consumer (an interrupted redrive's) are
waited for up to :data:`LINGER` seconds. A dry run holds every letter and
requeues them all: it counts what it would re-drive and changes nothing.

A keyed stage's letters are refused unless forced: see :func:`keyed_refusal`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.client import nsqd_http
from pipeline.client.inflight import InFlightSubscriber
from pipeline.client.nsqclient import NsqMessage
from pipeline.client.spread import SpreadPublisher
from pipeline.config import KEEP_CHANNEL
from pipeline.config.security import client_security
from pipeline.errors import DecodeError, PipelineError
from pipeline.ops.keep import TopicState, topic_state
from pipeline.records.codecs import decode
from pipeline.records.deadletter import raw_body

Log = Callable[[str], None]

#: Seconds nsqd waits for this tool's answer to a letter; also how long the letters of a killed run stay away.
MSG_TIMEOUT = 10.0
#: Seconds without a new letter after which a run checks whether the channel holds any letter it has not seen.
QUIET = 1.0
#: Seconds a run waits for letters in flight to another consumer (a killed run's come back after MSG_TIMEOUT).
LINGER = MSG_TIMEOUT + 2.0
#: nsqd's default ``--max-rdy-count``: the most letters one connection may have in flight.
MAX_RDY = 2500
#: Seconds between two looks at ``/stats`` while a run is deciding to end.
STATS_EVERY = 0.2
_TURN = 0.05  # seconds one read waits for the next letter

REDRIVE, SKIP, OTHER, REFUSED, UNREADABLE = "redrive", "skip", "other", "refused", "unreadable"


class RedriveError(PipelineError):
    """Raised when a redrive or purge cannot begin: a keyed stage without force, or a topology with auth."""


@dataclass
class Counts:
    """What one redrive did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    redriven: int = 0
    skipped: int = 0  # the reason did not match
    others: int = 0  # letters of another stage that reads the same input
    refused: int = 0  # letters that cannot be re-driven
    left: int = 0  # letters in the dead-letter topic and its keep channel afterwards

    def __str__(self) -> str:
        parts = [f"{'would re-drive' if self.dry_run else 're-driven'} {self.redriven}",
                 f"skipped (reason did not match) {self.skipped}"]
        if self.others:
            parts.append(f"other stages' letters {self.others}")
        if self.refused:
            parts.append(f"refused {self.refused}")
        return ", ".join([*parts, f"left {self.left}"])


@dataclass(frozen=True)
class Letter:
    """What a redrive makes of one dead letter: a verdict and, to re-drive it, the original body and its topic."""

    verdict: str
    body: bytes = b""
    topic: str = ""
    why: str = ""  # why a REFUSED letter cannot be re-driven


def read_letter(body: bytes, stage: str, inputs: Sequence[str], reason: str | None) -> Letter:
    """Sort one dead-letter message: REDRIVE (with the body and topic), SKIP, OTHER (another stage's),
    REFUSED (the stage's, but it cannot be re-driven) or UNREADABLE (not a dead letter).

    Parameters:
        inputs: the physical topics the stage reads (its input, or its partitions).
        reason: re-drive only letters whose reason contains this text (None: every letter).
    """
    try:
        letter = decode(body)
        original = raw_body(body)
    except (DecodeError, KeyError, ValueError, TypeError) as e:
        return Letter(UNREADABLE, why=f"not a dead letter ({type(e).__name__}: {e})")
    if letter.get("stage", stage) != stage:
        return Letter(OTHER)
    if reason is not None and reason not in str(letter.get("reason", "")):
        return Letter(SKIP)
    if "body_truncated_from" in letter:
        return Letter(REFUSED, why="its body was cut to fit nsqd's message size limit; the original is lost")
    topic = letter.get("topic")
    if topic not in inputs:
        return Letter(REFUSED, why=f"its topic {topic!r} is not stage {stage}'s input or one of its partitions "
                                   f"({', '.join(inputs)})")
    return Letter(REDRIVE, original, str(topic))


def keyed_refusal(stage: str) -> str:
    """The one line that refuses to re-drive a keyed stage's letters without ``--force``.

    Why: a keyed replica's sequencer (pipeline.runtime.keyed) has advanced a
    key past the seq of every record it dead-lettered for a raise (keyed stages
    do not retry), so such a record, re-driven, is at or behind its key's last
    applied seq: within ``gap_max_count`` of it, it is dropped as a duplicate
    (finished, no output); further behind, it is dead-lettered again. Only a
    record whose seq is beyond its key's last applied seq (a replica whose
    checkpoint was removed) is applied again, in seq order.
    """
    return (f"stage {stage} is keyed: a replica counts the seq of a record it dead-lettered for a raise as applied "
            "and drops a record whose seq it already applied, so re-driven letters would mostly be finished and "
            "dropped; nothing re-driven (--force re-drives anyway; README, \"Dead letters\")")


@dataclass
class Plan:
    """One redrive (or a purge of a shared dead-letter topic): what to read, and what to do with each letter."""

    topology: Any
    stage: str
    reason: str | None = None
    limit: int | None = None
    dry_run: bool = False
    chunk: int = 100
    rate: float | None = None
    log: Log = print
    purge: bool = False  # finish the stage's letters instead of re-driving them
    counts: Counts = field(default_factory=Counts)
    refusals: set[str] = field(default_factory=set)  # each refusal's line is printed once
    started: float = field(default_factory=time.monotonic)

    @property
    def dead_topic(self) -> str:
        return self.topology.dead_letter_topic(self.stage)

    @property
    def inputs(self) -> list[str]:
        return self.topology.physical_topics(self.topology.stage(self.stage).input)

    def full(self, taken: int = 0) -> bool:
        """Whether ``limit`` letters were re-driven (with ``taken`` more)."""
        return self.limit is not None and self.counts.redriven + taken >= self.limit

    def sort(self, message: NsqMessage) -> Letter:
        """The letter of ``message``, counted unless it is to be re-driven (counted once published)."""
        letter = read_letter(message.body, self.stage, self.inputs, None if self.purge else self.reason)
        if self.purge and letter.verdict in (REDRIVE, SKIP, REFUSED):
            return Letter(REDRIVE)  # every letter of the stage goes, whatever it holds
        if letter.verdict == SKIP:
            self.counts.skipped += 1
        elif letter.verdict == OTHER:
            self.counts.others += 1
        elif letter.verdict in (REFUSED, UNREADABLE):
            self.counts.refused += 1
            if letter.why not in self.refusals:
                self.refusals.add(letter.why)
                self.log(f"left in place: letter {message.id.decode(errors='replace')}: {letter.why}")
        return letter

    def pace(self) -> None:
        """Sleep as long as re-driving faster would exceed ``rate`` letters a second."""
        if self.rate:
            ahead = self.started + self.counts.redriven / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


class NodePass:
    """One nsqd's letters of one stage, read on the keep channel and answered one by one (see the module doc)."""

    def __init__(self, plan: Plan, tcp: str, http: str, publisher: SpreadPublisher | None, security):
        self.plan, self.tcp, self.http, self.publisher, self.security = plan, tcp, http, publisher, security
        self.held: dict[bytes, NsqMessage] = {}  # letters left in flight, requeued when the pass ends
        self.passed: set[bytes] = set()  # letters held once and requeued already (too many to hold)
        self.done: set[bytes] = set()  # letters re-driven; one sent again (its FIN came late) is only finished
        self.waiting_said = False

    def run(self) -> None:
        """Read and answer this node's letters until the limit, or until the channel holds none unseen."""
        plan = self.plan
        with InFlightSubscriber(self.tcp, plan.dead_topic, KEEP_CHANNEL, rdy=plan.chunk, msg_timeout=MSG_TIMEOUT,
                                security=self.security) as sub:
            quiet_since = next_look = time.monotonic()
            while not plan.full():
                if self._take(sub):
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= QUIET and time.monotonic() >= next_look:
                    if self._settled(time.monotonic() - quiet_since):
                        break
                    next_look = time.monotonic() + STATS_EVERY
                if len(self.held) >= MAX_RDY - plan.chunk:  # too many to hold: back to the channel, remembered
                    sub.requeue(self.held.values())
                    self.passed.update(self.held)
                    self.held.clear()
                sub.ready(len(self.held) + plan.chunk)

    def _take(self, sub: InFlightSubscriber) -> int:
        """Read up to ``chunk`` letters, act on those not seen before and return how many they were."""
        batch: list[NsqMessage] = []
        for read, message in enumerate(sub.receive(_TURN), 1):
            mid = message.id
            if mid in self.done:
                sub.finish([message])
            elif mid in self.held:
                self.held[mid] = message  # it timed out in flight and came again
            elif mid in self.passed:
                sub.requeue([message])
            else:
                batch.append(message)
            if read >= self.plan.chunk:  # letters seen before may come round again and again: bounded too
                break
        if batch:
            self._act(sub, batch)
        return len(batch)

    def _act(self, sub: InFlightSubscriber, batch: list[NsqMessage]) -> None:
        plan = self.plan
        bodies: dict[str, list[bytes]] = {}
        chosen: list[NsqMessage] = []
        for message in batch:
            letter = plan.sort(message)
            if letter.verdict == REDRIVE and not plan.full(len(chosen)):
                chosen.append(message)
                bodies.setdefault(letter.topic, []).append(letter.body)
            else:
                self.held[message.id] = message
        if plan.dry_run:
            self.held.update((m.id, m) for m in chosen)
        elif chosen and self.publisher is not None:
            for topic, part in bodies.items():
                self.publisher.send_mpub(topic, part, key=topic)
            self.publisher.flush()  # nsqd's OK for every body before any letter is finished
        if not plan.dry_run:
            sub.finish(chosen)
            self.done.update(m.id for m in chosen)
        plan.counts.redriven += len(chosen)
        plan.pace()

    def _settled(self, quiet_for: float) -> bool:
        """Whether the channel holds no letter this pass has not seen (or the wait for others' is over)."""
        unseen = letters_in(topic_state("", self.http, self.plan.dead_topic)) - len(self.held) - len(self.passed)
        if unseen <= 0:
            return True
        if quiet_for < LINGER:
            if not self.waiting_said:
                self.waiting_said = True
                self.plan.log(f"waiting up to {LINGER:g} s for {unseen} letters in flight elsewhere or deferred "
                              f"on nsqd {self.http} (an interrupted redrive's come back within {MSG_TIMEOUT:g} s)")
            return False
        return True


def letters_in(state: TopicState) -> int:
    """Letters a dead-letter topic holds on one nsqd: in the topic itself and in its keep channel."""
    keep = state.channels.get(KEEP_CHANNEL)
    return state.depth + (keep.undelivered if keep else 0)


def ensure_keep(http: str, topic: str, log: Log) -> TopicState:
    """Make sure ``topic`` has its keep channel on the nsqd at ``http`` (when the topic exists); return its state.

    On a topic with no channel at all, the new channel takes the whole backlog; on one whose only
    channels are others, the letters queued before are in those channels only, and the line says so.
    """
    found = topic_state("", http, topic)
    if not found.exists or KEEP_CHANNEL in found.channels:
        return found
    nsqd_http.create_channel(http, topic, KEEP_CHANNEL)
    if found.channels:
        log(f"created the durable channel {KEEP_CHANNEL!r} on {topic} (nsqd {http}); the letters queued before it "
            f"are in {', '.join(found.channels)} only and are not re-driven")
    else:
        log(f"created the durable channel {KEEP_CHANNEL!r} on {topic} (nsqd {http}): its {found.depth} "
            "letters moved into it, nothing lost")
    return topic_state("", http, topic)


def sharing_stages(topology, stage: str) -> list[str]:
    """The other stages whose dead letters go to ``stage``'s dead-letter topic (they read the same input)."""
    topic = topology.dead_letter_topic(stage)
    return [name for name in topology.stages if name != stage and topology.dead_letter_topic(name) == topic]


def redrive(topology, stage: str, *, reason: str | None = None, limit: int | None = None, dry_run: bool = False,
            force: bool = False, chunk: int = 100, rate: float | None = None, log: Log = print) -> Counts:
    """Re-drive ``stage``'s dead letters to its input (see the module doc); return the counts.

    Parameters:
        reason: only letters whose reason contains this text; the others are left in place.
        limit: stop after this many letters.
        dry_run: count what would be re-driven; change nothing.
        force: re-drive a keyed stage's letters too (see :func:`keyed_refusal`).
        chunk: letters re-driven per MPUB (and held in flight at once).
        rate: at most this many letters a second (None: as fast as nsqd takes them).
        log: gets a line for each thing worth saying before the counts.

    Raises:
        RedriveError: a keyed stage without ``force``, or a topology with ``auth``; nothing was re-driven.
        PublishError, NsqdHTTPError: an nsqd cannot be reached. What was re-driven by then stays re-driven,
            and every letter not finished is in the channel again (at once, or after MSG_TIMEOUT).
    """
    spec = topology.stage(stage)
    if spec.keyed and not force:
        raise RedriveError(keyed_refusal(stage))
    _refuse_auth(topology, "dead redrive")
    plan = Plan(topology, stage, reason, limit, dry_run, chunk, rate, log, counts=Counts(dry_run=dry_run))
    readers = [name for name, other in topology.stages.items() if name != stage and other.input == spec.input]
    if readers and not dry_run:
        log(f"note: {', '.join(readers)} also read {spec.input}: they get the re-driven records too "
            "(duplicates, with the records' own ids)")
    _run_passes(plan, None if dry_run else SpreadPublisher(topology.nsqd_tcp_addresses(),
                                                            security=client_security(topology, None),
                                                            copies=topology.copies))
    return plan.counts


def _run_passes(plan: Plan, publisher: SpreadPublisher | None) -> None:
    topology, security = plan.topology, client_security(plan.topology, None)
    try:
        for tcp, http in zip(topology.nsqd_tcp_addresses(), topology.nsqd_http_addresses(), strict=True):
            if letters_in(ensure_keep(http, plan.dead_topic, plan.log)) and not plan.full():
                NodePass(plan, tcp, http, publisher, security).run()
    finally:
        if publisher is not None:
            publisher.close()
    plan.counts.left = sum(letters_in(topic_state("", http, plan.dead_topic))
                           for http in topology.nsqd_http_addresses())


def _refuse_auth(topology, command: str) -> None:
    if topology.auth is not None:
        raise RedriveError(f"`pipeline {command}` does not work with auth yet: no identity may both read the "
                           "dead letters and publish to a stage's input")


def purge(topology, stage: str, log: Log = print) -> int:
    """Remove every dead letter of ``stage``: its dead-letter topic and keep channel emptied on every nsqd.

    When other stages read the same input (and so share the dead-letter topic),
    only ``stage``'s letters are removed, one by one; theirs stay.
    Returns how many letters were removed.

    Raises:
        NsqdHTTPError, PublishError: an nsqd cannot be reached (the nsqds before it were emptied).
    """
    topic = topology.dead_letter_topic(stage)
    shared = sharing_stages(topology, stage)
    if shared:
        _refuse_auth(topology, "dead purge")
        log(f"{', '.join(shared)} share {topic}: removing {stage}'s letters one by one, leaving theirs")
        plan = Plan(topology, stage, log=log, purge=True)
        _run_passes(plan, None)
        return plan.counts.redriven
    removed = 0
    for http in topology.nsqd_http_addresses():
        found = topic_state("", http, topic)
        if not found.exists:
            continue
        nsqd_http.request(http, "/topic/empty", {"topic": topic})
        if KEEP_CHANNEL in found.channels:
            nsqd_http.request(http, "/channel/empty", {"topic": topic, "channel": KEEP_CHANNEL})
        removed += letters_in(found)
    return removed
