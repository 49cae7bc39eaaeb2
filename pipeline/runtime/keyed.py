"""Keyed state: apply each key's records once, in ``seq`` order, and checkpoint before FIN.

NSQ redelivers (a crash, a timeout, a requeue) and does not keep order, so a
stateful stage sees duplicates and reordering. :class:`Sequencer` sits in
front of the handler:

- a record whose ``seq`` was already applied is a duplicate and is dropped
  (its message is still finished: its effect is in the state);
- a record ahead of the next expected ``seq`` is *parked*: kept in a per-key
  buffer that is part of the checkpoint, so its message is finished like any
  other and takes no room in the in-flight window while the gap fills (a
  crashed replica's messages come back only after msg_timeout, behind any
  backlog); when a key has ``gap_max_count`` records parked or has waited
  ``gap_max_ms``, the missing ``seq`` is given up (counted in ``gaps``);
- a record more than ``gap_max_count`` behind the last applied ``seq`` is not
  a redelivery any more but a producer going backwards: it is refused.

:class:`Checkpoint` writes the sequencer's position and the stage's snapshot
atomically (temporary file, fsync, rename, fsync of the folder). The worker
writes it after the outputs are acknowledged and before the inputs are
finished, so state after any crash equals state without it: every finished
message's effect, applied or parked, is in the checkpoint.
"""
from __future__ import annotations

import heapq
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

CHECKPOINT_VERSION = 2  # the slot format (1: a single msgpack file)
_SLOT_MAGIC = b"NPCK"
_SLOT_HEADER = struct.Struct(">4sIQII")  # magic, version, sequence number, payload length, payload CRC-32


@dataclass
class Offer:
    """What the sequencer made of one record."""

    ready: list[Any] = field(default_factory=list)  # items to apply now, in order
    duplicate: bool = False
    parked: bool = False  # ahead of the next seq: kept (and checkpointed) until the gap fills
    refused: str | None = None  # reason, when the record must be dead-lettered


