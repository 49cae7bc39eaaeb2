"""Keyed state: apply each key's records once, in ``seq`` order, and checkpoint before FIN.

NSQ redelivers (a crash, a timeout, a requeue) and does not keep order, so a
stateful stage sees duplicates and reordering. :class:`Sequencer` sits in
front of the handler:

- a record whose ``seq`` was already applied is a duplicate and is dropped
  (its message is still finished: its effect is in the state);
- a record ahead of the next expected ``seq`` waits in a per-key buffer, its
  message unfinished, until the gap fills; when the buffer holds
  ``gap_max_count`` records of the key or its oldest has waited
  ``gap_max_ms``, the missing ``seq`` is given up (counted in ``gaps``);
- a record more than ``gap_max_count`` behind the last applied ``seq`` is not
  a redelivery any more but a producer going backwards: it is refused.

:class:`Checkpoint` writes the sequencer's position and the stage's snapshot
atomically (temporary file, fsync, rename, fsync of the folder). The worker
writes it after the outputs are acknowledged and before the inputs are
finished, so state after any crash equals state without it.
"""
from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack

CHECKPOINT_VERSION = 1


@dataclass
class Offer:
    """What the sequencer made of one record."""

    ready: list[Any] = field(default_factory=list)  # items to apply now, in order
    duplicate: bool = False
    twin: bool = False  # a duplicate of a record still waiting: finish it when that one is applied
    defer: bool = False  # ahead of the next seq: give it back to nsqd for a while (not held here)
    refused: str | None = None  # reason, when the record must be dead-lettered


class Sequencer:
    """Per-key ``seq`` tracking with a bounded buffer for gaps.

    Parameters:
        gap_max_count: records buffered per key before the gap is given up.
        gap_max_ms: longest wait for a missing ``seq``.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, gap_max_count: int, gap_max_ms: int, clock: Callable[[], float] = time.monotonic):
        self.gap_max_count, self.gap_max_s = gap_max_count, gap_max_ms / 1000.0
        self.clock = clock
        self.applied: dict[str, int] = {}
        self.gaps = 0
        self._held: dict[str, list[tuple[int, float, int, Any]]] = {}
        self._twins: dict[tuple[str, int], list[Any]] = {}
        self._ahead: dict[str, tuple[float, int]] = {}  # key -> (gap seen since, lowest deferred seq)
        self.released_twins: list[Any] = []  # twins whose record was applied: the caller finishes them
        self._order = 0  # tie-breaker so items never get compared

    def offer(self, key: str, seq: int, item: Any, can_defer: bool = False) -> Offer:
        """Take one record; return the items that became ready (possibly none).

        With ``can_defer``, a record ahead of the next ``seq`` is not held here
        but answered ``defer``: the caller gives it back to nsqd for a while.
        Held records keep their messages in flight, and a replica holding as
        many as its max_in_flight would starve: the very records it waits for
        (a crashed replica's, back after msg_timeout) could not reach it.
        """
        last = self.applied.get(key, 0)
        if seq <= last:
            if last - seq > self.gap_max_count:
                return Offer(refused=f"seq {seq} of {key!r} is {last - seq} behind the last applied seq {last}, "
                                     f"more than gap_max_count {self.gap_max_count}")
            return Offer(duplicate=True)
        if can_defer and seq > last + 1 and not self._held.get(key):
            since, lowest = self._ahead.get(key, (self.clock(), seq))
            self._ahead[key] = (since, min(lowest, seq))
            return Offer(defer=True)
        held = self._held.setdefault(key, [])
        if any(s == seq for s, _, _, _ in held):
            # A copy of a record still waiting: nsqd redelivered it because the
            # wait outlasted msg_timeout. Finishing this copy now would leave the
            # waiting one as the only copy, in memory: it waits with it instead.
            self._twins.setdefault((key, seq), []).append(item)
            return Offer(duplicate=True, twin=True)
        self._order += 1
        heapq.heappush(held, (seq, self.clock(), self._order, item))
        ready = self._release(key)
        if len(held) >= self.gap_max_count:
            ready += self._skip_gap(key)
        return Offer(ready=ready)

    def expire(self) -> list[Any]:
        """Give up gaps that waited longer than ``gap_max_ms``; return the items released."""
        now, ready = self.clock(), []
        for key, (since, lowest) in list(self._ahead.items()):
            if now - since >= self.gap_max_s:  # the deferred records apply when they come back
                self.gaps += lowest - self.applied.get(key, 0) - 1
                self.applied[key] = lowest - 1
                del self._ahead[key]
        for key, held in list(self._held.items()):
            while held and now - min(t for _, t, _, _ in held) >= self.gap_max_s:
                ready += self._skip_gap(key)
        return ready

    def held_items(self) -> list[Any]:
        """Every item waiting for a gap to fill, twins included."""
        return [item for held in self._held.values() for _, _, _, item in held] + \
            [item for twins in self._twins.values() for item in twins]

    def take_released_twins(self) -> list[Any]:
        """The twins of records released since the last call."""
        twins, self.released_twins = self.released_twins, []
        return twins

    def _release(self, key: str) -> list[Any]:
        held, ready = self._held[key], []
        while held and held[0][0] == self.applied.get(key, 0) + 1:
            seq, _, _, item = heapq.heappop(held)
            self._applied(key, seq)
            ready.append(item)
            self.released_twins += self._twins.pop((key, seq), [])
        if not held:
            del self._held[key]
        return ready

    def _applied(self, key: str, seq: int) -> None:
        self.applied[key] = seq
        ahead = self._ahead.get(key)
        if ahead is not None and seq + 1 >= ahead[1]:
            del self._ahead[key]  # the gap below the deferred records is filled

    def _skip_gap(self, key: str) -> list[Any]:
        held = self._held[key]
        missing = held[0][0] - self.applied.get(key, 0) - 1
        self.gaps += missing
        self.applied[key] = held[0][0] - 1
        return self._release(key)

    def state(self) -> dict[str, Any]:
        """The position to checkpoint (held records are not part of it: they are unfinished)."""
        return {"applied": dict(self.applied), "gaps": self.gaps}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from a checkpointed position."""
        self.applied = {str(k): int(v) for k, v in state.get("applied", {}).items()}
        self.gaps = int(state.get("gaps", 0))


class Checkpoint:
    """One replica's checkpoint file, written atomically and durably."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, sequencer_state: dict[str, Any], handler_state: bytes | None) -> None:
        """Replace the checkpoint; once this returns, it survives a crash or power loss."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = msgpack.packb({"version": CHECKPOINT_VERSION, "sequencer": sequencer_state,
                              "handler": handler_state}, use_bin_type=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself must survive a power loss
        finally:
            os.close(folder)

    def load(self) -> tuple[dict[str, Any], bytes | None] | None:
        """The saved (sequencer state, handler state), or None when there is no checkpoint yet."""
        try:
            data = msgpack.unpackb(self.path.read_bytes(), raw=False)
        except FileNotFoundError:
            return None
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{self.path}: checkpoint version {data.get('version')!r} is not {CHECKPOINT_VERSION}")
        return data["sequencer"], data["handler"]
