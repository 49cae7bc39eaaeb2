"""A sink stage: append every record, as one JSON line, to files on local disk.

A topology names it as ``handler: consumers.archive:Archive`` with no outputs::

    stages:
      archive:
        handler: consumers.archive:Archive
        input: prime
        channel: archive
        params: {max_bytes: 67108864, rotate: hourly, gzip: true}

Each replica writes its own files, so replicas never share one and need no
locking. In ``dir`` (default ``<var_dir>/archive/<stage>``) they are named::

    <stage>-r<replica>-<YYYYmmddTHH>.jsonl       first file of a UTC hour
    <stage>-r<replica>-<YYYYmmddTHH>.<N>.jsonl   the next ones, after the size cap
    ...jsonl.gz                                  a rotated file, when gzip is on

Durability: a call writes its lines, then flushes and fsyncs the file before it
returns, because the runtime FINs the inputs as soon as a sink returns. A new
file's directory entry is fsynced too.

Idempotency: a record whose ``id`` is already in the open file is not written
again, so a batch redelivered after a crash, or retried after a failed call, is
not duplicated there. The scope is the open file only: a record redelivered
after its file was rotated is written again (delivery is at-least-once).
Records without an ``id`` (or with ``"id": null``) are always written.

A call that fails (a full disk, an fsync error) cuts the file back to its last
fsynced size before raising, so the runtime's retry writes those records again
rather than trusting lines that may not be on disk. A file whose compression
failed stays plain until the next start compresses it.

Crash recovery, when a file is opened: an incomplete last line (no trailing
newline, left by a crash mid-write) is truncated away; its record was never
fsynced, so it was never FINed and NSQ delivers it again. At construction,
``.gz.tmp`` files left by an interrupted compression are deleted, a plain file
whose ``.gz`` exists is deleted (the ``.gz`` is renamed into place only once
complete), and with ``gzip`` on, this replica's other plain files are
compressed. Then the newest file of the current hour (of any hour with
``rotate: none``) is resumed if it is plain and under the cap.

Called directly::

    from pathlib import Path
    from pipeline.stage import Batch, StageContext
    from consumers.archive import Archive

    archive = Archive(StageContext("archive", 0, Path("var")))
    archive(Batch([{"id": 1, "n": 7}]))   # {} : a sink emits nothing
    # var/archive/archive/archive-r0-20240501T13.jsonl now ends with {"id":1,"n":7}
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from gzip import GzipFile
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple

import orjson

from pipeline.stage import Batch, Record, StageContext

__all__ = ["Archive", "ArchiveParams", "gzip_file"]

log = logging.getLogger(__name__)

MiB = 1 << 20
ROTATE_MODES = ("hourly", "none")
HOUR_FORMAT = "%Y%m%dT%H"
_NO_JSON = "record cannot be archived as JSON"


# ---------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveParams:
    """The validated ``params`` of an archive stage.

    Parameters:
        dir: the directory the files go in; from the param ``dir``, default
            ``archive/<stage>``, taken relative to the var dir unless absolute.
        max_bytes: the size cap of a file: a line that would take the file past
            it goes to a new file (a line longer than the cap gets a file alone).
        rotate: ``"hourly"``: a new file each UTC hour; ``"none"``: only at the cap.
        gzip: compress a file when it is rotated.
    """

    dir: Path
    max_bytes: int = 64 * MiB
    rotate: str = "hourly"
    gzip: bool = False

    @classmethod
    def from_context(cls, context: StageContext) -> ArchiveParams:
        """Validate ``context.params`` and resolve ``dir`` against ``context.var_dir``.

        Raises:
            ValueError: a param is unknown or has a bad value; the message names it.
        """
        params = dict(context.params)
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            known = ", ".join(sorted(cls.__dataclass_fields__))
            raise ValueError(f"archive: unknown param(s) {', '.join(map(repr, unknown))} (known: {known})")
        directory = _check_dir(params.get("dir", Path("archive", context.stage)))
        return cls(
            dir=Path(context.var_dir) / directory,
            max_bytes=_check_max_bytes(params.get("max_bytes", cls.max_bytes)),
            rotate=_check_rotate(params.get("rotate", cls.rotate)),
            gzip=_check_bool("gzip", params.get("gzip", cls.gzip)),
        )


def _check_dir(value: Any) -> Path:
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return Path(value)
    raise ValueError(f"archive param 'dir' must be a non-empty path, got {value!r}")


def _check_max_bytes(value: Any) -> int:
    # `type(...) is int` keeps out bool (an int subclass) and floats such as 1e6.
    if type(value) is int and value > 0:
        return value
    raise ValueError(f"archive param 'max_bytes' must be a positive integer (bytes), got {value!r}")


def _check_rotate(value: Any) -> str:
    if value in ROTATE_MODES:
        return value
    raise ValueError(f"archive param 'rotate' must be one of {', '.join(map(repr, ROTATE_MODES))}, got {value!r}")


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"archive param {name!r} must be true or false, got {value!r}")


def _check_stage_name(stage: str) -> None:
    if not stage or stage in (".", "..") or any(sep and sep in stage for sep in (os.sep, os.altsep, "\0")):
        raise ValueError(f"archive: stage name {stage!r} cannot be used in a file name")


# ---------------------------------------------------------------------------
# Files: names, fsync, compression
# ---------------------------------------------------------------------------

class _Name(NamedTuple):
    """What a file name of this replica says: its hour, its index within the hour, its suffix."""

    hour: str
    index: int
    ext: str  # "" (plain), ".gz" or ".gz.tmp"


def _fsync_dir(directory: Path) -> None:
    """Make the creation, rename or removal of a file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def gzip_file(path: Path) -> Path:
    """Replace ``path`` by ``path.gz`` atomically and return the new path.

    The data is written to ``.gz.tmp`` and fsynced, renamed to ``.gz``, and only
    then is the plain file deleted: a crash leaves the plain file, or a complete
    ``.gz`` (with or without the plain file), never a partial ``.gz``.
    """
    gz_path = path.with_name(path.name + ".gz")
    tmp = path.with_name(path.name + ".gz.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as raw:
        with GzipFile(filename=path.name, mode="wb", fileobj=raw) as out:
            shutil.copyfileobj(src, out, MiB)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, gz_path)
    _fsync_dir(path.parent)
    path.unlink()
    _fsync_dir(path.parent)
    return gz_path


