"""A replica's black box: the ids of the messages in its handler's hands, readable after the process died.

A segfault, ``os._exit`` or an OOM kill inside a handler leaves no trace in the
process, so each replica writes, before every handler call, the NSQ message ids
it hands to the handler into a small file it maps with ``MAP_SHARED``, and
clears the count after the call. The page cache outlives the process (no fsync
is needed: only a crash of the machine loses it, and that loses the in-flight
messages' story anyway), so its successor, the next process of the same stage
and replica, reads what its predecessor held when it died (:meth:`BlackBox.open`).

The layout is a 32-byte header (magic, the writer's pid, a random token naming
this life of the replica, the count of ids) and then the ids, 16 bytes each.
The count is written after the ids and cleared after the call, so a process
killed while writing leaves the previous count (0): never a torn list.

The box file is ``flock``'ed for the life of the process, so a second live
process of the same replica is told apart from a dead predecessor. Beside it,
``faulthandler`` writes the fatal signal's traceback (:meth:`BlackBox.catch_fatal_signals`),
from which the successor names the signal; for other deaths (an exit status,
SIGKILL) it asks supervisord, whose log holds the exit (:func:`supervisor_exit`).
"""
from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

MAGIC = b"NPB1"
ID_SIZE = 16  # nsqd's message ids: 16 ASCII hex digits
_HEADER = struct.Struct("<4sI8sI")  # magic, pid, life, count
HEADER_SIZE = 32
_pack_count = struct.Struct("<I").pack_into
_COUNT_AT = 16
MIN_IDS = 512  # the box's room at first, in ids; it grows when a handler call holds more
SUPERVISOR_TIMEOUT = 2.0
SUPERVISOR_LOG_TAIL = 256 * 1024
#: faulthandler's first line for each fatal signal it catches.
FAULTS = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Aborted": "SIGABRT",
          "Floating point exception": "SIGFPE", "Illegal instruction": "SIGILL"}


@dataclass(frozen=True)
class Death:
    """What a dead predecessor left: its pid, its life's token, the ids in its handler's hands, and its traceback.

    ``cause`` is the fatal signal faulthandler caught (``"SIGSEGV"``), else None.
    """

    pid: int
    life: str
    ids: tuple[bytes, ...]
    fault: str = ""

    @property
    def cause(self) -> str | None:
        """The fatal signal named by faulthandler's first line (``"SIGSEGV"``), else None."""
        first = next((line for line in self.fault.splitlines() if line.startswith("Fatal Python error: ")), "")
        return FAULTS.get(first.removeprefix("Fatal Python error: ").strip())


class BlackBox:
    """The ids one replica's handler holds, in a file that outlives the process; see the module docstring.

    Example::

        box, death = BlackBox.open(var_dir / "state" / "crash", "primes", 0)
        box.hold(messages)       # before the handler call
        box.clear()              # after it returned or raised
    """

    def __init__(self, path: Path, fd: int, fault_file: TextIO):
        self.path, self._fd, self._fault_file = path, fd, fault_file
        self.life = secrets.token_hex(8)
        self._size = HEADER_SIZE + MIN_IDS * ID_SIZE
        os.ftruncate(fd, self._size)
        self._map = mmap.mmap(fd, self._size)
        header = _HEADER.pack(MAGIC, os.getpid(), bytes.fromhex(self.life), 0)
        self._map[:HEADER_SIZE] = header.ljust(HEADER_SIZE, b"\0")
        self._catching = False

    @classmethod
    def open(cls, folder: Path, stage: str, replica: int) -> tuple[BlackBox | None, Death | None]:
        """Open replica ``replica``'s box; return it and what its dead predecessor left (None: nothing).

        The box is None when another live process holds it (the same replica run twice).
        """
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stage}-{replica}.box"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            log.warning("stage %s replica %d: another live process holds %s; this one keeps no black box, so a"
                        " crash of it is not counted against the messages it held", stage, replica, path)
            return None, None
        previous = _read(fd, path)
        fault_path = path.with_suffix(".fault")
        fault = _read_text(fault_path)
        box = cls(path, fd, open(fault_path, "w"))  # open for the life of the box: faulthandler writes into it
        if (previous is None or not previous[2]) and not fault:
            return box, None  # a clean stop, or a death outside any handler call with nothing to tell
        pid, life, ids = previous or (0, "", ())
        return box, Death(pid, life, ids, fault)

    def hold(self, items: Sequence[Any]) -> None:
        """Note that the handler is about to hold ``items`` (messages, or keyed entries: anything with ``id``)."""
        ids = b"".join([item.id for item in items])
        count = len(items)
        end = HEADER_SIZE + len(ids)
        if end > self._size or len(ids) != count * ID_SIZE:
            self._hold_slowly(items)
            return
        box = self._map
        box[HEADER_SIZE:end] = ids
        _pack_count(box, _COUNT_AT, count)

    def _hold_slowly(self, items: Sequence[Any]) -> None:
        """:meth:`hold` for more ids than the box has room for, or ids not of nsqd's size (tests' fakes)."""
        ids = b"".join([bytes(item.id)[:ID_SIZE].ljust(ID_SIZE, b"\0") for item in items])
        end = HEADER_SIZE + len(ids)
        if end > self._size:
            self._grow(end)
        self._map[HEADER_SIZE:end] = ids
        _pack_count(self._map, _COUNT_AT, len(items))

    def clear(self) -> None:
        """The handler call is over (it returned or raised)."""
        _pack_count(self._map, _COUNT_AT, 0)

    def _grow(self, needed: int) -> None:
        self._map.close()
        self._size = max(needed, 2 * self._size)
        os.ftruncate(self._fd, self._size)
        self._map = mmap.mmap(self._fd, self._size)

    def catch_fatal_signals(self) -> None:
        """Point faulthandler at the box's ``.fault`` file (for a worker process; not for a worker in a test's).

        A fatal signal's traceback then lands there, for the successor to log and name the signal.
        """
        faulthandler.enable(file=self._fault_file, all_threads=True)
        self._catching = True

    def close(self) -> None:
        """The process stops cleanly: nothing is held; release the file for the successor."""
        if self._catching:
            faulthandler.disable()
            self._catching = False
        self.clear()
        self._map.close()
        self._fault_file.close()
        os.close(self._fd)  # and with it the flock


