"""Crash quarantine: a message that kills its worker runs alone, then is dead-lettered, never redelivered forever.

``max_tries`` cannot stop a message whose handler call kills the process (a
segfault, ``os._exit``, an OOM kill): the worker never lives to count the
attempt, and nsqd hands the message to the next replica after ``msg_timeout``.
So each replica notes in its :class:`~pipeline.runtime.blackbox.BlackBox` the
ids its handler holds; its successor finds them there at start and adds them to
the stage's :class:`CrashJournal` with one more death each and the cause. A
message redelivered (``attempts >= 2``) whose id the journal holds is
*crashed*: the processor runs it alone, so only it is to blame if it kills
again, and once it has ``crash_tries`` deaths, one of them at least while it
ran alone, it is dead-lettered without running (see docs/ARCHITECTURE.md,
"The life of one message"). A message is thus never dead-lettered for deaths
a batch-mate may have caused: when its redelivery reaches a replica before the
dead one's successor journaled it (a slow start), it may die in a batch
again, and a record that kills costs ``crash_tries`` + 1 deaths instead.

The journal is one small JSON file per stage under ``<var_dir>/state/crash/``,
shared by its replicas (a plain stage's redelivery may land on another
replica), written under a ``flock`` and replaced atomically, and read again
only when the file changed. Entries older than :data:`MAX_AGE` seconds, and
beyond the newest :data:`MAX_ENTRIES`, are dropped when it is written.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.runtime.blackbox import BlackBox, Death, supervisor_exit

log = logging.getLogger(__name__)

MAX_AGE = 24 * 3600.0  # seconds a message's deaths are remembered
MAX_ENTRIES = 10_000
MAX_LIVES = 16  # lives remembered per message, so a death read twice is counted once
VERSION = 1


@dataclass(frozen=True, slots=True)
class Crash:
    """A message's deaths: how many workers died holding it (``alone``: holding it alone), the last one's cause
    (None: unknown) and when."""

    deaths: int
    cause: str | None
    t: float
    lives: tuple[str, ...] = ()
    alone: int = 0

    def reason(self) -> str:
        """The dead letter's reason: ``worker died 2 times while processing it (last: SIGSEGV)``."""
        times = "once" if self.deaths == 1 else f"{self.deaths} times"
        last = f" (last: {self.cause})" if self.cause else ""
        return f"worker died {times} while processing it{last}"


