"""Shared fixtures: real NSQ binaries, nsqd and nsqlookupd processes, fresh topics.

Every process is started on free 127.0.0.1 ports, stopped by pid at teardown,
and checked to be gone, so no test leaks a server into the next.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nsqhttp import lookupd_nodes, wait_until
from pipeline.install import install_nsq
from pipeline.processes import NsqProcess, start_nsqd, start_nsqlookupd

REGISTER_TIMEOUT = 10.0


@dataclass
class NsqCluster:
    """One nsqlookupd and one nsqd registered with it."""

    lookupd: NsqProcess
    nsqd: NsqProcess


@pytest.fixture(scope="session")
def nsq_bin() -> Path:
    """Install the NSQ binaries into the venv once per session (builds them on the first run)."""
    return install_nsq()


def _stop(process: NsqProcess) -> None:
    """Stop ``process`` and fail the test if it survives."""
    process.stop()
    assert not process.alive(), f"{process.name} (pid {process.pid}) survived stop()"


@pytest.fixture
def nsqd(nsq_bin: Path, tmp_path: Path) -> Iterator[NsqProcess]:
    """Yield a running nsqd on free ports with its data (and log) in ``tmp_path/nsqd``."""
    process = start_nsqd(tmp_path / "nsqd")
    yield process
    _stop(process)


@pytest.fixture
def nsq_cluster(nsq_bin: Path, tmp_path: Path) -> Iterator[NsqCluster]:
    """Yield an nsqlookupd and an nsqd that has registered with it."""
    lookupd = start_nsqlookupd(tmp_path / "nsqlookupd.log")
    try:
        nsqd = start_nsqd(tmp_path / "nsqd", lookupd_tcp=[lookupd.tcp])
    except BaseException:
        _stop(lookupd)
        raise
    try:
        port = int(nsqd.tcp.rpartition(":")[2])
        wait_until(
            lambda: any(node["tcp_port"] == port for node in lookupd_nodes(lookupd.http)),
            REGISTER_TIMEOUT,
            message=f"nsqd {nsqd.tcp} never registered with nsqlookupd {lookupd.http}",
        )
        yield NsqCluster(lookupd=lookupd, nsqd=nsqd)
    finally:
        try:
            _stop(nsqd)
        finally:
            _stop(lookupd)


@pytest.fixture
def topic() -> str:
    """Return a topic name no other test uses."""
    return f"t_{uuid.uuid4().hex[:10]}"
