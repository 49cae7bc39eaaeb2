"""The monkey: fires the scenario's fault plugins on a seeded schedule and heals them.

Each fault ticks at intervals drawn from its ``every`` range (or once, at the
start); at each tick it fires with its ``probability``. A lasting fault is
healed after its ``duration`` (a ``fault_point`` with duration 0 stays armed
until the method ends). Every decision uses one ``random.Random(seed)``, and
every injection and heal goes to the fault log with its time, so a run can be
read back and replayed with the same seed.
"""
from __future__ import annotations

import heapq
import json
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .environment import ChaosEnvironment
from .faults import PLUGINS, Fault, FaultContext


@dataclass
class FaultLog:
    """What the monkey did: (seconds since the method began, text), also appended to ``path`` as JSON lines."""

    path: Path | None = None
    started: float = field(default_factory=time.time)
    entries: list[tuple[float, str]] = field(default_factory=list)

    def add(self, text: str) -> None:
        entry = (round(time.time() - self.started, 3), text)
        self.entries.append(entry)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


# Lasting faults of the broker and the network, not of the workers: a worker killed while one
# is in force cannot recover before it is healed, so the checker tells those kills apart.
DISTURBANCES = ("toxic", "proxy_down", "nsqd_stop")
# A heal that fails (e.g. Toxiproxy's DELETE of a latency toxic timing out on a loaded host) is
# tried again a second later, this many times in all, rather than leave the fault in force.
HEAL_ATTEMPTS = 5