class _Segment:
    """One open archive file: its handle, its size and the ids of the records in it."""

    def __init__(self, path: Path, name: _Name):
        self.path, self.name = path, name
        created = not path.exists()
        self.ids, self.size = (set(), 0) if created else _scan(path)
        self.synced = self.size  # the size the last fsync made durable
        self.handle: BinaryIO = open(path, "ab")
        if created:
            _fsync_dir(path.parent)

    def write(self, line: bytes, key: bytes | None) -> None:
        """Append ``line`` (newline included), remembering ``key`` as written."""
        self.handle.write(line)
        self.size += len(line)
        if key is not None:
            self.ids.add(key)

    def sync(self) -> None:
        """Push the written lines to the disk: the runtime FINs them once the handler returns."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.synced = self.size

    def close(self) -> None:
        """Close the file, without the fsync :meth:`sync` does."""
        self.handle.close()

    def discard(self) -> None:
        """Close the file after a failed write, cutting it back to what the last fsync made durable.

        Lines written since may be partial, or, after a failed fsync, only in the
        page cache: trusting them would skip their ids when the batch is retried.
        """
        try:
            self.handle.close()
        except OSError as e:  # its flush failing too
            log.warning("%s: closing after a failed write: %s", self.path, e)
        try:
            os.truncate(self.path, self.synced)
        except OSError as e:  # reopening truncates a torn last line anyway
            log.warning("%s: cannot cut back to %d bytes after a failed write: %s", self.path, self.synced, e)


def _scan(path: Path) -> tuple[set[bytes], int]:
    """Return the id keys of the records in ``path`` and its size, truncating a torn last line."""
    ids: set[bytes] = set()
    size = 0
    with open(path, "r+b") as f:
        for line in f:
            if not line.endswith(b"\n"):
                log.warning("%s: truncating an incomplete last line of %d bytes (a crash mid-write)",
                            path, len(line))
                f.truncate(size)
                f.flush()
                os.fsync(f.fileno())
                break
            size += len(line)
            key = _line_key(path, line)
            if key is not None:
                ids.add(key)
    return ids, size


def _line_key(path: Path, line: bytes) -> bytes | None:
    """Return the id key of the record on ``line`` of ``path``, or None if it has none."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        # Not ours (we write whole lines only); keep it and go on, as a reader would.
        log.warning("%s: ignoring a line that is not JSON: %s", path, e)
        return None
    return _id_key(record)


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

