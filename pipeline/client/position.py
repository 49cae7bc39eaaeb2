"""A producer's durable position: each key's last ``seq``, and how far into a file nsqd has acknowledged.

A keyed stage applies each key's records once, in ``seq`` order, and takes a
``seq`` it has already applied for a redelivery. So a producer must never
number a key from 1 again: its second run, a restart halfway through a file
and tomorrow's file all continue where the last acknowledged record left off.
:class:`Position` keeps that on disk, one JSON file per topic
(``<var_dir>/producers/<topic>.json``), written atomically (temporary file,
fsync, rename, fsync of the folder) and only with what nsqd acknowledged:

- ``seq``: per key, the last ``seq`` acknowledged;
- ``source``: the file being published, the byte offset and line up to which
  every record was acknowledged, a SHA-256 of those bytes, and whether the run
  finished. A run that stopped early (SIGKILL, an error) is resumed from there
  when the same file, with the same bytes up to that offset, is published
  again; the records it may have sent past that point get the same ``seq``
  again, so the keyed stage drops them as redeliveries.

The file is locked (``flock``) while a producer holds it: two producers of
one topic on one machine cannot interleave their numbering. What holds with
two producers of one key on two machines is in docs/PRODUCING.md.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.records.sources import SourceMark

VERSION = 1


class PositionError(PipelineError):
    """Raised when a position file is held by another producer, or cannot be read."""


@dataclass
class Position:
    """One topic's producer position; :meth:`open` locks and reads it, :meth:`save` makes it durable.

    ``path`` None keeps the position in memory only (numbering starts at 1 in
    every run: for tests and throw-away topologies).
    """

    path: Path | None
    seq: dict[str, int] = field(default_factory=dict)
    source: SourceMark | None = None
    _fd: int | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None) -> Position:
        """Lock the position file at ``path`` (created if missing) and read it.

        Raises:
            PositionError: another producer holds the file, or it is not a position file.
        """
        if path is None:
            return cls(None)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PositionError(f"another producer is publishing to this topic from this machine "
                                f"(it holds {path}.lock); wait for it, or stop it") from None
        position = cls(path, _fd=fd)
        try:
            position._read()
        except Exception:
            position.close()
            raise
        return position

    def _read(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise PositionError(f"{self.path}: not a producer position file ({e}); move it away to start "
                                "numbering afresh, knowing a keyed stage drops the seqs it has seen") from e
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise PositionError(f"{self.path}: position file version {data.get('version')!r} is not {VERSION}"
                                if isinstance(data, dict) else f"{self.path}: not a producer position file")
        self.seq = {str(k): int(v) for k, v in data.get("seq", {}).items()}
        source = data.get("source")
        self.source = SourceMark(**source) if isinstance(source, Mapping) else None

    def save(self, seq: Mapping[str, int], source: SourceMark | None) -> None:
        """Record ``seq`` and ``source`` as acknowledged; durable once this returns."""
        self.seq, self.source = dict(seq), source
        if self.path is None:
            return
        data = {"version": VERSION, "seq": self.seq, "source": source.as_json() if source else None}
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def resumable(self, path: str) -> SourceMark | None:
        """The mark of an unfinished run of the file at ``path`` whose bytes up to its offset are unchanged.

        None when the last run of that file finished, another file was
        published since, or the file's first ``offset`` bytes changed.
        """
        mark = self.source
        if mark is None or mark.done or mark.path != path or mark.offset == 0:
            return None
        digest, left = hashlib.sha256(), mark.offset
        try:
            with open(path, "rb") as f:
                while left > 0 and (block := f.read(min(left, 1 << 20))):
                    digest.update(block)
                    left -= len(block)
        except OSError:
            return None
        return mark if left == 0 and digest.hexdigest() == mark.sha256 else None

    def close(self) -> None:
        """Release the lock (the position stays on disk)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