class Monkey:
    """Runs the method's faults for ``duration`` seconds (or until ``stop`` is set)."""

    def __init__(self, env: ChaosEnvironment, faults: list, seed: int, duration: float):
        self.ctx = FaultContext(env, random.Random(seed))
        self.faults: list[Fault] = [PLUGINS[spec.fault](spec) for spec in faults]
        self.duration = duration
        self.log = FaultLog(env.folder / "faults.jsonl")
        self.injected = 0
        self._heals: list[tuple[float, int, Fault]] = []
        self._seq = itertools.count()
        self._active: set[Fault] = set()
        self._heal_failures: dict[Fault, int] = {}
        self._healing = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Inject on schedule, heal what is due; heal everything before returning."""
        start = time.monotonic()
        end = start + self.duration
        ticks = [(start + f.spec.start + self._interval(f), i) for i, f in enumerate(self.faults)]
        heapq.heapify(ticks)
        try:
            while not stop.is_set():
                due_heal = self._heals[0][0] if self._heals else float("inf")
                due_tick = ticks[0][0] if ticks else float("inf")
                now = time.monotonic()
                if min(due_heal, due_tick) > end:
                    stop.wait(max(0.0, end - now))
                    break
                if min(due_heal, due_tick) > now:
                    stop.wait(min(due_heal, due_tick) - now)
                    continue
                if due_heal <= due_tick:
                    with self._healing:
                        if self._heals:
                            self._heal_one(heapq.heappop(self._heals)[2])
                else:
                    _, i = heapq.heappop(ticks)
                    self._tick(self.faults[i], i)
                    if self.faults[i].spec.every is not None:
                        heapq.heappush(ticks, (time.monotonic() + self._interval(self.faults[i]), i))
        finally:
            self.heal_all()

    def _interval(self, fault: Fault) -> float:
        every = fault.spec.every
        return 0.0 if every is None else self.ctx.rng.uniform(every[0], every[1])

    def _tick(self, fault: Fault, index: int) -> None:
        if self.ctx.rng.random() >= fault.spec.probability or fault in self._active:
            return  # a lasting fault still in force is not stacked on itself
        try:
            what = fault.inject(self.ctx)
        except Exception as e:  # e.g. the victim died meanwhile; the schedule goes on
            self.log.add(f"{fault.spec.fault} failed: {e}")
            return
        if what is None:
            return
        self.injected += 1
        self.log.add(what)
        if fault.spec.fault in DISTURBANCES:
            fault.disturbance = [time.time(), None]
            self.ctx.disturbances.append(fault.disturbance)
        duration = fault.spec.duration
        if duration > 0 or fault.spec.fault == "fault_point":
            self._active.add(fault)
        if duration > 0:
            heapq.heappush(self._heals, (time.monotonic() + duration, next(self._seq), fault))
        elif fault.spec.fault == "fault_point":
            heapq.heappush(self._heals, (float("inf"), next(self._seq), fault))

    def _heal(self, fault: Fault) -> None:
        fault.heal(self.ctx)
        self._active.discard(fault)  # only now: a fault whose heal failed is not injected again over itself
        if getattr(fault, "disturbance", None) is not None:
            fault.disturbance[1], fault.disturbance = time.time(), None
        self.log.add(f"healed {fault.spec.fault}")

    def heal_all(self) -> None:
        """Heal every outstanding lasting fault (runs even when the method is interrupted)."""
        with self._healing:
            while self._heals:
                self._heal_one(heapq.heappop(self._heals)[2])

    def _heal_one(self, fault: Fault) -> None:
        try:
            self._heal(fault)
        except Exception as e:  # keep healing the others; the rollbacks run after this too
            failures = self._heal_failures[fault] = self._heal_failures.get(fault, 0) + 1
            self.log.add(f"heal of {fault.spec.fault} failed: {e}")
            if failures < HEAL_ATTEMPTS:
                heapq.heappush(self._heals, (time.monotonic() + 1.0, next(self._seq), fault))
            else:
                self._active.discard(fault)
            return
        self._heal_failures.pop(fault, None)


class RecoveryTracker:
    """Polls supervisord and notes when each worker pid of ``groups`` (stage names) was first seen (``started``:
    STARTING or RUNNING) and first seen RUNNING (``first_running``).

    It also notes when nsqd or nsqlookupd was not RUNNING (``down``: [start, end] in epoch seconds; the same
    windows by program, ``nsqd-n0``, in ``down_by``).
    """

    def __init__(self, env: ChaosEnvironment, groups: str | tuple[str, ...], interval: float = 0.1):
        self.env, self.interval = env, interval
        self.groups = (groups,) if isinstance(groups, str) else tuple(groups)
        self.first_running: dict[int, tuple[str, float]] = {}
        self.started: dict[int, tuple[str, float]] = {}  # pid -> (name, first seen STARTING or RUNNING)
        self.fatal = 0  # times a worker was seen entering FATAL
        self.down: list[list] = []
        self.down_by: dict[str, list[list]] = {}
        self._down_now: dict[str, list] = {}
        self._fatal_now: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="recovery", daemon=True)

    def start(self) -> RecoveryTracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                for p in self.env.supervisor.processes():
                    if p.group in self.groups and p.state == "FATAL" and p.name not in self._fatal_now:
                        self.fatal += 1
                    self._fatal_now = {n for n in self._fatal_now if n != p.name} | (
                        {p.name} if p.state == "FATAL" else set())
                    self._note_broker(p)
                    if p.group in self.groups and p.state in ("STARTING", "RUNNING") and p.pid \
                            and p.pid not in self.started:
                        self.started[p.pid] = (p.full_name, time.time())
                        self.env.note_pid(p.full_name, p.pid)
                    if p.group in self.groups and p.state == "RUNNING" and p.pid not in self.first_running:
                        self.first_running[p.pid] = (p.full_name, time.time())
            except Exception:
                pass  # supervisord busy or going down: try again next tick
            self._stop.wait(self.interval)

    def _note_broker(self, p) -> None:
        if not p.group.startswith(("nsqd-", "nsqlookupd-")):
            return
        if p.pid:
            self.env.note_pid(p.full_name, p.pid)  # a restarted nsqd too, for the leftover check
        window = self._down_now.get(p.full_name)
        if p.state != "RUNNING" and window is None:
            self._down_now[p.full_name] = window = [time.time(), None]
            self.down.append(window)
            self.down_by.setdefault(p.group, []).append(window)
        elif p.state == "RUNNING" and window is not None:
            window[1] = time.time()
            del self._down_now[p.full_name]

    @property
    def restarts(self) -> int:
        """Worker processes started after the first ones."""
        names = [name for name, _ in self.started.values()]
        return len(names) - len(set(names))
