"""Compiled kernels that a worker loads after it is consuming, with plain-Python twins until then.

Importing numba and loading a kernel from numba's cache costs a worker about
0.7 s of CPU at start, half its start-up: a replica restarted after a crash
would be that much later consuming again. So ``pipeline worker`` calls
:func:`defer` before it imports anything, subscribes, and only then loads
every registered kernel module in a background thread
(:func:`load_in_background`). Until a module is loaded, :func:`kernel` returns
None for it and its caller uses a plain-Python twin that gives identical
results, only slower (the frame scanner, the JSON splitter, the primes test).

Without :func:`defer` (tests, tools, benchmarks, the gateway) :func:`kernel`
imports the module on first use, synchronously, as a plain import would.

A module whose import fails in the background (numba missing or broken) is
logged as CRITICAL and its twin keeps working: the worker stays correct,
just slower, rather than crash-looping.
"""
from __future__ import annotations

import gc
import importlib
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType

log = logging.getLogger(__name__)

__all__ = ["register", "kernel", "defer", "load_in_background", "deferred"]

_registered: list[str] = []
_ready: dict[str, ModuleType] = {}
_deferred = False


def register(module: str) -> str:
    """Note ``module`` (a kernel module's dotted name) for :func:`load_in_background`; return the name."""
    if module not in _registered:
        _registered.append(module)
    return module


def kernel(module: str) -> ModuleType | None:
    """The kernel module ``module`` if it may be used now, else None (deferred and not loaded yet)."""
    found = _ready.get(module)
    if found is not None or _deferred:
        return found
    found = _ready[module] = importlib.import_module(module)
    return found


def defer() -> None:
    """From now on, :func:`kernel` gives only modules that :func:`load_in_background` has loaded."""
    global _deferred
    _deferred = True


def deferred() -> bool:
    """Whether :func:`defer` was called in this process."""
    return _deferred


def load_in_background(on_loaded: Callable[[], None] = lambda: None) -> threading.Thread:
    """Import every registered kernel module in a daemon thread; each becomes usable once imported.

    ``on_loaded`` is called in that thread once all are loaded (or failed).
    """
    thread = threading.Thread(target=_load_all, args=(on_loaded,), name="kernels", daemon=True)
    thread.start()
    return thread


def _load_all(on_loaded: Callable[[], None]) -> None:
    started = time.monotonic()
    # Importing numba allocates a few hundred thousand objects while the worker is already consuming:
    # left to the collector, they cost the event loop collections of tens of ms (one of 150 ms seen) in
    # its first second. They never become garbage, so none is collected until on_loaded (see
    # pipeline.runtime.middleware.gctuning.refreeze) has moved them out of its way.
    enabled = gc.isenabled()
    gc.disable()
    try:
        _import_all()
        log.info("compiled kernels ready after %.2f s: %s", time.monotonic() - started, ", ".join(sorted(_ready)))
        on_loaded()
    finally:
        if enabled:
            gc.enable()


def _import_all() -> None:
    for module in list(_registered):
        if module in _ready:
            continue
        try:
            loaded = importlib.import_module(module)  # the module compiles or loads its kernels at import
        except Exception:
            log.critical("cannot load the compiled kernels of %s; its plain-Python version keeps running "
                         "(correct, slower)", module, exc_info=True)
            continue
        _ready[module] = loaded
