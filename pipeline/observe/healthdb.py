"""``var/health.db``: the monitor's samples in SQLite, with retention and a size bound.

One table per kind of sample, each row stamped with ``ts`` (seconds since the
epoch, from the monitor's clock, so tests can inject time). The report and
``pipeline top`` read it back through the query helpers below.

Example::

    db = HealthDB(topology.var_dir / "health.db")
    db.add_host(now, cpu=12.5, mem_used=..., mem_total=..., disk_free=...)
    rows = db.channels_since(now - 86400)
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS channel (
    ts REAL, nsqd TEXT, topic TEXT, channel TEXT, depth INTEGER, backend_depth INTEGER, in_flight INTEGER,
    deferred INTEGER, requeue INTEGER, timeout INTEGER, messages INTEGER, clients INTEGER, e2e_p99 REAL);
CREATE INDEX IF NOT EXISTS channel_ts ON channel (ts);
CREATE TABLE IF NOT EXISTS nsqd (ts REAL, nsqd TEXT, http TEXT, health TEXT, started REAL);
CREATE INDEX IF NOT EXISTS nsqd_ts ON nsqd (ts);
CREATE TABLE IF NOT EXISTS process (
    ts REAL, name TEXT, grp TEXT, state TEXT, pid INTEGER, cpu REAL, rss INTEGER);
CREATE INDEX IF NOT EXISTS process_ts ON process (ts);
CREATE TABLE IF NOT EXISTS worker (
    ts REAL, stage TEXT, replica INTEGER, up INTEGER, messages_in REAL, finished REAL, requeued REAL,
    dead_lettered REAL, publish_errors REAL, e2e_buckets TEXT, started REAL);
CREATE INDEX IF NOT EXISTS worker_ts ON worker (ts);
CREATE TABLE IF NOT EXISTS host (ts REAL, cpu REAL, mem_used INTEGER, mem_total INTEGER, disk_free INTEGER);
CREATE INDEX IF NOT EXISTS host_ts ON host (ts);
CREATE TABLE IF NOT EXISTS dead_letter (ts REAL, topic TEXT, stage TEXT, reason TEXT, body TEXT);
CREATE INDEX IF NOT EXISTS dead_letter_ts ON dead_letter (ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
TABLES = ("channel", "nsqd", "process", "worker", "host", "dead_letter")
# Columns added since a table was first created: (table, column, type); an older file gains them when opened.
ADDED_COLUMNS = (("worker", "started", "REAL"), ("nsqd", "started", "REAL"))
DEAD_LETTER_KEEP = 200  # newest dead-letter samples kept; the count comes from nsqd, not from here


@dataclass(frozen=True)
class ChannelSample:
    """One topic (``channel == ""``) or channel on one nsqd at one time."""

    ts: float
    nsqd: str
    topic: str
    channel: str
    depth: int
    backend_depth: int
    in_flight: int
    deferred: int
    requeue: int
    timeout: int
    messages: int
    clients: int
    e2e_p99: float | None


@dataclass(frozen=True)
class ProcessSample:
    """One supervisord process at one time, with its CPU percent and RSS bytes."""

    ts: float
    name: str
    grp: str
    state: str
    pid: int
    cpu: float | None
    rss: int | None


@dataclass(frozen=True)
class WorkerSample:
    """One replica's scraped counters at one time (``up`` is 0 when its endpoint did not answer)."""

    ts: float
    stage: str
    replica: int
    up: int
    messages_in: float
    finished: float
    requeued: float
    dead_lettered: float
    publish_errors: float
    e2e_buckets: str  # JSON [[le, cumulative count], ...]
    started: float | None = None  # the replica's process_start_time_seconds: a new value is a new process

    def buckets(self) -> list[tuple[float, float]]:
        """The e2e latency histogram as (upper bound in seconds, cumulative count)."""
        return [(float(le), float(c)) for le, c in json.loads(self.e2e_buckets or "[]")]