def _read(fd: int, path: Path) -> tuple[int, str, tuple[bytes, ...]] | None:
    """The (pid, life, ids) a box file holds; None when it is empty or unreadable (logged)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    header = os.pread(fd, HEADER_SIZE, 0)
    if len(header) < _HEADER.size or header[:4] != MAGIC:
        log.warning("%s holds no black box (%d bytes of something else); read as empty", path, size)
        return None
    _, pid, life, count = _HEADER.unpack_from(header)
    if HEADER_SIZE + count * ID_SIZE > size:
        log.warning("%s claims %d ids in %d bytes: torn or garbage; read as empty", path, count, size)
        return None
    data = os.pread(fd, count * ID_SIZE, HEADER_SIZE)
    ids = tuple(data[i:i + ID_SIZE].rstrip(b"\0") for i in range(0, len(data), ID_SIZE))
    return pid, life.hex(), ids


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- the cause of a death that faulthandler did not see -------------------------------------------

def supervisor_exit(pid: int, environ: Mapping[str, str] = os.environ,
                    timeout: float = SUPERVISOR_TIMEOUT) -> str | None:
    """How process ``pid`` of this program ended, as supervisord logged it (``"exit status 1"``, ``"SIGKILL"``).

    Only for a worker run by supervisord (its ``SUPERVISOR_*`` variables); None when supervisord cannot say
    within ``timeout`` seconds. supervisord logs the exit before it starts the successor, and forgets
    the exit status itself when it does, so its log is the one place that keeps it.
    """
    name = environ.get("SUPERVISOR_PROCESS_NAME")
    if not name or not environ.get("SUPERVISOR_SERVER_URL") or pid <= 0:
        return None
    found: list[str | None] = [None]

    def ask() -> None:
        with contextlib.suppress(Exception):  # supervisord gone or busy, a proxy error: the cause stays unknown
            from supervisor import childutils
            tail = childutils.getRPCInterface(dict(environ)).supervisor.readLog(-SUPERVISOR_LOG_TAIL, 0)
            found[0] = exit_in_log(tail, name, pid)

    asker = threading.Thread(target=ask, name="supervisor-exit", daemon=True)
    asker.start()
    asker.join(timeout)
    return found[0]


def exit_in_log(text: str, name: str, pid: int) -> str | None:
    """How process ``pid`` named ``name`` ended, from supervisord's log ``text``; None if it does not say."""
    starts = list(re.finditer(rf"spawned: '{re.escape(name)}' with pid {pid}\b", text))
    if not starts:
        return None
    spawned = starts[-1]
    ended = re.search(rf"(?:exited|stopped): {re.escape(name)} \((exit status \d+|terminated by (SIG[A-Z0-9]+))",
                      text[spawned.end():])
    if ended is None:
        return None
    return ended.group(2) or ended.group(1)
