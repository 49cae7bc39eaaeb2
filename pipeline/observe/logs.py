"""Show the logs of a stage's workers (``pipeline logs``), optionally following them.

Replica ``k`` of stage ``S`` writes to ``<var_dir>/log/S-k.log``; supervisord
rotates that file at 10 MB into ``S-k.log.1`` ... and starts a new one. Every
line printed is prefixed with its replica, ``S-k | ``. Following polls the
files' sizes and inodes, so it needs no inotify and survives rotation
(a new inode, or a file that shrank, is read again from its start) and
scaling (replica files that appear later are read from their start). Example::

    from pipeline.observe.logs import stage_logs
    from pipeline.config import load_topology

    stage_logs(load_topology("topology.yaml"), "primes", lines=20, follow=True, out=sys.stdout)
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from pipeline.errors import PipelineError

_BLOCK = 64 * 1024


def check_stage(topology, stage: str) -> None:
    """Raise unless ``topology`` has a stage called ``stage``.

    Raises:
        PipelineError: ``no stage 'x' (stages: a, b)``, one line a CLI can show as is.
    """
    try:
        topology.stage(stage)
    except KeyError:
        known = ", ".join(topology.stages) or "none"
        raise PipelineError(f"no stage {stage!r} (stages: {known})") from None


def log_dir(topology) -> Path:
    """Return the directory the workers' logs are written to, ``<var_dir>/log``."""
    return topology.var_dir / "log"


def replica_logs(directory: Path, stage: str) -> list[Path]:
    """Return the current log file of each replica of ``stage`` in ``directory``, by replica number."""
    # The glob alone would also match stage "a-b"'s files for stage "a"; the pattern keeps S-<k>.log only.
    pattern = re.compile(rf"{re.escape(stage)}-(\d+)\.log")
    found = [(int(m.group(1)), p) for p in directory.glob(f"{stage}-*.log")
             if (m := pattern.fullmatch(p.name)) is not None]
    return [p for _, p in sorted(found)]


def stage_logs(topology, stage: str, *, lines: int = 50, follow: bool = False, out: TextIO,
               poll: float = 0.2, until: Callable[[], bool] | None = None) -> None:
    """Print the last ``lines`` lines of each replica's log of ``stage``, then follow them if asked.

    Parameters:
        topology: the :class:`~pipeline.config.topology.Topology`; logs are under its ``var_dir``.
        stage: the stage's name.
        lines: lines shown per replica before following (0: none).
        follow: keep printing lines appended to any replica's log, until ``until()`` or Ctrl-C.
        out: where the lines go; flushed after each poll.
        poll: seconds between two looks at the files while following.
        until: checked after each poll; following stops once it returns True.

    Raises:
        PipelineError: no such stage.
        ValueError: ``lines`` is negative.
    """
    check_stage(topology, stage)
    if lines < 0:
        raise ValueError(f"lines must be >= 0, got {lines}")
    directory = log_dir(topology)
    followers: dict[Path, _Follower] = {}
    try:
        paths = replica_logs(directory, stage)
        if not paths:
            out.write(f"no logs of stage {stage!r} yet; they will appear in {directory}/{stage}-<replica>.log\n")
        for path in paths:
            follower = _Follower.open(path)
            if follower is not None:
                _emit(out, follower.label, follower.last_lines(lines, keep_partial=follow))
                followers[path] = follower
        out.flush()
        if follow:
            _follow(directory, stage, followers, out, poll, until)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how following ends
    finally:
        for follower in followers.values():
            follower.close()


def _follow(directory: Path, stage: str, followers: dict[Path, _Follower], out: TextIO,
            poll: float, until: Callable[[], bool] | None) -> None:
    """Print new lines of every replica log each ``poll`` seconds until ``until()`` holds."""
    while True:
        for path in replica_logs(directory, stage):
            if path not in followers:  # a replica added by scaling, or a file re-created after rotation
                follower = _Follower.open(path)
                if follower is not None:
                    followers[path] = follower
        for path, follower in sorted(followers.items(), key=lambda item: item[1].order):
            _emit(out, follower.label, follower.read_new())
            if follower.gone:
                follower.close()
                del followers[path]
        out.flush()
        if until is not None and until():
            return
        time.sleep(poll)


def _emit(out: TextIO, label: str, lines: list[str]) -> None:
    for line in lines:
        out.write(f"{label} | {line}\n")


class _Follower:
    """One replica's log file, read from a position on, reopened when it is rotated or truncated."""

    def __init__(self, path: Path, handle: BinaryIO):
        self.path = path
        self.label = path.name[: -len(".log")]
        self.order = int(self.label.rpartition("-")[2])
        self.handle = handle
        self.partial = b""  # the start of a line whose newline has not been written yet
        self.gone = False

    @classmethod
    def open(cls, path: Path) -> _Follower | None:
        """Open ``path``; None if it vanished since it was listed."""
        try:
            return cls(path, open(path, "rb"))
        except FileNotFoundError:
            return None

    def close(self) -> None:
        """Close the file."""
        self.handle.close()

    def last_lines(self, n: int, *, keep_partial: bool) -> list[str]:
        """Return the last ``n`` lines and leave the file positioned after them.

        A last line without its newline yet is returned too, unless
        ``keep_partial``: then it is held back until the rest of it is written.
        """
        size = os.fstat(self.handle.fileno()).st_size
        start, data = size, b""
        while start > 0 and data.count(b"\n") <= n:
            start = max(0, start - _BLOCK)
            self.handle.seek(start)
            data = self.handle.read(size - start)
        self.handle.seek(size)
        complete, newline, partial = data.rpartition(b"\n")
        found = complete.split(b"\n") if newline else []
        if keep_partial:
            self.partial = partial
        elif partial:
            found.append(partial)
        return [_text(line) for line in found[-n:]] if n else []

    def read_new(self) -> list[str]:
        """Return the complete lines written since the last call, following a rotation to the new file."""
        found = self._drain()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:  # rotated and not yet re-created: the next listing picks the new file up
            self.gone = True
            return found + self._flush_partial()
        if current.st_ino != os.fstat(self.handle.fileno()).st_ino:
            found += self._flush_partial()
            self.handle.close()
            self.handle = open(self.path, "rb")
            found += self._drain()
        elif current.st_size < self.handle.tell():  # truncated in place: start over
            self.partial = b""
            self.handle.seek(0)
            found += self._drain()
        return found

    def _drain(self) -> list[str]:
        data = self.partial + self.handle.read()
        *complete, self.partial = data.split(b"\n")
        return [_text(line) for line in complete]

    def _flush_partial(self) -> list[str]:
        # The old file will not grow any more, so its unterminated last line is complete.
        partial, self.partial = self.partial, b""
        return [_text(partial)] if partial else []


def _text(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")
