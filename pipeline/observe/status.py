"""``pipeline status``: processes from supervisord, topics and channels from nsqd.

The report is a plain dataclass tree so ``--json`` and the table show the same
facts. Rates come from two ``/stats`` samples taken ``interval`` seconds apart.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from pipeline.client import nsqd_http
from pipeline.config import split_address
from pipeline.ops.control import Supervisor
from pipeline.ops.restarter import read_restarts


@dataclass
class ProcessRow:
    """One supervised process."""

    name: str
    state: str
    pid: int
    uptime_s: float
    restarts: int


@dataclass
class ChannelRow:
    """One topic/channel (channel ``""`` for the topic itself) on one nsqd."""

    nsqd: str
    topic: str
    channel: str
    depth: int
    in_flight: int
    deferred: int
    requeued: int
    timed_out: int
    clients: int
    messages: int
    rate: float


@dataclass
class NsqdRow:
    """One nsqd's health, and how many lookupds list it (consumers find it only through them)."""

    name: str
    http: str
    health: str
    lookupds: int = 0  # lookupds that list this node as a producer
    depth: int = 0  # messages queued on the node, every topic and channel
    clients: int = 0  # consumer connections


@dataclass
class LookupdRow:
    """One nsqlookupd's health and the nsqd nodes registered with it."""

    http: str
    health: str
    nodes: int


@dataclass
class ReplicationRow:
    """A replicated topic: the copies it asks for and how many new messages get with the nodes up now."""

    topic: str
    copies: int
    nsqd_up: int
    nsqd: int

    @property
    def getting(self) -> int:
        """Copies a message published now gets: one per node up, at most ``copies``."""
        return min(self.copies, self.nsqd_up)

    @property
    def state(self) -> str:
        if self.getting == self.copies:
            down = self.nsqd - self.nsqd_up
            return "ok" if not down else f"ok: {down} nsqd down, the copies go to the others"
        if self.getting == 0:
            return "down: no nsqd answers"
        return (f"degraded: {self.nsqd_up} of {self.nsqd} nsqd up, new messages get {self.getting} of {self.copies}"
                " copies (counted as copies_missing by the workers, logged by every publisher)")


@dataclass
class Status:
    """Everything ``pipeline status`` reports, and whether the pipeline is healthy."""

    supervisord: bool
    processes: list[ProcessRow] = field(default_factory=list)
    nsqd: list[NsqdRow] = field(default_factory=list)
    channels: list[ChannelRow] = field(default_factory=list)
    lookupd: list[LookupdRow] = field(default_factory=list)
    replication: list[ReplicationRow] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when supervisord runs, every process is RUNNING, every nsqd says OK and every lookupd answers."""
        return (self.supervisord and all(p.state == "RUNNING" for p in self.processes)
                and all(n.health == "OK" for n in self.nsqd) and all(lk.health == "OK" for lk in self.lookupd))

    def to_dict(self) -> dict:
        """The report as plain data, for ``--json``."""
        data = {"healthy": self.healthy, **asdict(self)}
        for row, plain in zip(self.replication, data["replication"], strict=True):
            plain.update(getting=row.getting, state=row.state)
        return data


def collect(topology, interval: float = 1.0) -> Status:
    """Gather the status of ``topology``'s processes and nsqd nodes."""
    supervisor = Supervisor(topology)
    status = Status(supervisord=supervisor.running())
    if status.supervisord:
        restarts = read_restarts(topology.var_dir / "log" / "restarts.json")
        status.processes = [ProcessRow(p.name, p.state, p.pid, round(p.uptime, 1),
                                       int((restarts.get(p.full_name) or {}).get("restarts", 0)))
                            for p in supervisor.processes()]
    first = {n.name: _stats(n.http) for n in topology.nsq.nsqd}
    started = time.monotonic()
    time.sleep(interval)  # the rate is a difference of two samples, not synchronisation
    elapsed = time.monotonic() - started
    registered: list[set[tuple[str, int]]] = []
    for lookupd in topology.nsq.lookupd:
        nodes = _lookupd_nodes(lookupd.http)
        status.lookupd.append(LookupdRow(lookupd.http, "unreachable" if nodes is None else "OK", len(nodes or ())))
        registered.append(nodes or set())
    for n in topology.nsq.nsqd:
        second = _stats(n.http)
        rows = _rows(n.name, first.get(n.name) or {}, second or {}, elapsed)
        status.nsqd.append(NsqdRow(
            n.name, n.http, second.get("health", "unreachable") if second else "unreachable",
            lookupds=sum(split_address(n.tcp) in nodes for nodes in registered),
            depth=sum(r.depth for r in rows if r.channel), clients=sum(r.clients for r in rows)))
        status.channels += rows
    up = sum(n.health == "OK" for n in status.nsqd)
    status.replication = [ReplicationRow(name, spec.replication, up, len(status.nsqd))
                          for name, spec in topology.topics.items() if spec.replication > 1]
    return status


def _lookupd_nodes(http: str) -> set[tuple[str, int]] | None:
    """The (broadcast address, TCP port) of every nsqd registered with the lookupd; None if it does not answer."""
    try:
        producers = json.loads(nsqd_http.request(http, "/nodes", method="GET")).get("producers") or []
    except (nsqd_http.NsqdHTTPError, ValueError):
        return None
    return {(p["broadcast_address"], int(p["tcp_port"])) for p in producers}


def _stats(http: str) -> dict | None:
    try:
        return nsqd_http.stats(http)
    except nsqd_http.NsqdHTTPError:
        return None


def _rows(node: str, before: dict, after: dict, elapsed: float) -> list[ChannelRow]:
    counts = {(t["topic_name"], c["channel_name"]): c["message_count"]
              for t in before.get("topics") or [] for c in t.get("channels") or []}
    counts.update({(t["topic_name"], ""): t["message_count"] for t in before.get("topics") or []})
    rows = []
    for t in after.get("topics") or []:
        for c in [None, *(t.get("channels") or [])]:
            s = t if c is None else c
            key = (t["topic_name"], "" if c is None else c["channel_name"])
            rate = (s["message_count"] - counts.get(key, s["message_count"])) / elapsed if elapsed else 0.0
            rows.append(ChannelRow(node, key[0], key[1], s["depth"], s.get("in_flight_count", 0),
                                   s.get("deferred_count", 0), s.get("requeue_count", 0), s.get("timeout_count", 0),
                                   len(s.get("clients") or []), s["message_count"], round(rate, 1)))
    return rows
