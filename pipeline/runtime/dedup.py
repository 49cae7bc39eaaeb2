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

The digests are written to ``<var_dir>/state/<stage>-<replica>.seen`` at
most once a second and when the replica drains, so a restarted replica
still knows what its predecessor took (up to the last second of it: those
copies are applied again, as a crash redelivers a batch).

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

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"NSQPSEEN1\n"
CHECKPOINT_EVERY = 1.0  # seconds


def digest(body: bytes) -> int:
    """A body's 64-bit digest (BLAKE2b): stable across processes, so it can be checkpointed."""
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little")


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
        self.current: set[int] = set()
        self.previous: set[int] = set()
        self.pending: dict[int, list[Any]] = {}  # digest of a lead in hand -> its riders
        self.leads: dict[int, int] = {}  # id() of a lead message in hand -> its digest
        self.dropped = 0  # copies finished unprocessed
        self._dirty, self._saved = False, time.monotonic()
        if path is not None:
            self._load(path)

    def __len__(self) -> int:
        return len(self.current) + len(self.previous)

    def seen(self, value: int) -> bool:
        """True when the body with digest ``value`` was taken (and not yet forgotten)."""
        return value in self.current or value in self.previous

    def admit(self, messages: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """Sort a batch: return ``(leads, seen)``; the riders are kept until :meth:`settle` of their lead."""
        leads: list[Any] = []
        seen: list[Any] = []
        pending, current, previous = self.pending, self.current, self.previous
        for message in messages:
            value = digest(message.body)
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

    def settle(self, leads: Sequence[Any], finished: Collection[Any]) -> tuple[list[Any], list[Any]]:
        """The batch of ``leads`` is answered: those in ``finished`` were finished, the others requeued.

        Returns ``(finish, requeue)``: the riders to answer like their leads.
        A finished lead's body counts as taken from now on.
        """
        done = {id(message) for message in finished}
        finish: list[Any] = []
        requeue: list[Any] = []
        for message in leads:
            value = self.leads.pop(id(message), None)
            if value is None:
                continue
            riders = self.pending.pop(value, [])
            if id(message) in done:
                self._remember(value)
                finish += riders
            else:
                requeue += riders
        self.dropped += len(finish)
        return finish, requeue

    def _remember(self, value: int) -> None:
        if len(self.current) >= self.half:
            self.previous, self.current = self.current, set()
        self.current.add(value)
        self._dirty = True

    # -- the checkpoint ------------------------------------------------------

    def checkpoint(self, force: bool = False) -> bool:
        """Write the digests when they changed and ``every`` seconds passed (or ``force``); True if written."""
        if self.path is None or not self._dirty or (not force and time.monotonic() - self._saved < self.every):
            return False
        previous = np.fromiter(self.previous, dtype=np.uint64, count=len(self.previous))
        current = np.fromiter(self.current, dtype=np.uint64, count=len(self.current))
        header = MAGIC + np.array([len(previous), len(current)], dtype="<u8").tobytes()
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # no fsync: a process that dies leaves its writes in the page cache
            f.write(header + previous.astype("<u8").tobytes() + current.astype("<u8").tobytes())
        os.replace(tmp, self.path)
        self._dirty, self._saved = False, time.monotonic()
        return True

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        head = len(MAGIC) + 16
        counts = np.frombuffer(data[len(MAGIC):head], dtype="<u8") if data.startswith(MAGIC) else None
        if counts is None or len(counts) != 2 or len(data) != head + 8 * int(counts.sum()):
            log.warning("%s is not a checkpoint of seen messages; starting with none remembered (copies taken "
                        "before are applied again)", path)
            return
        values = np.frombuffer(data[head:], dtype="<u8")
        split = int(counts[0])
        self.previous = set(values[:split].tolist())
        self.current = set(values[split:].tolist())
