"""Garbage-collector tuning for a running worker, as middleware.

A worker allocates a few container objects per message (the message, its
decoded record, the record it emits), and most die young by reference
counting. CPython's cyclic collector still runs every 700 net allocations,
and each full collection walks every live object: after importing numba,
numpy and pynsq that is over 100,000 objects that never become garbage. At
one JSON record per message the collector took about a fifth of a primes
replica's CPU.

:class:`GcTuning` therefore, once the worker has booted:

- moves everything allocated so far (modules, the connections) into the
  permanent generation with :func:`gc.freeze`, so no collection walks it
  again, and once more when its compiled kernels, loaded after it is
  consuming (:mod:`pipeline.records.jit`), are in (:func:`refreeze`);
- raises the first generation's threshold to :data:`GEN0_THRESHOLD`, so the
  collector runs only when that many objects outlive their batch (e.g. a
  backlog of messages in hand), not every few hundred messages.

Cyclic garbage is still collected, just less often. When the worker drains,
the collector's settings are put back (the last of several workers in one
process does it), so a process that goes on after a worker, such as a test
run, is left as it was.
"""
from __future__ import annotations

import gc
import logging
import threading

from pipeline.middleware import Middleware, WorkerView

log = logging.getLogger(__name__)

GEN0_THRESHOLD = 10_000

_lock = threading.Lock()
_active = 0
_saved: tuple[int, int, int] | None = None


class GcTuning(Middleware):
    """Freezes the boot-time heap and collects the young generation less often while a worker runs."""

    def __init__(self, gen0_threshold: int = GEN0_THRESHOLD):
        self.gen0_threshold = gen0_threshold
        self._applied = False

    def after_worker_boot(self, worker: WorkerView) -> None:
        global _active, _saved
        with _lock:
            if self._applied:
                return
            self._applied = True
            if _active == 0:
                _saved = gc.get_threshold()
            _active += 1
            gc.freeze()
            assert _saved is not None  # taken when _active was 0, by this boot or an earlier one
            _, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(max(self.gen0_threshold, _saved[0]), gen1, gen2)
        log.debug("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), gc.get_threshold())

    def before_worker_shutdown(self, worker: WorkerView) -> None:
        global _active, _saved
        with _lock:
            if not self._applied:
                return
            self._applied = False
            _active -= 1
            if _active == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                gc.unfreeze()
                _saved = None


def refreeze() -> None:
    """Freeze what was allocated since the boot too (numba's kernels, loaded after it; see :mod:`pipeline.records.jit`).

    Does nothing unless a :class:`GcTuning` is in force.
    """
    with _lock:
        if _active:
            gc.freeze()
            log.debug("gc: %d objects frozen after the kernels loaded", gc.get_freeze_count())
