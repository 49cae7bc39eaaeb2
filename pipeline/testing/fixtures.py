"""pytest fixtures for a project's own stages: the pytest plugin ``pipeline``, registered by an entry point.

Installing nsq-pipeline gives every test suite of the environment these fixtures:

- ``nsq_bin`` (session): the folder of the NSQ binaries, installed on first use (``pipeline install-nsq``);
- ``nsq_cluster``: an :class:`~pipeline.testing.cluster.NsqCluster`, an nsqd registered with an
  nsqlookupd on free ports, stopped after the test;
- ``running_topology``: a factory: ``running_topology("topology.yaml")`` runs a copy of the topology on
  free ports under supervisord and returns its :class:`~pipeline.testing.cluster.RunningTopology`;
  everything it started is stopped after the test, and checked to be gone.

Example::

    def test_odd_numbers_come_out_odd(running_topology):
        pipeline = running_topology("topology.yaml", monitor=False)
        pipeline.publish("numbers", [{"id": "a", "n": 7}])
        assert pipeline.read("odd", 1) == [{"id": "a", "n": 7, "even": False}]

A plugin is imported by every pytest run of the environment, so the framework is
imported only when a fixture is used.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.testing.cluster import NsqCluster, RunningTopology

#: A test's tmp_path up to this long holds the topology's copy; supervisord's socket path must stay short.
SHORT_PATH = 60


@pytest.fixture(scope="session")
def nsq_bin() -> Path:
    """The folder holding nsqd and nsqlookupd, installed there first if they are not (the venv's bin)."""
    from pipeline.ops.install import install_nsq

    return install_nsq(log=lambda line: None)


@pytest.fixture
def nsq_cluster(nsq_bin: Path, tmp_path: Path) -> Iterator[NsqCluster]:
    """An nsqd registered with an nsqlookupd, on free 127.0.0.1 ports, data under ``tmp_path``; stopped after."""
    from pipeline.testing.cluster import NsqCluster

    cluster = NsqCluster.start(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def running_topology(nsq_bin: Path, tmp_path: Path) -> Iterator[Callable[..., RunningTopology]]:
    """A factory running a topology file (a path relative to the current folder) on free ports until the test ends.

    ``running_topology(path, monitor=True, timeout=90)`` returns once every program
    runs and every stage is subscribed; ``monitor=False`` leaves the monitor out.
    """
    from pipeline.testing.cluster import RunningTopology

    started: list[RunningTopology] = []
    made: list[Path] = []

    def start(path: str | os.PathLike[str], *, monitor: bool = True, timeout: float = 90.0) -> RunningTopology:
        if len(str(tmp_path)) <= SHORT_PATH:
            folder = tmp_path / f"topology-{len(started)}"
        else:
            folder = Path(tempfile.mkdtemp(prefix="np-"))
            made.append(folder)
        running = RunningTopology(Path(os.path.abspath(path)), folder, monitor=monitor)
        started.append(running)
        return running.up(timeout)

    try:
        yield start
    finally:
        _down_all(started)
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def _down_all(started: list[RunningTopology]) -> None:
    """Take every topology down, the last started first; raise the first failure after trying them all."""
    failures: list[BaseException] = []
    for running in reversed(started):
        try:
            running.down()
        except Exception as e:  # the others must come down too
            failures.append(e)
    if failures:
        raise failures[0]
