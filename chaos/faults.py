"""Fault plugins: each a small class with ``inject`` and, for a lasting fault, ``heal``.

A plugin is registered under the name a scenario's ``fault:`` uses. ``inject``
returns one line for the fault log, or None when there was nothing to hit
(e.g. no RUNNING worker). Processes are found through supervisord's XML-RPC,
so a victim is always the process supervisord currently runs under that name.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from .environment import ChaosEnvironment
from .scenario import FaultPoint, KillWorker, RestartNsqd, StopNsqd, Toxic

PLUGINS: dict[str, type[Fault]] = {}


def register(name: str) -> Callable[[type[Fault]], type[Fault]]:
    """Class decorator: make a plugin available as ``fault: name``."""
    def add(cls: type[Fault]) -> type[Fault]:
        PLUGINS[name] = cls
        return cls
    return add


@dataclass
class Kill:
    """One signal sent to a process, for the recovery measurement."""

    name: str
    pid: int
    signal: str
    t: float


@dataclass
class FaultContext:
    """What plugins act on and where they report."""

    env: ChaosEnvironment
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    stopped: set[int] = field(default_factory=set)
    #: [start, end] (epoch s; end None while stopped) of every SIGSTOP of an nsqd, by program (``nsqd-n0``).
    stops: dict[str, list[list]] = field(default_factory=dict)
    #: [start, end] (epoch s; end None while in force) of every toxic, proxy down and nsqd stop.
    disturbances: list[list] = field(default_factory=list)


class Fault:
    """Base class of fault plugins; ``spec`` is the validated scenario entry."""

    #: While a broker or network fault is in force: its [start, end] in FaultContext.disturbances.
    disturbance: list | None = None

    def __init__(self, spec):
        self.spec = spec

    def inject(self, ctx: FaultContext) -> str | None:
        raise NotImplementedError

    def heal(self, ctx: FaultContext) -> None:
        """Undo a lasting fault (no-op for instantaneous ones)."""


def _running(ctx: FaultContext, group: str | tuple[str, ...], state: str = "RUNNING") -> list:
    groups = (group,) if isinstance(group, str) else group
    return sorted((p for p in ctx.env.supervisor.processes() if p.group in groups and p.state == state and p.pid),
                  key=lambda p: p.full_name)


def _signal(ctx: FaultContext, process, sig: signal.Signals) -> str:
    ctx.env.note_pid(process.full_name, process.pid)
    os.kill(process.pid, sig)
    if sig == signal.SIGSTOP:
        ctx.stopped.add(process.pid)
    else:
        ctx.kills.append(Kill(process.full_name, process.pid, sig.name, time.time()))
    return f"{sig.name} {process.full_name} pid {process.pid}"


class _SignalFault(Fault):
    group = ""
    signame = "KILL"
    state = "RUNNING"
    #: Signal every candidate rather than a random one.
    every_one = False

    def _groups(self, ctx: FaultContext) -> str | tuple[str, ...]:
        return self.group

    def inject(self, ctx: FaultContext) -> str | None:
        candidates = _running(ctx, self._groups(ctx), self.state)
        if not candidates:
            return None
        self.victims = candidates if self.every_one else [ctx.rng.choice(candidates)]
        sig = signal.Signals[f"SIG{self.signame}"]
        return "; ".join(_signal(ctx, victim, sig) for victim in self.victims)

    def heal(self, ctx: FaultContext) -> None:
        for victim in getattr(self, "victims", ()):
            if victim.pid in ctx.stopped:
                ctx.stopped.discard(victim.pid)
                try:
                    os.kill(victim.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


@register("kill_worker")
class KillWorkerFault(_SignalFault):
    """A random replica of any stage under test (primes; or features and signals)."""

    def __init__(self, spec: KillWorker):
        super().__init__(spec)
        self.signame, self.state = spec.signal, spec.target

    def _groups(self, ctx: FaultContext) -> tuple[str, ...]:
        return ctx.env.stages


class _NsqdFault(_SignalFault):
    """nsqd ``target``: one node by name, a random RUNNING one, or all of them.

    supervisord runs node ``nK`` as program ``nsqd-nK`` with ``autorestart``: a
    killed nsqd is started again on the same data path (``var/nsqd/nK``).
    """

    def __init__(self, spec: RestartNsqd | StopNsqd):
        super().__init__(spec)
        self.every_one = spec.target == "all"

    def _groups(self, ctx: FaultContext) -> tuple[str, ...]:
        if self.spec.target in ("random", "all"):
            return tuple(nsqd_group(node.name) for node in ctx.env.nodes)
        return (nsqd_group(self.spec.target),)


@register("nsqd_restart")
class RestartNsqdFault(_NsqdFault):
    def __init__(self, spec: RestartNsqd):
        super().__init__(spec)
        self.signame = spec.signal


@register("nsqd_stop")
class StopNsqdFault(_NsqdFault):
    signame = "STOP"

    def __init__(self, spec: StopNsqd):
        super().__init__(spec)
        self.windows: list[list] = []

    def inject(self, ctx: FaultContext) -> str | None:
        what = super().inject(ctx)
        if what is not None:  # each victim's stop, for the recovery measurement: no worker can subscribe to it
            self.windows = [[time.time(), None] for _ in self.victims]
            for victim, window in zip(self.victims, self.windows):
                ctx.stops.setdefault(victim.group, []).append(window)
        return what

    def heal(self, ctx: FaultContext) -> None:
        super().heal(ctx)
        for window in self.windows:
            window[1] = time.time()
        self.windows = []


@register("lookupd_kill")
class KillLookupdFault(_SignalFault):
    group, signame = "nsqlookupd-0", "KILL"


@register("toxic")
class ToxicFault(Fault):
    """The toxic on every nsqd's proxy: the workers' link to the broker as a whole degrades."""

    def __init__(self, spec: Toxic):
        super().__init__(spec)
        self.name = f"chaos_{spec.toxic}"

    def inject(self, ctx: FaultContext) -> str | None:
        for proxy in ctx.env.proxies:
            ctx.env.toxiproxy.add_toxic(proxy, self.name, self.spec.toxic, dict(self.spec.attributes),
                                        stream=self.spec.stream)
        proxies = ", ".join(ctx.env.proxies)
        return f"toxic {self.spec.toxic} {dict(self.spec.attributes)} on {proxies} {self.spec.stream}"

    def heal(self, ctx: FaultContext) -> None:
        for proxy in ctx.env.proxies:
            if any(t["name"] == self.name for t in ctx.env.toxiproxy.toxics(proxy)):
                ctx.env.toxiproxy.remove_toxic(proxy, self.name)


@register("proxy_down")
class ProxyDownFault(Fault):
    """Every nsqd's proxy down: the workers reach no broker."""

    def inject(self, ctx: FaultContext) -> str | None:
        for proxy in ctx.env.proxies:
            ctx.env.toxiproxy.set_enabled(proxy, False)
        return f"proxy {', '.join(ctx.env.proxies)} down"

    def heal(self, ctx: FaultContext) -> None:
        for proxy in ctx.env.proxies:
            ctx.env.toxiproxy.set_enabled(proxy, True)


@register("fault_point")
class FaultPointFault(Fault):
    def __init__(self, spec: FaultPoint):
        super().__init__(spec)

    def inject(self, ctx: FaultContext) -> str | None:
        path = ctx.env.faultpoints_path
        armed = json.loads(path.read_text()) if path.exists() else {}
        armed.update({self.spec.point: self.spec.chance, "grace": self.spec.grace})
        _write_atomic(path, armed)
        return f"fault point {self.spec.point} armed (chance {self.spec.chance:g}, grace {self.spec.grace:g} s)"

    def heal(self, ctx: FaultContext) -> None:
        disarm_fault_points(ctx.env)


def nsqd_group(node: str) -> str:
    """supervisord's program (and group) of nsqd ``node`` (pipeline.ops.supervisor_conf names it so)."""
    return f"nsqd-{node}"


def disarm_fault_points(env: ChaosEnvironment) -> None:
    """Disarm every worker fault point (the workers notice within 0.2 s)."""
    env.faultpoints_path.unlink(missing_ok=True)


def _write_atomic(path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
