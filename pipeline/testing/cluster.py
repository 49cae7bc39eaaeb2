"""Real NSQ for tests: an nsqd registered with an nsqlookupd, and a user's topology run under supervisord.

Everything listens on free 127.0.0.1 ports and keeps its data in a folder of
the test's; processes are stopped by pid, and checked to be gone. The pytest
fixtures of :mod:`pipeline.testing.fixtures` hand these out. Example::

    pipeline = RunningTopology(Path("topology.yaml"), tmp_path / "copy").up()
    try:
        pipeline.publish("numbers", [{"id": "a", "n": 7}])
        [record] = pipeline.read("odd", 1, timeout=30)
    finally:
        pipeline.down()
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePath
from typing import Any

import yaml

from pipeline.client import nsqd_http
from pipeline.client.nsqclient import NsqSubscriber, chunked
from pipeline.client.spread import SpreadPublisher
from pipeline.config import Topology, load_topology, split_address
from pipeline.config.security import client_security
from pipeline.errors import ProcessError
from pipeline.ops.control import START_TIMEOUT, Supervisor
from pipeline.ops.processes import (
    NsqProcess,
    consecutive_free_ports,
    free_port,
    pid_alive,
    start_nsqd,
    start_nsqlookupd,
    stop_pid,
)
from pipeline.ops.supervisor_conf import socket_path
from pipeline.records import envelope
from pipeline.records.codecs import encoder
from pipeline.records.partition import Router
from pipeline.stage import Record
from pipeline.testing.runner import body_records

REGISTER_TIMEOUT = 10.0
#: The channel :class:`RunningTopology` reads topics through, created on every topic before anything is published.
CHANNEL = "pipeline_testing"
#: The longest unix socket path the kernel takes is 107 bytes; supervisord's lives under the copy's var dir.
SOCKET_PATH_MAX = 107


@dataclass
class NsqCluster:
    """One nsqlookupd and one nsqd registered with it, on free 127.0.0.1 ports."""

    lookupd: NsqProcess
    nsqd: NsqProcess

    @classmethod
    def start(cls, root: Path) -> NsqCluster:
        """Start both, logs and data under ``root``; return once the nsqd has registered with the lookupd.

        Raises:
            ProcessError: a process does not start, or the nsqd does not register within 10 s.
        """
        lookupd = start_nsqlookupd(root / "nsqlookupd.log")
        try:
            nsqd = start_nsqd(root / "nsqd", lookupd_tcp=[_tcp(lookupd)])
        except BaseException:
            _stop(lookupd)
            raise
        cluster = cls(lookupd, nsqd)
        try:
            cluster._wait_registered()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait_registered(self) -> None:
        port, deadline = split_address(_tcp(self.nsqd))[1], time.monotonic() + REGISTER_TIMEOUT
        while True:
            try:
                nodes = json.loads(nsqd_http.request(self.lookupd.http, "/nodes", method="GET")).get("producers")
            except nsqd_http.NsqdHTTPError:
                nodes = None
            if any(node.get("tcp_port") == port for node in nodes or ()):
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"nsqd {self.nsqd.tcp} did not register with nsqlookupd {self.lookupd.http} "
                                   f"within {REGISTER_TIMEOUT:g} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the nsqd, then the lookupd.

        Raises:
            ProcessError: one of them is still running after SIGKILL.
        """
        try:
            _stop(self.nsqd)
        finally:
            _stop(self.lookupd)


def _tcp(process: NsqProcess) -> str:
    """The TCP address of an nsqd or nsqlookupd (set for both: only nsqadmin has none)."""
    if process.tcp is None:
        raise ProcessError(f"{process.name} (pid {process.pid}) has no TCP address")
    return process.tcp


def _stop(process: NsqProcess) -> None:
    process.stop()
    if process.alive():
        raise ProcessError(f"{process.name} (pid {process.pid}) survived stop()")


