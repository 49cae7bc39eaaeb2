"""Tests for pipeline.ops.restarter: unit tests of its parts, then the listener under a real supervisord."""
from __future__ import annotations

import io
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nsqhttp import wait_until
from pipeline.errors import PipelineError
from pipeline.ops.processes import pid_alive
from pipeline.ops.restarter import (
    EventLog,
    Restarter,
    StateEvent,
    backoff_delay,
    parse_event,
    parse_tokens,
    read_message,
    read_restarts,
    supervisor_rpc,
)

REPO = Path(__file__).resolve().parents[1]
SUPERVISORD = Path(sys.executable).with_name("supervisord")


# --- unit tests: no supervisord ----------------------------------------------


def test_backoff_doubles_from_base_up_to_max() -> None:
    assert [backoff_delay(n, 1, 60) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [backoff_delay(n, 0.2, 1) for n in range(1, 5)] == [0.2, 0.4, 0.8, 1]
    assert backoff_delay(10_000, 1, 60) == 60  # no OverflowError after a week of crashing


def test_parse_fatal_and_exited_payloads() -> None:
    fatal = parse_event(
        {"ver": "3.0", "eventname": "PROCESS_STATE_FATAL", "len": "54"},
        "processname:crasher-0 groupname:crasher from_state:BACKOFF",
    )
    assert fatal == StateEvent("FATAL", "crasher", "crasher-0", "BACKOFF")
    assert fatal.process == "crasher:crasher-0"
    exited = parse_event(
        {"eventname": "PROCESS_STATE_EXITED"},
        "processname:primes-1 groupname:primes from_state:RUNNING expected:0 pid:4242",
    )
    assert exited == StateEvent("EXITED", "primes", "primes-1", "RUNNING", expected=0, pid=4242)


def test_parse_ignores_other_event_types_and_rejects_malformed_payloads() -> None:
    assert parse_event({"eventname": "TICK_5"}, "when:1700000000") is None
    with pytest.raises(PipelineError, match=r"malformed supervisord event token 'garbage'"):
        parse_event({"eventname": "PROCESS_STATE_FATAL"}, "processname:x garbage")
    with pytest.raises(PipelineError, match="PROCESS_STATE_FATAL payload names no process"):
        parse_event({"eventname": "PROCESS_STATE_FATAL"}, "from_state:BACKOFF")


def test_read_message_reads_len_bytes_and_stops_at_eof() -> None:
    payload = "processname:w groupname:g from_state:STARTING tries:0".encode()
    header = f"ver:3.0 server:supervisor eventname:PROCESS_STATE_BACKOFF len:{len(payload)}\n".encode()
    stream = io.BytesIO(header + payload + header + payload[:5])
    headers, text = read_message(stream)
    assert headers["eventname"] == "PROCESS_STATE_BACKOFF" and text == payload.decode()
    assert read_message(stream) is None  # truncated payload: supervisord died mid-write
    assert read_message(io.BytesIO(b"")) is None
    with pytest.raises(PipelineError, match="event header without a valid len"):
        read_message(io.BytesIO(b"ver:3.0 eventname:PROCESS_STATE_FATAL\n"))


def test_read_restarts_is_empty_when_missing_or_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "restarts.json"
    assert read_restarts(path) == {}
    path.write_text("{half a file")
    assert read_restarts(path) == {}
    path.write_text("[1, 2]")
    assert read_restarts(path) == {}
    path.write_text(json.dumps({"g:a": {"restarts": 2}, "junk": 3}))
    assert read_restarts(path) == {"g:a": {"restarts": 2}}
    assert parse_tokens("a:1 b:x:y") == {"a": "1", "b": "x:y"}


@dataclass
class FakeTimer:
    """A scheduled call the test fires by hand."""

    delay: float
    call: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeSupervisor:
    """Stands in for the ``supervisor`` namespace of the XML-RPC proxy."""

    error: Exception | None = None
    started: list[tuple[str, bool]] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)

    def startProcess(self, name: str, wait: bool) -> bool:  # noqa: N802 - supervisord's name
        if self.error is not None:
            raise self.error
        self.started.append((name, wait))
        return True

    def getAllProcessInfo(self) -> list[dict[str, Any]]:  # noqa: N802 - supervisord's name
        return self.infos


