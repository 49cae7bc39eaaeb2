"""Batches of messages: up to ``batch.size`` of them, or what came within ``batch.wait_ms``.

The worker hands the :class:`Batcher` every read from nsqd; the batcher hands
each full batch (or, when the timer fires, what is pending) to the plain or
the keyed path. See docs/ARCHITECTURE.md, "The stage contract".
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Batcher:
    """Collects messages into batches and passes each one to ``dispatch``.

    Parameters:
        size: the most messages in a batch (``batch.size``).
        wait_ms: how long the first pending message waits for more (``batch.wait_ms``);
            0: a batch is what one read brought.
        dispatch: called with each batch, once, in order.
    """

    __slots__ = ("size", "wait_s", "dispatch", "_pending", "_timer")

    def __init__(self, size: int, wait_ms: float, dispatch: Callable[[list], Any]):
        self.size, self.wait_s, self.dispatch = size, wait_ms / 1000.0, dispatch
        self._pending: list = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, messages: list) -> None:
        """Take the messages of one read: dispatch every full batch, and start the timer for the rest."""
        pending, size = self._pending, self.size
        pending += messages
        while len(pending) >= size:
            self._cancel_timer()
            self._pending = pending[size:]
            self.dispatch(pending[:size])
            pending = self._pending
        if pending and self._timer is None:
            if not self.wait_s:
                self.flush()  # a batch is what this read brought: handled now, its writes leave with the read's
                return
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)

    def flush(self) -> None:
        """Dispatch every pending message now (the batch timer's call)."""
        messages = self.take_all()
        if messages:
            self.dispatch(messages)

    def take_all(self) -> list:
        """Take the pending messages out without dispatching them (a draining worker requeues them)."""
        self._cancel_timer()
        pending, self._pending = self._pending, []
        return pending

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