def copy_topology(source: Path, folder: Path, *, monitor: bool = True) -> Path:
    """Write ``source`` into ``folder`` with every address moved to a free 127.0.0.1 port; return the copy.

    The NSQ nodes, nsqadmin, the monitor, the gateway, the auth server and the
    stages' metrics ports get free ports; ``proxy_tcp`` is dropped, an absolute
    ``var_dir`` becomes ``var`` (in ``folder``), and the files the topology
    names (TLS, secrets) are given as absolute paths. Without ``monitor``, the
    monitor and the report are left out.

    Raises:
        TopologyError: ``source`` is invalid (named by its own file and line).
    """
    load_topology(source)
    doc: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    nsq = doc["nsq"]
    for node in [*nsq.get("nsqd", []), *nsq.get("lookupd", [])]:
        node.update(tcp=_free(), http=_free())
        node.pop("proxy_tcp", None)
    for section, name in ((nsq, "admin"), (doc.get("monitor"), "listen"), (doc.get("gateway"), "http"),
                          (doc.get("auth"), "http")):
        if section and section.get(name):
            section[name] = _free()
    if PurePath(nsq.get("var_dir", "var")).is_absolute():
        nsq["var_dir"] = "var"
    for stage in (doc.get("stages") or {}).values():
        if stage.get("metrics_port"):
            stage["metrics_port"] = consecutive_free_ports(stage.get("replicas", 1))
    if not monitor:
        doc.pop("monitor", None)
        doc.pop("report", None)
    for holder, name in _file_fields(doc):
        holder[name] = os.path.abspath(source.parent / holder[name])
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / source.name
    copy.write_text(f"# {source.resolve()} on free ports (pipeline.testing)\n" + yaml.safe_dump(doc, sort_keys=False),
                    encoding="utf-8")
    return copy


def _free() -> str:
    return f"127.0.0.1:{free_port()}"


