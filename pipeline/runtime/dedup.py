"""A replicated topic's copies applied once by a plain stage (docs/RELIABILITY.md, "Replicated topics").

Every message of a replicated topic is on two (or three) nsqd, and a
replica of the stage reading it reads its partition on every node, so both
copies reach the same replica, byte for byte the same. :class:`Deduper`
keeps a 64-bit digest of each body the replica has taken, in two
generations of ``window / 2`` digests each (the older generation is
forgotten when the newer fills), and sorts each batch into:

- *leads*: bodies not seen before; the handler runs on them;
- *riders*: copies of a lead still being processed; they are answered
  as their lead is (finished with it, or requeued with it), so a copy is
  never finished while its twin could still fail;
- *seen*: copies of a body already taken; finished at once, unprocessed.

The digests are written to ``<var_dir>/state/<stage>-<replica>.seen`` (and
the older generation to ``.seen.prev``) at most once a second, by appending
the new ones, and when the replica drains, so a restarted replica still
knows what its predecessor took (up to the last second of it: those copies
are applied again, as a crash redelivers a batch).

A copy that comes more than ``window`` messages after its twin is applied
again: a duplicate downstream, never a loss. A body published twice on
purpose (two records with the same bytes) is applied once; a replicated
topic's records are told apart by their key, so they differ.

Example::

    dedup = Deduper(200_000, var / "state" / "primes-0.seen")
    leads, seen = dedup.admit(messages)      # finish `seen` now, process `leads`
    fin, req = dedup.settle(leads, finished)  # then answer the riders like their leads
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"NSQPSEEN2\n"
CHECKPOINT_EVERY = 1.0  # seconds


_BLAKE2B = hashlib.blake2b


def digest(body: bytes) -> bytes:
    """A body's 64-bit digest (8 bytes of BLAKE2b): stable across processes, so it can be checkpointed."""
    return _BLAKE2B(body, digest_size=8).digest()


class Deduper:
    """The bodies one replica has taken, the ones in hand, and their copies waiting for them.

    Parameters:
        window: digests remembered (two generations of half as many).
        path: the checkpoint file; None keeps nothing across restarts.
        every: seconds between two checkpoints.
    """

    def __init__(self, window: int, path: Path | None = None, every: float = CHECKPOINT_EVERY):
        self.half = max(1, window // 2)
        self.path, self.every = path, every
        self.current: set[bytes] = set()
        self.previous: set[bytes] = set()
        self.pending: dict[bytes, list[Any]] = {}  # digest of a lead in hand -> its riders
        self.leads: dict[int, bytes] = {}  # id() of a lead message in hand -> its digest
        self.dropped = 0  # copies finished unprocessed
        self._dirty, self._saved = False, time.monotonic()
        self._new: list[bytes] = []  # digests remembered since the last checkpoint
        self._rotated = False  # the newer generation became the older since the last checkpoint
        if path is not None:
            self._load(path)

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def seen(self, value: bytes) -> bool:
        """True when the body with digest ``value`` was taken (and not yet forgotten)."""
        return value in self.current or value in self.previous

    def admit(self, messages: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """Sort a batch: return ``(leads, seen)``; the riders are kept until :meth:`settle` of their lead."""
        leads: list[Any] = []
        seen: list[Any] = []
        pending, current, previous, blake2b = self.pending, self.current, self.previous, _BLAKE2B
        for message in messages:
            value = blake2b(message.body, digest_size=8).digest()
            if value in current or value in previous:
                seen.append(message)
            elif value in pending:
                pending[value].append(message)
            else:
                pending[value] = []
                self.leads[id(message)] = value
                leads.append(message)
        self.dropped += len(seen)
        return leads, seen

    def settle(self, leads: Sequence[Any], finished: Collection[Any],
               dead: Collection[Any] = ()) -> tuple[list[Any], list[Any]]:
        """The batch of ``leads`` is answered: those in ``finished`` were finished, the others requeued.

        Returns ``(finish, requeue)``: the riders to answer like their leads.
        A finished lead's body counts as taken from now on, unless it is in ``dead`` (finished as a dead
        letter): re-driven later, the same bytes must be processed, not taken for a copy.
        """
        done = {id(message) for message in finished}
        forget = {id(message) for message in dead}
        finish: list[Any] = []
        requeue: list[Any] = []
        for message in leads:
            value = self.leads.pop(id(message), None)
            if value is None:
                continue
            riders = self.pending.pop(value, [])
            if id(message) in done:
                if id(message) not in forget:
                    self._remember(value)
                finish += riders
            else:
                requeue += riders
        self.dropped += len(finish)
        return finish, requeue

    def _remember(self, value: bytes) -> None:
        if len(self.current) >= self.half:
            self.previous, self.current = self.current, set()
            self._rotated = True
            self._new.clear()  # the whole newer generation is written at the next checkpoint
        self.current.add(value)
        if not self._rotated:
            self._new.append(value)
        self._dirty = True

    # -- the checkpoint ------------------------------------------------------

    def checkpoint(self, force: bool = False) -> bool:
        """Write what changed when ``every`` seconds passed (or ``force``); True if something was written.

        The digests taken since the last checkpoint are appended to ``path`` (a few a second, not the
        window); when the newer generation filled and became the older, the older is written whole to
        ``<path>.prev`` and ``path`` starts again. No fsync: a process that dies leaves its writes in the
        page cache; a write it was in the middle of leaves a partial digest at the end, which is dropped.
        """
        if self.path is None or not self._dirty or (not force and time.monotonic() - self._saved < self.every):
            return False
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._rotated or not path.exists():
            _write_atomic(path.with_name(path.name + ".prev"), MAGIC + b"".join(self.previous))
            _write_atomic(path, MAGIC + b"".join(self.current))
            self._rotated = False
        else:
            with open(path, "ab") as f:
                f.write(b"".join(self._new))
        self._new.clear()
        self._dirty, self._saved = False, time.monotonic()
        return True

    def _load(self, path: Path) -> None:
        generations: list[set[bytes]] = []
        for file in (path.with_name(path.name + ".prev"), path):
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                generations.append(set())
                continue
            if not data.startswith(MAGIC):
                log.warning("%s is not a checkpoint of seen messages; starting with none remembered (copies "
                            "taken before are applied again)", file)
                return
            end = len(data) - (len(data) - len(MAGIC)) % 8  # a digest cut short by a crash is dropped
            generations.append({data[i:i + 8] for i in range(len(MAGIC), end, 8)})
        self.previous, self.current = generations


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