def _id_key(record: Any) -> bytes | None:
    """Return the record's ``id`` as JSON, to compare ids by value and JSON type; None if it has none.

    Comparing encoded ids keeps ``1``, ``1.0``, ``true`` and ``"1"`` apart,
    and makes list or object ids hashable.
    """
    if isinstance(record, dict) and record.get("id") is not None:
        return orjson.dumps(record["id"])
    return None


def _has_non_finite(value: Any) -> bool:
    """Return True when ``value`` holds a NaN or infinite float anywhere."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _encode(batch: Batch) -> list[tuple[bytes | None, bytes]]:
    """Return ``(id key, JSON line)`` for each record of ``batch``; reject those JSON cannot hold."""
    lines = []
    for i, record in enumerate(batch.records):
        try:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError as e:
            batch.reject(i, f"{_NO_JSON}: {e}")
            continue
        # orjson writes NaN and Infinity as null, silently; JSON has no form for them.
        if b"null" in line and _has_non_finite(record):
            batch.reject(i, f"{_NO_JSON}: it holds a NaN or infinite float")
            continue
        lines.append((_id_key(record), line))
    return lines


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

class Archive:
    """A sink stage that appends each record as a JSON line to this replica's current file.

    Constructed once per replica by the runtime as ``Archive(context)``; see the
    module docstring for the files it writes and how it recovers from a crash.

    Parameters:
        context: the stage's name, replica number, var dir and ``params``
            (``dir``, ``max_bytes``, ``rotate``, ``gzip``: see :class:`ArchiveParams`).
        clock: returns the time in seconds since the epoch, like :func:`time.time`
            (the default); it picks the UTC hour in file names. Tests inject one.

    Raises:
        ValueError: a param is bad (the message names it), the stage name cannot
            be part of a file name, or ``dir`` cannot be created.
    """

    def __init__(self, context: StageContext, *, clock: Callable[[], float] = time.time):
        self.params = ArchiveParams.from_context(context)
        _check_stage_name(context.stage)
        self.stage, self.replica, self.clock = context.stage, context.replica, clock
        self._prefix = f"{context.stage}-r{context.replica}-"
        self._pattern = re.compile(
            re.escape(self._prefix) + r"(\d{8}T\d{2})(?:\.(\d+))?\.jsonl(\.gz|\.gz\.tmp)?")
        try:
            self.params.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"archive param 'dir': cannot create {self.params.dir}: {e}") from e
        self._clean_up()
        self._segment: _Segment | None = self._open_newest(self._hour())
        if self.params.gzip:
            self._compress_leftovers()

    @property
    def path(self) -> Path | None:
        """The file records are appended to now; None until one is opened."""
        return self._segment.path if self._segment else None

    def __call__(self, batch: Batch) -> dict[str, list[Record]]:
        """Append the batch's records to the current file and fsync it; return ``{}`` (no outputs)."""
        lines = _encode(batch)
        if lines:
            try:
                self._append(lines, self._hour())
            except BaseException:
                # The next call reopens the file, as cut back by discard(), and
                # re-reads its ids, so the retried batch is written whole.
                self._abandon()
                raise
        return {}

    def close(self) -> None:
        """Fsync and close the current file; it stays plain, to be resumed by the next start."""
        if self._segment is not None:
            segment, self._segment = self._segment, None
            try:
                segment.sync()
            finally:
                segment.close()

    # -- writing ------------------------------------------------------------

    def _hour(self) -> str:
        return datetime.fromtimestamp(self.clock(), timezone.utc).strftime(HOUR_FORMAT)

    def _append(self, lines: list[tuple[bytes | None, bytes]], hour: str) -> None:
        segment = self._current(hour)
        for key, line in lines:
            if key is not None and key in segment.ids:
                continue
            if segment.size and segment.size + len(line) > self.params.max_bytes:
                self._rotate()
                segment = self._segment = self._open_new(hour)
            segment.write(line, key)
        segment.sync()

    def _current(self, hour: str) -> _Segment:
        """Return the open file for ``hour``, rotating or opening one as needed."""
        if self._segment is not None and self.params.rotate == "hourly" and self._segment.name.hour != hour:
            self._rotate()
        if self._segment is None:
            self._segment = self._open_newest(hour) or self._open_new(hour)
        return self._segment

    def _rotate(self) -> None:
        """Close the current file for good, compressing it when ``gzip`` is on."""
        segment = self._segment
        # Lines written since the last call's fsync; if this fails, the file is
        # still current, so __call__ discards it and cuts those lines off.
        segment.sync()
        self._segment = None
        segment.close()
        if self.params.gzip:
            gzip_file(segment.path)

    def _abandon(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.discard()

    # -- files ---------------------------------------------------------------

    def _file_name(self, name: _Name) -> str:
        index = f".{name.index}" if name.index else ""
        return f"{self._prefix}{name.hour}{index}.jsonl{name.ext}"

    def _files(self, hour: str | None = None) -> dict[_Name, Path]:
        """Return this replica's files in ``dir`` (of ``hour`` only, if given) by their parsed names."""
        files = {}
        for path in self.params.dir.iterdir():
            match = self._pattern.fullmatch(path.name)
            if match and (hour is None or match[1] == hour):
                files[_Name(match[1], int(match[2] or 0), match[3] or "")] = path
        return files

    def _open_newest(self, hour: str) -> _Segment | None:
        """Open this replica's newest file to resume it, if it is plain and under the cap.

        With ``rotate: hourly`` only a file of ``hour`` is resumed; with ``none``, one of any hour.
        """
        files = self._files(hour if self.params.rotate == "hourly" else None)
        if not files:
            return None
        name = max(files, key=lambda n: (n.hour, n.index))
        path = files[name]
        if name.ext or path.stat().st_size >= self.params.max_bytes:
            return None
        return _Segment(path, name)

    def _open_new(self, hour: str) -> _Segment:
        """Create the next file of ``hour``: the first index not used by any of its files."""
        used = [n.index for n in self._files(hour)]
        name = _Name(hour, max(used) + 1 if used else 0, "")
        return _Segment(self.params.dir / self._file_name(name), name)

    def _clean_up(self) -> None:
        """Undo what a crash during :func:`gzip_file` left: partial ``.gz.tmp``, plain files already compressed."""
        files = self._files()
        for name, path in files.items():
            compressed = name._replace(ext=".gz") in files
            if name.ext == ".gz.tmp" or (name.ext == "" and compressed):
                log.info("%s: removing what an interrupted compression left", path)
                path.unlink()

    def _compress_leftovers(self) -> None:
        """Compress this replica's plain files other than the open one (left by a stop or crash)."""
        current = self.path
        for name, path in sorted(self._files().items()):
            if name.ext == "" and path != current:
                log.info("%s: compressing a file left by an earlier run", path)
                gzip_file(path)