class CrashJournal:
    """The deaths of one stage's workers, per message id, in ``path`` (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[bytes, Crash] = {}
        self._seen: tuple[int, int, int] | None = None

    def refresh(self) -> dict[bytes, Crash]:
        """The entries as the file holds them now (read again only when it changed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.entries, self._seen = {}, None
            return self.entries
        except OSError:
            return self.entries  # unreadable for now: what was read last
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self.entries, self._seen = read_journal(self.path), seen
        return self.entries

    def record(self, death: Death, cause: str | None, now: float | None = None) -> dict[bytes, Crash]:
        """Add one death, of ``cause``, to each id ``death`` held (once per life); prune; return the entries."""
        now = time.time() if now is None else now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            entries = read_journal(self.path)
            alone = int(len(set(death.ids)) == 1)  # one message (an envelope's records share its id)
            for message_id in death.ids:
                old = entries.get(message_id) or Crash(0, None, now)
                if death.life and death.life in old.lives:
                    continue  # this death was counted already (its successor died before clearing the box)
                lives = (*old.lives, death.life)[-MAX_LIVES:]
                entries[message_id] = Crash(old.deaths + 1, cause, now, lives, old.alone + alone)
            entries = prune(entries, now)
            _write(self.path, entries)
        self.entries, self._seen = entries, None
        return entries


def prune(entries: dict[bytes, Crash], now: float, max_age: float = MAX_AGE,
          max_entries: int = MAX_ENTRIES) -> dict[bytes, Crash]:
    """``entries`` without those older than ``max_age`` seconds, and at most the newest ``max_entries``."""
    kept = sorted(((k, c) for k, c in entries.items() if now - c.t <= max_age), key=lambda kc: kc[1].t)
    return dict(kept[-max_entries:])


def read_journal(path: Path) -> dict[bytes, Crash]:
    """The entries of a journal file; a missing file is empty, and so (with a warning) is a torn or foreign one."""
    try:
        data = orjson.loads(path.read_bytes())
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}, not {VERSION}")
        return {k.encode("latin-1"): Crash(int(e["deaths"]), e.get("cause"), float(e["t"]), tuple(e.get("lives", ())),
                                           int(e.get("alone", 0)))
                for k, e in data["messages"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("%s is not a crash journal (%s); read as empty", path, e)
        return {}


def _write(path: Path, entries: dict[bytes, Crash]) -> None:
    messages = {k.decode("latin-1"): {"deaths": c.deaths, "alone": c.alone, "cause": c.cause, "t": c.t,
                                      "lives": list(c.lives)} for k, c in entries.items()}
    data = {"version": VERSION, "messages": messages}
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(orjson.dumps(data))  # no fsync: like the black box, it need outlive a process, not the host
    os.replace(temporary, path)


class _NoBox:
    """A black box that keeps nothing (tests' processors, a replica run twice)."""

    def hold(self, items: Sequence[Any]) -> None:
        pass

    def clear(self) -> None:
        pass


NO_BOX = _NoBox()


class Quarantine:
    """One replica's crash quarantine: its black box, and its stage's journal (see the module docstring).

    Parameters:
        folder: where the boxes and journals live (``<var_dir>/state/crash``).
        stage: the stage's name.
        replica: this replica's number.
        crash_tries: worker deaths after which a message is dead-lettered without running again.
    """

    def __init__(self, folder: Path, stage: str, replica: int, crash_tries: int):
        self.folder, self.stage, self.replica, self.crash_tries = folder, stage, replica, crash_tries
        self.journal = CrashJournal(folder / f"{stage}.journal.json")
        self.box: BlackBox | _NoBox = NO_BOX
        self.known: dict[bytes, Crash] = {}  # the journal as this replica last read it

    def open(self) -> None:
        """Open the black box and add what a dead predecessor held to the journal (before consuming).

        A folder it cannot write leaves the replica running without quarantine (logged): a safety net
        must not stop the stage.
        """
        try:
            box, death = BlackBox.open(self.folder, self.stage, self.replica)
            self.box = box if box is not None else NO_BOX
            if death is not None:
                self._harvest(death)
        except OSError as e:
            log.error("stage %s replica %d: no crash quarantine (%s): a message that kills this worker will be"
                      " redelivered until it is removed by hand", self.stage, self.replica, e)
        self.known = self.journal.refresh()

    def _harvest(self, death: Death) -> None:
        label = f"stage {self.stage} replica {self.replica}"
        if death.fault:
            log.error("%s: the previous process (pid %d) died of a fatal signal:\n%s", label, death.pid,
                      death.fault.rstrip())
        if not death.ids:
            return
        cause = death.cause or supervisor_exit(death.pid)
        self.journal.record(death, cause)
        log.warning("%s: the previous process (pid %d) died (%s) while its handler held %d message(s); each runs"
                    " alone when it comes back, and is dead-lettered once it has %d such deaths (crash_tries), one"
                    " of them alone", label, death.pid, cause or "cause unknown", len(death.ids), self.crash_tries)

    def catch_fatal_signals(self) -> None:
        """Have faulthandler write a fatal signal's traceback into the box's ``.fault`` file (a worker process)."""
        if isinstance(self.box, BlackBox):
            self.box.catch_fatal_signals()

    def close(self) -> None:
        """The replica stops cleanly."""
        if isinstance(self.box, BlackBox):
            self.box.close()
        self.box = NO_BOX

    def crashed(self, items: Iterable[Any]) -> dict[bytes, Crash]:
        """Which of ``items`` (messages, redelivered ones among them) the journal holds, re-read if it changed."""
        known = self.known = self.journal.refresh()
        if not known:
            return {}
        return {item.id: known[item.id] for item in items if item.id in known}

    def crashed_known(self, items: Iterable[Any]) -> dict[bytes, Crash]:
        """:meth:`crashed` from the journal as last read (a keyed replica: only its own successor journals
        its partition's messages, and it read them at start)."""
        known = self.known
        if not known:
            return {}
        return {item.id: known[item.id] for item in items if item.id in known}

    def triage(self, messages: list, crashed: dict[bytes, Crash], dead: Callable[[Any, str], None]) -> list:
        """The ``messages`` to run; the ``crashed`` ones that are spent go to ``dead(message, reason)`` instead."""
        run = []
        for message in messages:
            crash = crashed.get(message.id)
            if crash is not None and self.spent(crash):
                dead(message, crash.reason())
            else:
                run.append(message)
        return run

    def spent(self, crash: Crash) -> bool:
        """Whether ``crash`` has used up ``crash_tries``, one death at least alone: the message is dead-lettered
        without running."""
        return crash.deaths >= self.crash_tries and crash.alone > 0