class HealthDB:
    """The monitor's SQLite store; safe to share between threads (one connection, one lock).

    Parameters:
        path: the database file (created with its folder).
        retention_days: rows older than this are deleted by :meth:`prune`.
        max_bytes: when the file grows past this, :meth:`prune` deletes the oldest rows until it fits.
    """

    def __init__(self, path: str | os.PathLike[str], retention_days: float = 30.0, max_bytes: int = 512 * 2**20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention_s, self.max_bytes = retention_days * 86400.0, max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective on a new file: lets prune give space back
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (report, top) never block the sampler
        self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: no corruption; a crash may lose the last samples
        self._db.executescript(SCHEMA)
        self._columns = {t: self._add_columns(t) for t in TABLES}

    def _add_columns(self, table: str) -> list[str]:
        """The columns of ``table``, after adding those an older file lacks (see :data:`ADDED_COLUMNS`)."""
        have = [row[1] for row in self._db.execute(f"PRAGMA table_info({table})")]
        for name, column, kind in ADDED_COLUMNS:
            if name == table and column not in have:
                try:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError:  # another process (the report, top) added it first
                    pass
                have.append(column)
        return have

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------

    def insert(self, table: str, rows: Iterable[tuple]) -> None:
        """Insert ``rows`` (tuples in the table's column order) into ``table`` in one transaction.

        A row may leave out the columns at its end (added later, see :data:`ADDED_COLUMNS`): they stay NULL.
        """
        rows = list(rows)
        if not rows:
            return
        columns = ",".join(self._columns[table][:len(rows[0])])
        marks = ",".join("?" * len(rows[0]))
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
            self._db.execute("COMMIT")

    def set_meta(self, key: str, value: Any) -> None:
        """Remember ``value`` (JSON) under ``key`` (e.g. when the last report was sent)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def prune(self, now: float) -> int:
        """Delete rows past the retention, then the oldest until the file fits ``max_bytes``; return rows deleted."""
        deleted = self._delete_before(now - self.retention_s)
        with self._lock:
            self._db.execute("DELETE FROM dead_letter WHERE rowid NOT IN "
                             f"(SELECT rowid FROM dead_letter ORDER BY ts DESC LIMIT {DEAD_LETTER_KEEP})")
        while self.size_bytes() > self.max_bytes:
            oldest, newest = self._span()
            if oldest is None or newest is None or newest <= oldest:  # both None when empty
                break
            removed = self._delete_before(oldest + max((newest - oldest) / 10, 1.0))  # the oldest tenth
            deleted += removed
            if removed == 0:
                break
        return deleted

    def _delete_before(self, cutoff: float) -> int:
        with self._lock:
            count = sum(self._db.execute(f"DELETE FROM {t} WHERE ts < ?", (cutoff,)).rowcount for t in TABLES)
            self._db.execute("PRAGMA incremental_vacuum")
        return count

    def _span(self) -> tuple[float | None, float | None]:
        with self._lock:
            return self._db.execute("SELECT MIN(ts), MAX(ts) FROM channel").fetchone()

    def size_bytes(self) -> int:
        """Bytes the database uses (pages in use; the WAL is checkpointed into them)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size

    # -- reading ---------------------------------------------------------------

    def _select(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def channels(self, since: float, until: float = float("inf")) -> list[ChannelSample]:
        """Topic and channel samples in [since, until], oldest first."""
        return [ChannelSample(*r) for r in self._select(
            "SELECT * FROM channel WHERE ts >= ? AND ts <= ? ORDER BY ts", (since, until))]

    def processes(self, since: float, until: float = float("inf")) -> list[ProcessSample]:
        """Process samples in [since, until], oldest first."""
        return [ProcessSample(*r) for r in self._select(
            "SELECT * FROM process WHERE ts >= ? AND ts <= ? ORDER BY ts", (since, until))]

    def workers(self, since: float, until: float = float("inf")) -> list[WorkerSample]:
        """Worker samples in [since, until], oldest first."""
        return [WorkerSample(*r) for r in self._select(
            "SELECT * FROM worker WHERE ts >= ? AND ts <= ? ORDER BY ts", (since, until))]

    def nsqd_health(self, since: float, until: float = float("inf")) -> list[tuple]:
        """(ts, nsqd, http, health, start time or None) in [since, until], oldest first."""
        return self._select("SELECT * FROM nsqd WHERE ts >= ? AND ts <= ? ORDER BY ts", (since, until))

    def host(self, since: float, until: float = float("inf")) -> list[tuple[float, float, int, int, int]]:
        """(ts, cpu %, memory used, memory total, free disk bytes) in [since, until]."""
        return self._select("SELECT * FROM host WHERE ts >= ? AND ts <= ? ORDER BY ts", (since, until))

    def dead_letters(self, since: float, until: float = float("inf"), limit: int = 10) -> list[tuple]:
        """The newest dead-letter samples (ts, topic, stage, reason, body) in [since, until]."""
        return self._select("SELECT * FROM dead_letter WHERE ts >= ? AND ts <= ? ORDER BY ts DESC LIMIT ?",
                            (since, until, limit))

    def sample_count(self, table: str = "channel") -> int:
        """Distinct sample times in ``table`` (how many times the monitor sampled)."""
        return self._select(f"SELECT COUNT(DISTINCT ts) FROM {table}")[0][0]
