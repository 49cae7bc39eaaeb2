"""Tests for pipeline.ops.processes against real nsqd, nsqlookupd and nsqadmin."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsqhttp import get_text, lookupd_nodes
from pipeline.errors import ProcessError
from pipeline.testing import NsqCluster
from pipeline.ops.install import NSQ_VERSION, installed_version
from pipeline.ops.processes import (
    NsqProcess,
    consecutive_free_ports,
    free_port,
    listen_addresses,
    pid_alive,
    start_nsqadmin,
    start_nsqd,
    start_process,
    stop_pid,
    wait_ping,
)

pytestmark = pytest.mark.integration


def _ss_listeners(pid: int) -> list[str] | None:
    """Return what ``ss -ltnp`` says ``pid`` listens on, as a cross-check of /proc parsing."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def _assert_listens_exactly(process: NsqProcess, expected: list[str]) -> None:
    """Assert ``process`` listens on ``expected`` and nothing else, all on 127.0.0.1."""
    listening = listen_addresses(process.pid)
    assert sorted(listening) == sorted(expected)
    assert all(address.startswith("127.0.0.1:") for address in listening)
    from_ss = _ss_listeners(process.pid)
    if from_ss is not None:
        assert sorted(from_ss) == sorted(expected)


def test_nsqd_starts_binds_loopback_and_stops(nsq_bin: Path, tmp_path: Path) -> None:
    process = start_nsqd(tmp_path / "n0")
    try:
        assert get_text(process.http, "/ping") == (200, "OK")
        assert installed_version(process.argv[0]) == NSQ_VERSION
        _assert_listens_exactly(process, [process.tcp, process.http])
        assert (tmp_path / "n0" / "nsqd.log").exists()
    finally:
        code = process.stop()
    assert code == 0
    assert not process.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)


def test_nsqd_fixture(nsqd: NsqProcess) -> None:
    assert nsqd.alive()
    assert get_text(nsqd.http, "/ping") == (200, "OK")


def test_taken_tcp_port_raises_naming_the_port(nsqd: NsqProcess, tmp_path: Path) -> None:
    with pytest.raises(ProcessError) as info:
        start_nsqd(tmp_path / "second", tcp=nsqd.tcp)
    message = str(info.value)
    assert message.startswith("nsqd exited with code 1 before answering /ping on 127.0.0.1:")
    assert f"listen ({nsqd.tcp}) failed" in message
    assert "address already in use" in message
    assert nsqd.alive()


def test_taken_http_port_is_not_mistaken_for_the_new_nsqd(nsqd: NsqProcess, tmp_path: Path) -> None:
    # The old nsqd answers /ping on that port: only the pid check tells them apart.
    with pytest.raises(ProcessError, match=re.escape(f"listen ({nsqd.http}) failed")):
        start_nsqd(tmp_path / "second", http=nsqd.http)
    assert nsqd.alive()


def test_nsqd_registers_with_lookupd(nsq_cluster: NsqCluster) -> None:
    # The fixture waited for the registration; check what was registered.
    nsqd, lookupd = nsq_cluster.nsqd, nsq_cluster.lookupd
    [node] = lookupd_nodes(lookupd.http)
    assert node["broadcast_address"] == "127.0.0.1"
    assert f"127.0.0.1:{node['tcp_port']}" == nsqd.tcp
    assert f"127.0.0.1:{node['http_port']}" == nsqd.http
    assert node["version"] == NSQ_VERSION
    _assert_listens_exactly(lookupd, [lookupd.tcp, lookupd.http])


def test_nsqadmin_answers_ping_on_loopback(nsq_cluster: NsqCluster, tmp_path: Path) -> None:
    admin = start_nsqadmin([nsq_cluster.lookupd.http], log_path=tmp_path / "nsqadmin.log")
    try:
        assert get_text(admin.http, "/ping") == (200, "OK")
        _assert_listens_exactly(admin, [admin.http])
    finally:
        admin.stop()
    assert not admin.alive()


def test_silent_process_times_out_and_is_stopped(tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-c", "print('starting', flush=True); import time; time.sleep(60)"]
    with pytest.raises(ProcessError) as info:
        start_process("sleeper", argv, http=http, log_path=tmp_path / "sleeper.log", ping_timeout=0.3)
    assert str(info.value) == (
        f"sleeper did not answer /ping on {http} within 0.3 s: starting (log: {tmp_path / 'sleeper.log'})"
    )


def _ready_child(code: str) -> subprocess.Popen[str]:
    """Start a Python child running ``code`` and return once it has printed its first line."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child


def test_stop_pid_of_a_child_returns_its_exit_code() -> None:
    child = _ready_child("import time; print('ready', flush=True); time.sleep(60)")
    assert stop_pid(child.pid) == -15
    child.returncode = -15  # reaped by stop_pid, not by Popen
    child.stdout.close()


def test_stop_pid_kills_a_child_that_ignores_sigterm() -> None:
    child = _ready_child(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(60)"
    )
    assert stop_pid(child.pid, grace=0.2) == -9
    child.returncode = -9
    child.stdout.close()


def test_stop_pid_of_a_process_that_is_not_our_child() -> None:
    # The shell starts sleep in the background and exits, so sleep is reparented.
    out = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    ).stdout
    pid = int(out)
    assert pid_alive(pid)
    assert stop_pid(pid) is None
    assert not pid_alive(pid)


def test_a_process_that_has_exited_listens_on_nothing_and_owns_no_port(nsqd: NsqProcess) -> None:
    # A new nsqd that fails on a taken port can exit between wait_ping's ping (answered by the old
    # nsqd) and its owner check; the check must then say "not the owner", not "cannot tell".
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert listen_addresses(gone.pid) == []
    assert not wait_ping(nsqd.http, time.monotonic() + 2, owner=gone.pid)


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_free_port_never_hands_out_a_port_twice_nor_one_outgoing_connections_may_take() -> None:
    low = _ephemeral_low()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if low - 1024 >= 1000:
        assert all(1024 <= p < low for p in ports), [p for p in ports if not 1024 <= p < low]


def test_free_port_skips_a_port_something_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.ops.processes as processes

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        spare = free_port()
        processes._HANDED_OUT.discard(spare)

        class Picks:  # the random pick is not what this test is about: offer the listening port first
            def __init__(self) -> None:
                self.offers = [taken, spare]

            def randrange(self, start: int, stop: int) -> int:
                return self.offers.pop(0)

        monkeypatch.setattr(processes, "_PICK", Picks())
        monkeypatch.setattr(processes, "_ephemeral_low", lambda: 65000)
        assert free_port() == spare


def test_consecutive_free_ports_are_free_and_not_handed_out_again() -> None:
    base = consecutive_free_ports(3)
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    later = {free_port() for _ in range(300)}
    assert later.isdisjoint(range(base, base + 3))
