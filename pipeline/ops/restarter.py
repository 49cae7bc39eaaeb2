"""A supervisord event listener that retries FATAL workers with growing back-off and records every state change.

supervisord gives up on a program that fails ``startretries`` times in a row
and leaves it FATAL for good. This listener, subscribed to ``PROCESS_STATE``,
calls ``supervisor.startProcess`` again after ``min(base * 2**(n-1), max)``
seconds, ``n`` counting the FATALs of that process since it last reached
RUNNING. Each state event is appended to a JSON-lines file, and a per-process
summary (``restarts.json``, next to it) feeds ``pipeline status``. Example::

    [eventlistener:restarter]
    command = /venv/bin/python -m pipeline.ops.restarter
        --socket /srv/var/run/supervisor.sock --events /srv/var/log/events.jsonl
    events = PROCESS_STATE
    buffer_size = 1024

stdout belongs to supervisord's event listener protocol; everything else,
including logging, goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypedDict

from supervisor.xmlrpc import Faults, SupervisorTransport

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.ops.restarter")

#: Name of the per-process summary written next to the events file.
SUMMARY_NAME = "restarts.json"

_STATE_EVENT_PREFIX = "PROCESS_STATE_"
_FAULT_NAMES = {code: name for name, code in vars(Faults).items() if isinstance(code, int)}
# 2.0 ** 1100 overflows a float; any base doubled 64 times exceeds every sensible --max.
_MAX_EXPONENT = 64


def backoff_delay(n: int, base: float, max_delay: float) -> float:
    """Return the wait before restarting after the ``n``-th FATAL in a row: ``min(base * 2**(n-1), max_delay)``."""
    exponent = min(max(n - 1, 0), _MAX_EXPONENT)
    return min(base * 2.0**exponent, max_delay)


@dataclass(frozen=True)
class StateEvent:
    """One ``PROCESS_STATE_*`` notification from supervisord, e.g. ``FATAL`` of ``primes:primes-0``."""

    event: str
    group: str
    name: str
    from_state: str | None
    expected: int | None = None
    pid: int | None = None

    @property
    def process(self) -> str:
        """Return the ``group:name`` spec that supervisord's XML-RPC methods accept."""
        return f"{self.group}:{self.name}"


def parse_tokens(line: str) -> dict[str, str]:
    """Parse a supervisord ``key:value key:value`` line (event header or payload head) into a dict.

    Raises:
        PipelineError: if a token has no ``:``; the line is attached in the message.
    """
    fields = {}
    for token in line.split():
        key, colon, value = token.partition(":")
        if not colon:
            raise PipelineError(f"malformed supervisord event token {token!r} in {line!r}")
        fields[key] = value
    return fields


def parse_event(headers: dict[str, str], payload: str) -> StateEvent | None:
    """Return the state event carried by ``headers``/``payload``, or None for any other event type.

    Raises:
        PipelineError: if the payload lacks the process or group name.
    """
    eventname = headers.get("eventname", "")
    if not eventname.startswith(_STATE_EVENT_PREFIX):
        return None
    fields = parse_tokens(payload.split("\n", 1)[0])
    if "processname" not in fields or "groupname" not in fields:
        raise PipelineError(f"{eventname} payload names no process: {payload!r}")
    return StateEvent(
        event=eventname[len(_STATE_EVENT_PREFIX):],
        group=fields["groupname"],
        name=fields["processname"],
        from_state=fields.get("from_state"),
        expected=_int_or_none(fields.get("expected")),
        pid=_int_or_none(fields.get("pid")),
    )


def _int_or_none(value: str | None) -> int | None:
    """Return ``value`` as an int, or None when absent or not a number."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def read_restarts(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Return the per-process summary at ``path`` (``{"group:name": {"restarts": ...}}``), {} if missing or corrupt."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, dict)}


def _write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace``, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from a status run as another user
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EventLog:
    """The JSON-lines events file plus the ``restarts.json`` summary beside it; safe to call from any thread."""

    def __init__(self, events_path: Path, clock: Callable[[], float] = time.time):
        self.events_path = events_path
        self.summary_path = events_path.parent / SUMMARY_NAME
        self._clock = clock
        self._lock = threading.Lock()
        events_path.parent.mkdir(parents=True, exist_ok=True)
        # Continue the counts: a restarted listener must not wipe what status shows.
        self._summary = read_restarts(self.summary_path)
        self._file = open(events_path, "a", encoding="utf-8")

    def record(self, event: StateEvent, action: str | None, *, counts: bool = True) -> None:
        """Append ``event`` with the ``action`` taken; with ``counts``, also update the summary."""
        now = self._clock()
        line = {
            "time": now, "process": event.process, "group": event.group, "name": event.name,
            "event": event.event, "from_state": event.from_state, "expected": event.expected,
            "pid": event.pid, "action": action,
        }
        with self._lock:
            if self._file.closed:
                return  # a restart finishing while the listener exits
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
            if counts:
                self._count(event, now)

    def _count(self, event: StateEvent, now: float) -> None:
        """Update and rewrite the summary entry of ``event``'s process (caller holds the lock)."""
        entry = self._summary.setdefault(
            event.process, {"restarts": 0, "fatals": 0, "last_event": None, "last_time": None}
        )
        # Unexpected EXITED: supervisord restarts it itself; FATAL: this listener will.
        if event.event == "FATAL" or (event.event == "EXITED" and event.expected == 0):
            entry["restarts"] = entry.get("restarts", 0) + 1
        if event.event == "FATAL":
            entry["fatals"] = entry.get("fatals", 0) + 1
        entry["last_event"], entry["last_time"] = event.event, now
        _write_json_atomically(self.summary_path, self._summary)

    def close(self) -> None:
        """Close the events file."""
        with self._lock:
            self._file.close()