@dataclass
class Harness:
    """A Restarter wired to a fake supervisord and fake timers."""

    restarter: Restarter
    supervisor: FakeSupervisor
    timers: list[FakeTimer]
    events_path: Path

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    supervisor, timers = FakeSupervisor(), []

    def schedule(delay: float, call: Callable[[], None]) -> FakeTimer:
        timers.append(FakeTimer(delay, call))
        return timers[-1]

    events = EventLog(tmp_path / "log" / "events.jsonl", clock=lambda: 1000.0)
    proxy = type("Proxy", (), {"supervisor": supervisor})()
    restarter = Restarter(
        lambda: proxy, events, base=0.5, max_delay=2, myself="restarter:restarter", schedule=schedule
    )
    yield Harness(restarter, supervisor, timers, events.events_path)
    events.close()


def _fatal(name: str = "w-0") -> StateEvent:
    return StateEvent("FATAL", "w", name, "BACKOFF")


def test_fatal_schedules_growing_backoff_and_running_resets_it(harness: Harness) -> None:
    actions = [harness.restarter.handle(_fatal()) for _ in range(4)]
    assert actions == ["restart in 0.5s", "restart in 1s", "restart in 2s", "restart in 2s"]
    assert [t.cancelled for t in harness.timers] == [True, True, True, False]  # one pending per process
    harness.timers[-1].call()
    assert harness.supervisor.started == [("w:w-0", False)]
    harness.restarter.handle(StateEvent("RUNNING", "w", "w-0", "STARTING", pid=7))
    assert harness.restarter.handle(_fatal()) == "restart in 0.5s"
    recorded = harness.lines()
    assert [(r["event"], r["action"]) for r in recorded][3:6] == [
        ("FATAL", "restart in 2s"), ("RESTART", "started"), ("RUNNING", None),
    ]
    assert recorded[0] == {
        "time": 1000.0, "process": "w:w-0", "group": "w", "name": "w-0", "event": "FATAL",
        "from_state": "BACKOFF", "expected": None, "pid": None, "action": "restart in 0.5s",
    }


def test_summary_counts_fatals_and_unexpected_exits_only(harness: Harness) -> None:
    for event in (
        _fatal(), _fatal(),
        StateEvent("EXITED", "w", "w-0", "RUNNING", expected=0, pid=5),
        StateEvent("EXITED", "w", "w-0", "RUNNING", expected=1, pid=6),
        StateEvent("STOPPED", "w", "w-0", "STOPPING", pid=7),
    ):
        harness.restarter.handle(event)
    summary = read_restarts(harness.restarter.events.summary_path)
    assert summary == {
        "w:w-0": {"restarts": 3, "fatals": 2, "last_event": "STOPPED", "last_time": 1000.0}
    }
    assert not list(harness.events_path.parent.glob(".restarts.json.*"))  # no temp files left


def test_operator_start_calls_off_the_pending_restart(harness: Harness) -> None:
    harness.restarter.handle(_fatal())
    harness.restarter.handle(StateEvent("STARTING", "w", "w-0", "FATAL"))
    assert harness.timers[0].cancelled
    harness.timers[0].call()  # a timer that fired anyway must notice it was replaced
    assert harness.supervisor.started == []


def test_fault_is_logged_and_dropped(harness: Harness) -> None:
    harness.supervisor.error = xmlrpc.client.Fault(10, "BAD_NAME: w:w-0")
    harness.restarter.handle(_fatal())
    harness.timers[0].call()
    assert harness.lines()[-1]["action"] == "dropped: BAD_NAME: BAD_NAME: w:w-0"
    assert not harness.restarter.closed.is_set()


def test_socket_gone_stops_all_restarts(harness: Harness) -> None:
    harness.supervisor.error = FileNotFoundError(2, "No such file or directory")
    harness.restarter.handle(_fatal("w-0"))
    harness.restarter.handle(_fatal("w-1"))
    harness.timers[0].call()
    assert harness.restarter.closed.is_set()
    assert harness.timers[1].cancelled
    assert harness.restarter.handle(_fatal("w-2")) is None


