"""What a handler returned, checked; what it raised, described and logged without flooding the log.

A handler must return a mapping of its stage's declared outputs to a list of
records or :class:`~pipeline.stage.Columns` (``{}`` emits nothing).
:func:`check_result` turns anything else into a :class:`~pipeline.errors.StageOutputError`,
which the runtime treats exactly like an exception the handler raised
(:mod:`pipeline.runtime.processing`). :func:`handler_frames` is the part of an
exception's traceback a dead letter keeps, and :class:`FailureLog` is how a
worker logs both kinds of failure: a bad result once per kind, at ERROR, with
the handler's ``file:line``; an exception with its traceback at most once per
:data:`TRACEBACK_EVERY` seconds per place it was raised, a one-line summary
with a count otherwise.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from pipeline.errors import StageOutputError
from pipeline.stage import Columns

log = logging.getLogger(__name__)

TRACEBACK_FRAMES = 5  # the innermost frames a dead letter keeps
TRACEBACK_LIMIT = 2000  # characters of traceback a dead letter keeps, at most
TRACEBACK_EVERY = 60.0  # seconds between two full tracebacks logged for one place an exception was raised
_MAX_SITES = 1000  # places remembered; past that the memory starts afresh (a traceback each, once more)


def check_result(emitted: object, outputs: Collection[str], stage: str, *, columnar: bool = False) -> None:
    """Check that a handler's result maps declared outputs to lists of records or Columns; O(outputs).

    Raises:
        StageOutputError: the result is None, not a mapping, names an output
            the stage does not declare, or holds something else for one.
    """
    if type(emitted) is not dict and not isinstance(emitted, Mapping):
        if emitted is None:
            raise StageOutputError("handler returned None; return {} to emit nothing", "none", columnar=columnar)
        raise StageOutputError(f"handler returned {type(emitted).__name__}, not a mapping of outputs",
                               "not_mapping", columnar=columnar)
    for name, value in emitted.items():
        if name not in outputs:
            raise StageOutputError(f"handler emitted to {name!r}, which is not an output of stage {stage} "
                                   f"(outputs: {', '.join(outputs)})", "undeclared_output", columnar=columnar)
        if type(value) is not list and not isinstance(value, (list, Columns)):
            raise StageOutputError(f"handler emitted {type(value).__name__} to {name!r}, not a list of records "
                                   "or Columns", "bad_value", columnar=columnar)


def handler_frames(error: BaseException, frames: int = TRACEBACK_FRAMES, limit: int = TRACEBACK_LIMIT) -> str:
    """The last ``frames`` frames of an exception the handler raised, and the exception, in at most ``limit``
    characters (the innermost kept); without the runtime's frame that called the handler."""
    tb = error.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the first frame is where the runtime called the handler and caught the exception
    stack = traceback.extract_tb(tb, limit=-frames)
    exception = "".join(traceback.format_exception_only(type(error), error)).rstrip("\n")
    if len(exception) > limit // 4:
        exception = exception[:limit // 4] + "..."
    text = "".join(["Traceback (most recent call last):\n", *stack.format(), exception])
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def code_site(fn: object) -> str:
    """Where ``fn`` is defined, as ``file:line``: a function's or method's, or for a stage object its
    class's ``__call__`` (the file relative to the working folder when it is inside it)."""
    target: object = fn.func if isinstance(fn, functools.partial) else fn
    if callable(target) and not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target).__call__  # a stage object: its class's __call__
    target = inspect.unwrap(getattr(target, "__func__", target))  # type: ignore[arg-type]  # any callable
    code = getattr(target, "__code__", None)
    if code is None:
        return repr(fn)[:80]
    return f"{_shown(code.co_filename)}:{code.co_firstlineno}"


def _shown(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if relative.startswith("..") else relative


def _raised_at(error: BaseException) -> tuple[str, str, int]:
    """The exception's type and the innermost place it went through: where it was raised."""
    tb = error.__traceback__
    if tb is None:
        return type(error).__qualname__, "?", 0
    while tb.tb_next is not None:
        tb = tb.tb_next
    return type(error).__qualname__, _shown(tb.tb_frame.f_code.co_filename), tb.tb_lineno


@dataclass
class _Site:
    logged: float  # when its last full traceback was logged (the clock's time)
    since: int = 0  # exceptions raised there since then


class FailureLog:
    """Logs a worker's handler failures: bad results once per kind, tracebacks rate-limited per site.

    Parameters:
        stage: the stage's name.
        handler: the stage's handler (its ``columns`` function too, when it has one).
        every: seconds between two full tracebacks for one site.
        clock: monotonic seconds (a test's own clock).
    """

    def __init__(self, stage: str, handler: object, *, every: float = TRACEBACK_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.handler, self.every, self.clock = stage, handler, every, clock
        self._kinds: set[tuple[str, bool]] = set()
        self._sites: dict[tuple[str, str, int], _Site] = {}

    def report(self, count: int, error: BaseException) -> None:
        """Log that a handler call over ``count`` records raised ``error`` or returned a bad result."""
        if isinstance(error, StageOutputError):
            self._bad_result(count, error)
        else:
            self._raised(count, error)

    def _bad_result(self, count: int, error: StageOutputError) -> None:
        if (error.kind, error.columnar) in self._kinds:
            return
        self._kinds.add((error.kind, error.columnar))
        if error.columnar:
            what, then = f"columnar function {code_site(getattr(self.handler, 'columns', None))}", \
                "the record path takes the batch"
        else:
            what, then = f"handler {code_site(self.handler)}", "the batch fails as if the handler raised"
        log.error("stage %s, %s: %s (%d records; %s; not logged again by this worker)", self.stage, what,
                  error.reason, count, then)

    def _raised(self, count: int, error: BaseException) -> None:
        key, now = _raised_at(error), self.clock()
        site = self._sites.get(key)
        if site is not None and now - site.logged < self.every:
            site.since += 1
            log.warning("stage %s: handler raised on %d records: %r at %s:%d (%d times since its traceback "
                        "%.0f s ago)", self.stage, count, error, key[1], key[2], site.since, now - site.logged)
            return
        if len(self._sites) >= _MAX_SITES:
            self._sites.clear()
        since = f" ({site.since} more there since its last traceback)" if site is not None and site.since else ""
        self._sites[key] = _Site(now)
        log.warning("stage %s: handler raised on %d records: %r at %s:%d%s", self.stage, count, error, key[1], key[2],
                    since, exc_info=error)