class Cancellable(Protocol):
    """A scheduled call that can still be called off (``threading.Timer`` is one)."""

    def cancel(self) -> None:
        """Call off the scheduled call if it has not started."""


def start_timer(delay: float, call: Callable[[], None]) -> Cancellable:
    """Run ``call`` after ``delay`` seconds on a daemon thread, so a pending restart never holds up exit."""
    timer = threading.Timer(delay, call)
    timer.daemon = True
    timer.start()
    return timer


class SupervisorProcessInfo(TypedDict):
    """One process as supervisord's ``getProcessInfo`` and ``getAllProcessInfo`` answer it."""

    name: str
    group: str
    description: str
    start: int  # epoch seconds; 0 if never started
    stop: int
    now: int
    state: int
    statename: str
    spawnerr: str
    exitstatus: int
    logfile: str
    stdout_logfile: str
    stderr_logfile: str
    pid: int  # 0 when not running


def supervisor_rpc(socket_path: str | os.PathLike[str]) -> Any:
    """Return an XML-RPC proxy to supervisord on its unix socket ``socket_path``.

    Typed Any: the proxy resolves ``proxy.supervisor.<method>`` at run time, and each answer is
    whatever that method returns (typeshed can only say "any XML-RPC value"); callers annotate
    what they keep, e.g. ``list[SupervisorProcessInfo]``.
    """
    transport = SupervisorTransport(None, None, serverurl=f"unix://{os.fspath(socket_path)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


class Restarter:
    """Schedule a delayed ``startProcess`` for each FATAL process and record every state event.

    ``rpc`` returns a fresh proxy per call because the transport is not
    thread-safe and restarts run on timer threads. Example::

        restarter = Restarter(lambda: supervisor_rpc(sock), EventLog(events), base=1, max_delay=60)
        restarter.handle(StateEvent("FATAL", "primes", "primes-0", "BACKOFF"))  # -> "restart in 1s"
    """

    def __init__(
        self,
        rpc: Callable[[], Any],
        events: EventLog,
        *,
        base: float,
        max_delay: float,
        myself: str | None = None,
        schedule: Callable[[float, Callable[[], None]], Cancellable] = start_timer,
    ):
        self.events = events
        self.base, self.max_delay = base, max_delay
        self.myself = myself
        self.closed = threading.Event()
        self._rpc, self._schedule = rpc, schedule
        self._lock = threading.Lock()
        self._fatals: dict[str, int] = {}
        self._pending: dict[str, tuple[object, Cancellable]] = {}

    def handle(self, event: StateEvent) -> str | None:
        """Record ``event``, schedule a restart if it is a FATAL, and return that action (None if none)."""
        if event.process == self.myself:
            return None
        action = self._react(event)
        self.events.record(event, action)
        return action

    def _react(self, event: StateEvent) -> str | None:
        """Update the FATAL count of ``event``'s process and (re)schedule or call off its restart."""
        process = event.process
        with self._lock:
            # Any other state means someone (an operator, supervisord) moved it on;
            # a pending restart would only fault with ALREADY_STARTED.
            self._cancel(process)
            if event.event == "RUNNING":
                self._fatals.pop(process, None)
            if event.event != "FATAL" or self.closed.is_set():
                return None
            n = self._fatals[process] = self._fatals.get(process, 0) + 1
            delay = backoff_delay(n, self.base, self.max_delay)
            token = object()
            timer = self._schedule(delay, lambda: self._restart(process, token))
            self._pending[process] = (token, timer)
        log.info("%s is FATAL (%d in a row); restarting in %gs", process, n, delay)
        return f"restart in {delay:g}s"

    def _cancel(self, process: str) -> None:
        """Call off the pending restart of ``process``, if any (caller holds the lock)."""
        pending = self._pending.pop(process, None)
        if pending is not None:
            pending[1].cancel()

    def _restart(self, process: str, token: object) -> None:
        """Ask supervisord to start ``process``, unless this restart was superseded or called off."""
        with self._lock:
            # A timer that already fired cannot be cancelled; the token tells it it was replaced.
            if self._pending.get(process, (None,))[0] is not token or self.closed.is_set():
                return
            del self._pending[process]
        group, _, name = process.partition(":")
        try:
            self._rpc().supervisor.startProcess(process, False)
        except xmlrpc.client.Fault as e:
            fault = _FAULT_NAMES.get(e.faultCode, str(e.faultCode))
            log.warning("startProcess(%s) refused, dropped: %s: %s", process, fault, e.faultString)
            outcome = f"dropped: {fault}: {e.faultString}"
        except (OSError, xmlrpc.client.ProtocolError) as e:
            # The socket is gone: supervisord is shutting down, and will stop us too.
            log.info("supervisord unreachable (%s); no more restarts", e)
            self.close()
            return
        else:
            outcome = "started"
        self.events.record(StateEvent("RESTART", group, name, None), outcome, counts=False)

    def recover(self) -> None:
        """Schedule restarts of processes already FATAL, whose pending restart a previous listener took along."""
        try:
            infos: list[SupervisorProcessInfo] = self._rpc().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError) as e:
            log.warning("could not list processes to recover FATAL ones: %s", e)
            return
        for info in infos:
            if info.get("statename") == "FATAL":
                event = StateEvent("FATAL", info["group"], info["name"], None)
                if event.process != self.myself and event.process not in self._pending:
                    # Recorded without counting: the FATAL itself was counted when it happened.
                    self.events.record(event, self._react(event), counts=False)

    def close(self) -> None:
        """Stop scheduling and call off every pending restart."""
        with self._lock:
            self.closed.set()
            for _, timer in self._pending.values():
                timer.cancel()
            self._pending.clear()