def test_listener_ignores_itself_and_recovers_fatal_processes(harness: Harness) -> None:
    assert harness.restarter.handle(StateEvent("FATAL", "restarter", "restarter", "BACKOFF")) is None
    harness.supervisor.infos = [
        {"group": "w", "name": "w-3", "statename": "FATAL"},
        {"group": "w", "name": "w-4", "statename": "RUNNING"},
        {"group": "restarter", "name": "restarter", "statename": "FATAL"},
    ]
    harness.restarter.recover()
    assert [(r["process"], r["event"], r["action"]) for r in harness.lines()] == [
        ("w:w-3", "FATAL", "restart in 0.5s")
    ]
    assert read_restarts(harness.restarter.events.summary_path) == {}  # counted when it happened


# --- the listener process, speaking the protocol on pipes ----------------------


def _envelope(eventname: str, payload: str) -> bytes:
    """Return one event as supervisord writes it to a listener's stdin."""
    body = payload.encode()
    header = f"ver:3.0 server:supervisor serial:1 pool:restarter poolserial:1 eventname:{eventname} len:{len(body)}"
    return header.encode() + b"\n" + body


def _listener(tmp_path: Path, socket: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pipeline.ops.restarter", "--socket", str(socket),
            "--events", str(tmp_path / "events.jsonl"), "--base", "0.05", "--max", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _read_exactly(stream: Any, size: int, timeout: float) -> bytes:
    """Read ``size`` bytes from a pipe, failing the test if they do not arrive within ``timeout``."""
    data, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while len(data) < size:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and selector.select(remaining), f"only {data!r} after {timeout} s"
            chunk = os.read(stream.fileno(), size - len(data))
            assert chunk, f"EOF after {data!r}"
            data += chunk
    return data


def test_stdout_carries_only_the_protocol_and_eof_ends_the_listener(tmp_path: Path) -> None:
    # Given a FATAL whose restart will find no supervisord socket, and a non-state event
    events = _envelope("PROCESS_STATE_FATAL", "processname:w-0 groupname:w from_state:BACKOFF")
    events += _envelope("TICK_5", "when:1700000000")
    process = _listener(tmp_path, tmp_path / "missing.sock")
    # When stdin closes after them
    out, err = process.communicate(events, timeout=20)
    # Then stdout holds exactly three READY and two results, and the listener exited cleanly
    assert out == b"READY\n" + b"RESULT 2\nOK" + b"READY\n" + b"RESULT 2\nOK" + b"READY\n", err
    assert process.returncode == 0, err
    [fatal] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (fatal["process"], fatal["action"]) == ("w:w-0", "restart in 0.05s")


def test_sigterm_ends_a_waiting_listener_promptly(tmp_path: Path) -> None:
    process = _listener(tmp_path, tmp_path / "missing.sock")
    try:
        assert _read_exactly(process.stdout, 6, timeout=20) == b"READY\n"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        assert time.monotonic() - started < 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stdout.close()
        process.stderr.close()


# --- a real supervisord --------------------------------------------------------

CRASHER = """\
import os, signal, sys
flag, counter = sys.argv[1], sys.argv[2]
with open(counter, "a") as out:
    out.write(f"{os.getpid()}\\n")
if os.path.exists(flag):
    sys.exit(1)
signal.pause()
"""

CONFIG = """\
[unix_http_server]
file = {run}/supervisor.sock
chmod = 0700

[supervisord]
logfile = {log}/supervisord.log
pidfile = {run}/supervisord.pid
childlogdir = {log}
nodaemon = true
silent = true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:crasher]
command = {python} -I -S {script} {flag} {counter}
process_name = %(program_name)s-%(process_num)d
numprocs = 1
startsecs = 1
startretries = 2
autorestart = true
stopwaitsecs = 5
redirect_stderr = true
stdout_logfile = {log}/crasher.log

[eventlistener:restarter]
command = {python} -m pipeline.ops.restarter --socket {run}/supervisor.sock --events {log}/events.jsonl --base 0.2 --max 1
environment = PYTHONPATH="{repo}"
events = PROCESS_STATE
buffer_size = 1024
autorestart = true
stopwaitsecs = 5
stdout_logfile = NONE
stderr_logfile = {log}/restarter.err.log
"""


@dataclass
class Supervisord:
    """A supervisord child process running ``crasher`` and the restarter."""

    process: subprocess.Popen[bytes]
    socket: Path
    log: Path
    flag: Path
    counter: Path

    def rpc(self) -> Any:
        return supervisor_rpc(self.socket).supervisor

    def starts(self) -> list[int]:
        return [int(pid) for pid in self.counter.read_text().split()] if self.counter.exists() else []

    def events(self) -> list[dict[str, Any]]:
        path = self.log / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rpc_state(server: Supervisord) -> str | None:
    """Return supervisord's state name, or None while its socket does not answer yet."""
    try:
        return server.rpc().getState()["statename"]
    except OSError:
        return None


@pytest.fixture
def supervisord(tmp_path: Path) -> Iterator[Supervisord]:
    run, log = tmp_path / "run", tmp_path / "log"
    run.mkdir()
    log.mkdir()
    assert len(str(run / "supervisor.sock")) < 100, "unix socket path too long for AF_UNIX"
    script, flag, counter = tmp_path / "crasher.py", tmp_path / "crash.flag", tmp_path / "starts"
    script.write_text(CRASHER)
    flag.touch()
    conf = tmp_path / "supervisord.conf"
    conf.write_text(CONFIG.format(
        run=run, log=log, python=sys.executable, script=script, flag=flag, counter=counter, repo=REPO
    ))
    process = subprocess.Popen(
        [str(SUPERVISORD), "-n", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = Supervisord(process, run / "supervisor.sock", log, flag, counter)
    try:
        wait_until(lambda: _rpc_state(server) == "RUNNING", 15, message="supervisord never answered")
        yield server
    finally:
        _stop_supervisord(server)


def _stop_supervisord(server: Supervisord) -> None:
    """Stop supervisord by pid (TERM, then KILL at a deadline) and check it left no child behind."""
    children = set(server.starts())
    try:
        children |= {info["pid"] for info in server.rpc().getAllProcessInfo() if info["pid"]}
    except OSError:
        pass  # already gone: the pids from the counter file are still checked
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    try:
        wait_until(
            lambda: not [pid for pid in children if pid_alive(pid)], 10,
            message=f"children of supervisord outlived it (pids {sorted(children)})",
        )
    finally:
        for pid in children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _count(events: list[dict[str, Any]], name: str) -> int:
    return sum(1 for event in events if event["event"] == name)


def _assert_backoff_follows_fatals(events: list[dict[str, Any]]) -> None:
    """Check each FATAL's action doubles from 0.2 s up to 1 s, restarting the count after RUNNING.

    A loaded machine can slow the crasher past startsecs, so supervisord may
    report RUNNING between FATALs; the expected delays follow that.
    """
    in_a_row = 0
    for event in events:
        if event["event"] == "RUNNING":
            in_a_row = 0
        elif event["event"] == "FATAL":
            in_a_row += 1
            assert event["action"] == f"restart in {backoff_delay(in_a_row, 0.2, 1):g}s", event


def test_fatal_worker_is_retried_with_backoff_until_it_starts(supervisord: Supervisord) -> None:
    # Given crasher exits at once while the flag exists, so supervisord gives up after 3 starts
    listener_pid = supervisord.rpc().getProcessInfo("restarter")["pid"]
    # When the restarter keeps bringing it back from FATAL
    wait_until(
        lambda: len(supervisord.starts()) >= 10 and _count(supervisord.events(), "FATAL") >= 3,
        45, message="crasher was not brought back from FATAL 3 times / started 10 times",
    )
    _assert_backoff_follows_fatals(supervisord.events())
    assert {e["process"] for e in supervisord.events()} == {"crasher:crasher-0"}  # never itself
    assert any(e["event"] == "RESTART" and e["action"] == "started" for e in supervisord.events())
    # Then, once the fault is gone, it reaches RUNNING and stays up
    supervisord.flag.unlink()
    wait_until(
        lambda: supervisord.rpc().getProcessInfo("crasher:crasher-0")["statename"] == "RUNNING",
        30, message="crasher never reached RUNNING",
    )
    wait_until(
        lambda: read_restarts(supervisord.log / "restarts.json").get("crasher:crasher-0", {}).get("last_event")
        == "RUNNING", 10, message="the listener never recorded RUNNING",
    )
    summary = read_restarts(supervisord.log / "restarts.json")["crasher:crasher-0"]
    assert summary["fatals"] >= 2 and summary["restarts"] >= summary["fatals"]
    # The listener itself never crashed or spoke out of turn (that would leave it UNKNOWN and restarted).
    listener = supervisord.rpc().getProcessInfo("restarter")
    assert (listener["statename"], listener["pid"]) == ("RUNNING", listener_pid)