def _file_fields(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """(mapping, key) of every file path in a topology document: TLS files, secret files."""
    tls = doc.get("tls") or {}
    yield from ((tls, name) for name in ("cert", "key", "root_ca_file", "client_cert", "client_key") if tls.get(name))
    secrets = [token.get("secret") or {} for token in ((doc.get("gateway") or {}).get("tokens") or {}).values()]
    secrets += ((doc.get("auth") or {}).get("secrets") or {}).values()
    yield from ((secret, "file") for secret in secrets if secret.get("file"))


@contextlib.contextmanager
def _python_path(folder: Path) -> Iterator[None]:
    """``folder`` first on PYTHONPATH while supervisord starts: its workers import the user's stages from there."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), before]))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


class RunningTopology:
    """A user's topology, copied to free ports (:func:`copy_topology`) and run under supervisord.

    The workers import their handlers from the original topology's folder, as
    they would beside it. After :meth:`up`, every declared topic and every
    dead-letter topic has the channel :data:`CHANNEL`, so :meth:`read` sees
    everything published from then on.

    Parameters:
        source: the user's topology.yaml.
        folder: where the copy, and its var dir, go (a short path: supervisord's socket lives there).
        monitor: run the topology's monitor too (False: leave it and the report out).
    """

    def __init__(self, source: Path, folder: Path, *, monitor: bool = True):
        self.source = Path(source).resolve()
        self.topology: Topology = load_topology(copy_topology(self.source, folder, monitor=monitor))
        if len(str(socket_path(self.topology))) > SOCKET_PATH_MAX:
            raise ProcessError(f"{socket_path(self.topology)} is longer than a unix socket path may be "
                               f"({SOCKET_PATH_MAX} bytes): give the copy a shorter folder")
        self.supervisor = Supervisor(self.topology)
        self._pids: set[int] = set()
        self._unread: dict[str, list[Record | bytes]] = {}

    def up(self, timeout: float = START_TIMEOUT) -> RunningTopology:
        """Start supervisord and every program; return once all run and every stage is subscribed.

        Raises:
            ProcessError: a program does not start (its last log line), or the pipeline is not ready in time.
        """
        with _python_path(self.source.parent):
            self.supervisor.up(log=lambda line: None)
        self._pids |= self._running_pids()
        topology = self.topology
        topics = [t for name in topology.topics for t in topology.physical_topics(name)]
        topics += [topology.dead_letter_topic(name) for name in topology.stages]
        for topic in topics:
            nsqd_http.create_channel_on_nodes(topology.nsqd_http_addresses(), topic, CHANNEL, patience=None)
        return self

    def _running_pids(self) -> set[int]:
        pidfile = self.topology.var_dir / "run" / "supervisord.pid"
        pids = {int(pidfile.read_text())} if pidfile.exists() else set()
        if self.supervisor.running():
            pids |= {p.pid for p in self.supervisor.processes() if p.pid}
        return pids

    def down(self) -> None:
        """Stop every program and supervisord (``pipeline down``), then make sure none of their processes is left.

        Raises:
            ProcessError: a process outlived ``down``; it has been killed since.
        """
        self._pids |= self._running_pids()
        try:
            self.supervisor.down(log=lambda line: None)
        finally:
            left = sorted(pid for pid in self._pids if pid_alive(pid))
            for pid in left:
                stop_pid(pid, grace=5.0)
        if left:
            raise ProcessError(f"processes {left} outlived `down` of {self.topology.path}; they were killed")

    def publish(self, topic: str, records: Iterable[Record | bytes]) -> int:
        """Publish ``records`` to ``topic`` as a producer does; return once nsqd acknowledged them all.

        Records are encoded with the topic's codec, packed into envelopes of its ``pack``, and routed to
        its partitions by key. A ``bytes`` item is published as it is (to the first partition).
        Returns the messages published.
        """
        topology, items = self.topology, list(records)
        router, pack = Router.of(topology, topic), topology.pack_for(topic)
        encode = encoder(topology.codec_for(topic))
        routed = router.route([r for r in items if not isinstance(r, bytes)])
        bodies = {physical: envelope.pack(part, pack) if pack > 1 else list(map(encode, part))
                  for physical, part in routed.items()}
        bodies.setdefault(router.topics[0], []).extend(r for r in items if isinstance(r, bytes))
        producer = next((name for name, p in topology.producers.items() if p.topic == topic), None)
        published = 0
        with SpreadPublisher(topology.nsqd_tcp_addresses(), security=client_security(topology, producer),
                             copies=topology.copies) as pub:
            for physical, messages in bodies.items():
                for chunk in chunked(messages, 500):
                    pub.send_mpub(physical, chunk, key=physical)
                    published += len(chunk)
            pub.flush()
        return published

    def read(self, topic: str, count: int, timeout: float = 30.0) -> list[Record | bytes]:
        """The next ``count`` records of ``topic`` (all its partitions), as a consumer decodes them.

        Envelopes give their records; an undecodable body comes as its bytes. Records
        read beyond ``count`` (the rest of an envelope) are kept for the next call.

        Raises:
            AssertionError: fewer than ``count`` came within ``timeout`` seconds (naming how many did).
        """
        unread = self._unread.setdefault(topic, [])
        deadline = time.monotonic() + timeout
        security = client_security(self.topology, "tail")
        subscribers = [NsqSubscriber(address, physical, CHANNEL, rdy=max(1, min(count, 2500)), security=security)
                       for address in self.topology.nsqd_tcp_addresses()
                       for physical in self.topology.physical_topics(topic)] if len(unread) < count else []
        try:
            while len(unread) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(unread)} of {count} records came on {topic} within {timeout:g} s")
                for sub in subscribers:
                    for message in islice(sub.messages(timeout=0.05), count - len(unread)):
                        unread += body_records(message.body)
        finally:
            for sub in subscribers:
                sub.close()  # nsqd requeues what it sent and was not read
        got, self._unread[topic] = unread[:count], unread[count:]
        return got

    def dead_letters(self, stage: str, count: int, timeout: float = 30.0) -> list[Record | bytes]:
        """The next ``count`` dead letters of ``stage`` (records with ``reason``, ``body``, ``attempts``...)."""
        return self.read(self.topology.dead_letter_topic(stage), count, timeout)