class Sequencer:
    """Per-key ``seq`` tracking with a bounded, checkpointed buffer for gaps.

    Parameters:
        gap_max_count: records parked per key before the gap is given up.
        gap_max_ms: longest wait for a missing ``seq``.
        clock: monotonic seconds (injectable for tests).
        pack_item / unpack_item: turn a parked item into msgpack-able data and
            back, for the checkpoint (default: the item is stored as it is).
    """

    def __init__(self, gap_max_count: int, gap_max_ms: int, clock: Callable[[], float] = time.monotonic,
                 pack_item: Callable[[Any], Any] = lambda item: item,
                 unpack_item: Callable[[Any], Any] = lambda data: data):
        self.gap_max_count, self.gap_max_s = gap_max_count, gap_max_ms / 1000.0
        self.clock, self.pack_item, self.unpack_item = clock, pack_item, unpack_item
        self.applied: dict[str, int] = {}
        self.gaps = 0
        # key -> heap of (seq, item, packed item); and since when the key has been waiting
        self._parked: dict[str, list[tuple[int, Any, Any]]] = {}
        self._parked_seqs: dict[str, set[int]] = {}
        self._since: dict[str, float] = {}

    def offer(self, key: str, seq: int, item: Any) -> Offer:
        """Take one record; return the items that became ready (possibly none)."""
        last = self.applied.get(key, 0)
        if seq <= last:
            if last - seq > self.gap_max_count:
                return Offer(refused=f"seq {seq} of {key!r} is {last - seq} behind the last applied seq {last}, "
                                     f"more than gap_max_count {self.gap_max_count}")
            return Offer(duplicate=True)
        if seq == last + 1:
            self.applied[key] = seq
            return Offer(ready=[item] + self._release(key))
        seqs = self._parked_seqs.setdefault(key, set())
        if seq in seqs:
            return Offer(duplicate=True)  # its parked copy is in the checkpoint already
        seqs.add(seq)
        heapq.heappush(self._parked.setdefault(key, []), (seq, item, self.pack_item(item)))
        self._since.setdefault(key, self.clock())
        if len(seqs) >= self.gap_max_count:
            return Offer(parked=True, ready=self._skip_gap(key))
        return Offer(parked=True)

    def in_order(self, key: str, seq: int) -> bool:
        """Apply ``seq`` at once if it is ``key``'s next and nothing of ``key`` is parked; else change nothing.

        The common case of :meth:`offer` without building an :class:`Offer`:
        when it returns False, :meth:`offer` the record.
        """
        if seq == self.applied.get(key, 0) + 1 and key not in self._parked:
            self.applied[key] = seq
            return True
        return False

    def take_in_order(self, keys: list, seqs: list) -> dict[str, int] | None:
        """The last ``seq`` per key if the rows ``(keys[i], seqs[i])`` are all next of their key, in order; else None.

        The columnar form of :meth:`in_order`: nothing may be parked (a gap
        anywhere sends the batch through :meth:`offer`), every key a non-empty
        str, every seq an int. Changes nothing: the caller applies the result
        with :meth:`advance` once the batch's records took effect.
        """
        if self._parked:
            return None
        last: dict[str, int]
        applied, last = self.applied, {}
        for key, seq in zip(keys, seqs, strict=False):
            previous = last.get(key)
            if previous is None:
                if type(key) is not str or not key:
                    return None
                previous = applied.get(key, 0)
            if seq != previous + 1 or type(seq) is not int:
                return None
            last[key] = seq
        return last

    def advance(self, last: dict[str, int]) -> None:
        """Record ``last`` (from :meth:`take_in_order`) as applied."""
        self.applied.update(last)

    def expire(self) -> list[Any]:
        """Give up gaps that waited longer than ``gap_max_ms``; return the items released."""
        now, ready = self.clock(), []
        for key, since in list(self._since.items()):
            if now - since >= self.gap_max_s:
                ready += self._skip_gap(key)
        return ready

    def expiry_due(self) -> bool:
        """Whether some key has waited ``gap_max_ms`` for its gap (so :meth:`expire` would release records)."""
        now = self.clock()
        return any(now - since >= self.gap_max_s for since in self._since.values())

    def parked_count(self) -> int:
        """How many records wait for a gap to fill, over all keys."""
        return sum(len(seqs) for seqs in self._parked_seqs.values())

    def _release(self, key: str) -> list[Any]:
        ready: list[Any]
        parked, ready = self._parked.get(key), []
        if not parked:
            return ready
        seqs = self._parked_seqs[key]
        while parked and parked[0][0] == self.applied[key] + 1:
            seq, item, _ = heapq.heappop(parked)
            seqs.discard(seq)
            self.applied[key] = seq
            ready.append(item)
        if not parked:
            del self._parked[key], self._parked_seqs[key], self._since[key]
        elif ready:
            self._since[key] = self.clock()  # a new gap, below the records still parked
        return ready

    def _skip_gap(self, key: str) -> list[Any]:
        first = self._parked[key][0][0]
        self.gaps += first - self.applied.get(key, 0) - 1
        self.applied[key] = first - 1
        return self._release(key)

    def state(self) -> dict[str, Any]:
        """The position and the parked records, to checkpoint."""
        return {"applied": dict(self.applied), "gaps": self.gaps,
                "parked": {key: [[seq, packed] for seq, _, packed in parked] for key, parked in self._parked.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from a checkpoint; parked records wait again from now."""
        self.applied = {str(k): int(v) for k, v in state.get("applied", {}).items()}
        self.gaps = int(state.get("gaps", 0))
        self._parked, self._parked_seqs, self._since = {}, {}, {}
        now = self.clock()
        for key, entries in state.get("parked", {}).items():
            heap = [(int(seq), self.unpack_item(packed), packed) for seq, packed in entries]
            heapq.heapify(heap)
            self._parked[key], self._parked_seqs[key], self._since[key] = heap, {s for s, _, _ in heap}, now


class Checkpoint:
    """One replica's checkpoint: two slot files written in turn, each durable once :meth:`save` returns.

    A checkpoint goes into the slot that does not hold the newest one, headed by
    a sequence number, its length and a CRC-32, with one ``pwrite`` and one
    ``fdatasync`` on a file kept open: no temporary file, rename or directory
    fsync each time. :meth:`load` takes the newest slot whose CRC holds. A crash
    while a slot is written leaves it torn and the other one whole: the replica
    restarts from the other, older checkpoint, whose inputs were finished; the
    inputs of the torn one were not (a worker finishes them only once
    ``save`` returned), so nsqd delivers them again. The slots are ``PATH.0``
    and ``PATH.1``; a checkpoint of the single-file format (``PATH``, written
    by earlier versions) is read when there is no slot yet, and removed once
    a slot holds the state.

    :meth:`encode` and :meth:`write` split :meth:`save`, so that a worker can
    encode on its event loop and leave only the two system calls to a thread.
    """

    def __init__(self, path: Path):
        self.path = path
        self.slots = (path.with_name(path.name + ".0"), path.with_name(path.name + ".1"))
        self._fds: list[int | None] = [None, None]
        self._seq = 0  # the newest checkpoint's sequence number (0: none yet)

    def save(self, sequencer_state: dict[str, Any], handler_state: bytes | None) -> None:
        """Write a new checkpoint; once this returns, it survives a crash or power loss."""
        self.write(self.encode(sequencer_state, handler_state))

    def encode(self, sequencer_state: dict[str, Any], handler_state: bytes | None) -> bytes:
        """The next checkpoint's bytes, header included, for :meth:`write`."""
        payload = msgpack.packb({"sequencer": sequencer_state, "handler": handler_state}, use_bin_type=True)
        return _SLOT_HEADER.pack(_SLOT_MAGIC, CHECKPOINT_VERSION, self._seq + 1, len(payload),
                                 zlib.crc32(payload)) + payload

    def write(self, data: bytes) -> None:
        """Write :meth:`encode`'s bytes into the other slot and make them durable."""
        slot = (self._seq + 1) % 2
        fd = self._fds[slot]
        if fd is None:
            fd = self._fds[slot] = self._open(self.slots[slot])
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)
        self._seq += 1
        if self._seq <= 2 and self.path.exists():
            self.path.unlink()  # the old format's file: a slot holds newer state now
            self._sync_folder()

    def _open(self, path: Path) -> int:
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            self._sync_folder()  # the new file's name must survive a power loss too
        return fd

    def _sync_folder(self) -> None:
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def load(self) -> tuple[dict[str, Any], bytes | None] | None:
        """The newest saved (sequencer state, handler state), or None when there is no checkpoint yet.

        Raises:
            ValueError: a checkpoint of another format version.
        """
        newest = None
        for slot in self.slots:
            found = self._read_slot(slot)
            if found is not None and (newest is None or found[0] > newest[0]):
                newest = found
        if newest is not None:
            self._seq, data = newest
        else:
            self._seq = 0
            try:
                data = msgpack.unpackb(self.path.read_bytes(), raw=False)  # the single-file format
            except FileNotFoundError:
                return None
            if data.get("version") != 1:
                raise ValueError(f"{self.path}: checkpoint version {data.get('version')!r} is not 1")
        return data["sequencer"], data["handler"]

    def _read_slot(self, path: Path) -> tuple[int, dict] | None:
        """(sequence number, contents) of a whole slot; None for a missing, empty or torn one."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < _SLOT_HEADER.size:
            return None
        magic, version, seq, length, crc = _SLOT_HEADER.unpack_from(raw)
        payload = raw[_SLOT_HEADER.size:_SLOT_HEADER.size + length]
        if magic != _SLOT_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            return None  # torn by a crash while it was written
        if version != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {version} is not {CHECKPOINT_VERSION}")
        return seq, msgpack.unpackb(payload, raw=False)

    def close(self) -> None:
        """Close the slot files (a later save opens them again)."""
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None