def read_message(stdin: BinaryIO) -> tuple[dict[str, str], str] | None:
    """Read one event: the header line, then exactly ``len`` bytes of payload; None at EOF.

    Raises:
        PipelineError: if the header line is not supervisord's ``key:value`` form with a ``len``.
    """
    line = stdin.readline()
    if not line.endswith(b"\n"):
        return None  # EOF, possibly mid-line: supervisord has gone away
    headers = parse_tokens(line.decode("utf-8", "replace"))
    size = _int_or_none(headers.get("len"))
    if size is None or size < 0:
        raise PipelineError(f"event header without a valid len: {line!r}")
    payload = stdin.read(size)
    if len(payload) < size:
        return None
    return headers, payload.decode("utf-8", "replace")


def serve(restarter: Restarter, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Speak supervisord's event listener protocol until EOF or until supervisord is unreachable."""
    while not restarter.closed.is_set():
        stdout.write(b"READY\n")
        stdout.flush()
        message = read_message(stdin)
        if message is None:
            return
        _dispatch(restarter, *message)
        # Always OK: FAIL makes supervisord resend the event, looping on a bug.
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


def _dispatch(restarter: Restarter, headers: dict[str, str], payload: str) -> None:
    """Hand one event to ``restarter``; a failure is logged and does not stop the listener."""
    try:
        event = parse_event(headers, payload)
        if event is not None:
            restarter.handle(event)
    except Exception:  # one bad event must not stop the restarts of every other process
        log.critical("could not handle event %s %r", headers.get("eventname"), payload, exc_info=True)


def _take_stdout() -> BinaryIO:
    """Return a private handle on fd 1 and point fd 1 and ``sys.stdout`` at stderr.

    Anything else that prints (a library, a warning) would corrupt the protocol.
    """
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def _exit_on_signal(signum: int, frame: object) -> None:
    """Leave the protocol loop at once: supervisord is stopping us and waits for nothing."""
    raise SystemExit(0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; usage errors exit 2 with a message on stderr."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.ops.restarter", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, type=Path, help="supervisord's unix socket")
    parser.add_argument("--events", required=True, type=Path, help="JSON-lines file to append events to")
    parser.add_argument("--base", type=float, default=1.0, help="first back-off, seconds (default 1)")
    parser.add_argument("--max", type=float, default=60.0, help="back-off ceiling, seconds (default 60)")
    args = parser.parse_args(argv)
    if not args.base > 0:
        parser.error(f"--base must be > 0, got {args.base:g}")
    if not args.max >= args.base:
        parser.error(f"--max ({args.max:g}) must be >= --base ({args.base:g})")
    return args


def _own_name() -> str | None:
    """Return this listener's ``group:name`` from the environment supervisord sets, None outside it."""
    group, name = os.environ.get("SUPERVISOR_GROUP_NAME"), os.environ.get("SUPERVISOR_PROCESS_NAME")
    return f"{group}:{name}" if group and name else None


def main(argv: list[str] | None = None) -> int:
    """Run the listener; return 0 on EOF, SIGTERM or supervisord's shutdown, 1 on a protocol error."""
    args = _parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s restarter %(levelname)s %(message)s"
    )
    protocol_out = _take_stdout()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    events = EventLog(args.events)
    restarter = Restarter(
        lambda: supervisor_rpc(args.socket), events, base=args.base, max_delay=args.max, myself=_own_name()
    )
    threading.Thread(target=restarter.recover, name="recover", daemon=True).start()
    try:
        serve(restarter, sys.stdin.buffer, protocol_out)
    except PipelineError as e:
        log.critical("protocol error, exiting: %s", e)
        return 1
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # supervisord went away mid-write, or an operator pressed ^C
    finally:
        restarter.close()
        events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
