"""Chaos fault points inside the worker, as middleware enabled only by the chaos harness.

When ``NSQ_PIPELINE_FAULTPOINTS`` names a file (the chaos harness sets it in its
supervisord's environment), every worker gets :class:`FaultPoints`. The file
arms the points: JSON like ``{"after_publish": 0.05, "grace": 2.5}``, each
point with the chance per event that the worker SIGKILLs itself there:

- ``after_receive``: right after a message arrives, before it is batched;
- ``after_publish``: the outputs were acknowledged by nsqd, the inputs are not yet finished;
- ``publish_callback``: inside the callback that receives nsqd's answer to a publish.

No file (or no key) means disarmed; the file is re-read at most every 0.2 s,
so the harness arms and heals the points without restarting anything. The
middleware also appends ``{"event": "subscribed", "pid", "t", "node"}`` to
``$NSQ_PIPELINE_FAULTPOINTS.events`` the first time the process is subscribed
to each nsqd (``node``: the address it reads it at) with RDY above 0; the
checker measures recovery (kill → consuming again) up to the moment its
successor is subscribed to every nsqd that is up.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from typing import Any

from pipeline.middleware import Middleware, WorkerView

ENV = "NSQ_PIPELINE_FAULTPOINTS"
POINTS = ("after_receive", "after_publish", "publish_callback")
RELOAD_S = 0.2
#: Seconds a process keeps looking for subscriptions to the nodes it has not reached yet.
WATCH_S = 120.0


def from_environment() -> list[Middleware]:
    """Return ``[FaultPoints(...)]`` when the chaos harness enabled fault points, else ``[]``."""
    path = os.environ.get(ENV)
    return [FaultPoints(path)] if path else []


class FaultPoints(Middleware):
    """Kills the worker at armed points with the configured chance; records when it starts consuming."""

    def __init__(self, path: str):
        self.path = path
        self.started = time.monotonic()
        self.armed: dict[str, float] = {}
        self.grace = 2.5
        self._read_at = 0.0
        self._watched: set[int] = set()
        self._random = random.Random()

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._read_at < RELOAD_S:
            return
        self._read_at = now
        try:
            with open(self.path) as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = {}
        self.grace = float(config.get("grace", 2.5))
        self.armed = {p: float(config[p]) for p in POINTS if p in config}

    def _maybe_die(self, point: str) -> None:
        self._reload()
        chance = self.armed.get(point, 0.0)
        if chance and time.monotonic() - self.started >= self.grace and self._random.random() < chance:
            self._event("fault_point", point=point)
            os.kill(os.getpid(), signal.SIGKILL)

    def _event(self, event: str, **fields: Any) -> None:
        with open(self.path + ".events", "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n")

    def after_worker_boot(self, worker: WorkerView) -> None:
        asyncio.ensure_future(self._report_subscribed(worker))

    async def _report_subscribed(self, worker: WorkerView) -> None:
        # Recovery ends when the new process is subscribed with RDY > 0 to every nsqd that is up, whether or
        # not work is waiting: note each node's first subscription (a stopped one's may come much later).
        nodes = set(worker.topology.nsqd_tcp_addresses())
        reported: set[str] = set()
        until = time.monotonic() + WATCH_S
        while not nodes <= reported and time.monotonic() < until:
            for conn in list(worker.reader.conns.values()):
                if conn.id not in reported and conn.connected() and conn.last_rdy > 0:
                    reported.add(conn.id)
                    self._event("subscribed", node=conn.id)
            await asyncio.sleep(0.01)

    def after_receive(self, worker: WorkerView, message: Any) -> None:
        self._maybe_die("after_receive")

    def before_publish(self, worker: WorkerView, outputs: Any) -> None:
        # pynsq calls the publish callback from the connection's "response"
        # event; a listener on that event runs at the same moment.
        for conn in list(worker.publisher.writer.conns.values()):
            if id(conn) not in self._watched:
                self._watched.add(id(conn))
                conn.on("response", self._on_response)

    def _on_response(self, conn: Any, data: Any = None, **_: Any) -> None:
        self._maybe_die("publish_callback")

    def after_publish(self, worker: WorkerView, outputs: Any, *, exception: BaseException | None) -> None:
        if exception is None:
            self._maybe_die("after_publish")
