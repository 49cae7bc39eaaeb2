"""NSQ's ``/stats`` as Prometheus metrics, what the community nsq_exporter does, in the monitor.

:func:`discover_nsqd` finds the nsqd nodes through the lookupds (and keeps the
ones the topology lists); :func:`channel_rows` flattens one ``/stats``
document into :class:`~pipeline.observe.healthdb.ChannelSample` rows;
:class:`NsqCollector` fetches ``/stats`` of every node at scrape time and
yields the metrics (names follow nsq_exporter's, with a ``nsqd`` label):
``nsq_topic_depth``, ``nsq_channel_depth``, ``nsq_channel_in_flight``, ...
"""
from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.client import nsqd_http
from pipeline.observe.healthdb import ChannelSample

log = logging.getLogger(__name__)

# (metric suffix, stats key, kind, help) for topics and channels alike
FIELDS = [
    ("depth", "depth", "gauge", "Messages queued (memory and disk)."),
    ("backend_depth", "backend_depth", "gauge", "Messages queued on disk."),
    ("message_count", "message_count", "counter", "Messages received since nsqd started."),
]
CHANNEL_FIELDS = [
    ("in_flight", "in_flight_count", "gauge", "Messages sent to clients and not yet answered."),
    ("deferred", "deferred_count", "gauge", "Messages requeued with a delay, not yet due."),
    ("requeue_count", "requeue_count", "counter", "Messages requeued by clients."),
    ("timeout_count", "timeout_count", "counter", "Messages that timed out in flight."),
    ("clients", "client_count", "gauge", "Connected clients."),
]


@dataclass(frozen=True)
class NsqdNode:
    """One nsqd the monitor samples."""

    name: str
    http: str


def discover_nsqd(topology, timeout: float = 2.0) -> list[NsqdNode]:
    """The nsqd nodes registered with any lookupd, plus the ones the topology lists."""
    nodes = {n.http: NsqdNode(n.name, n.http) for n in topology.nsq.nsqd}
    for lookupd in topology.lookupd_http_addresses():
        try:
            with _LOCAL.open(f"http://{lookupd}/nodes", timeout=timeout) as resp:
                producers = json.load(resp).get("producers") or []
        except (OSError, ValueError) as e:
            log.warning("lookupd %s: %s", lookupd, e)
            continue
        for p in producers:
            http = f"{p['broadcast_address']}:{p['http_port']}"
            nodes.setdefault(http, NsqdNode(f"{p.get('hostname', p['broadcast_address'])}:{p['http_port']}", http))
    return list(nodes.values())


_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_stats(node: NsqdNode) -> dict[str, Any] | None:
    """``/stats?format=json`` of ``node``, or None when it does not answer."""
    try:
        return nsqd_http.stats(node.http)
    except nsqd_http.NsqdHTTPError as e:
        log.warning("nsqd %s: %s", node.http, e)
        return None


def _p99(stats: dict) -> float | None:
    """The 0.99 end-to-end processing latency in seconds, when nsqd computes percentiles."""
    for p in (stats.get("e2e_processing_latency") or {}).get("percentiles") or []:
        if abs(float(p["quantile"]) - 0.99) < 1e-9:
            return float(p["value"]) / 1e9
    return None


def channel_rows(ts: float, node: NsqdNode, stats: dict) -> list[ChannelSample]:
    """One row per topic (channel ``""``) and per channel of one ``/stats`` document."""
    rows = []
    for t in stats.get("topics") or []:
        rows.append(ChannelSample(ts, node.name, t["topic_name"], "", t["depth"], t["backend_depth"], 0, 0, 0, 0,
                                  t["message_count"], 0, _p99(t)))
        for c in t.get("channels") or []:
            rows.append(ChannelSample(ts, node.name, t["topic_name"], c["channel_name"], c["depth"],
                                      c["backend_depth"], c["in_flight_count"], c["deferred_count"],
                                      c["requeue_count"], c["timeout_count"], c["message_count"],
                                      int(c.get("client_count", len(c.get("clients") or []))), _p99(c)))
    return rows


class NsqCollector(Collector):
    """Yields NSQ metrics from a fresh ``/stats`` of every nsqd at each scrape.

    Parameters:
        nodes: a callable returning the nsqd nodes to scrape (re-discovered per scrape).
    """

    def __init__(self, nodes):
        self.nodes = nodes

    def collect(self) -> Iterable[Any]:
        families = self._families()
        health = GaugeMetricFamily("nsqd_up", "1 when nsqd answered /stats and reports health OK.",
                                   labels=["nsqd"])
        for node in self.nodes():
            stats = fetch_stats(node)
            health.add_metric([node.name], 1.0 if stats and stats.get("health") == "OK" else 0.0)
            for t in (stats or {}).get("topics") or []:
                self._add(families, "topic", [node.name, t["topic_name"]], t, FIELDS)
                self._add_e2e(families["topic_e2e"], [node.name, t["topic_name"]], t)
                for c in t.get("channels") or []:
                    labels = [node.name, t["topic_name"], c["channel_name"]]
                    c = {**c, "client_count": c.get("client_count", len(c.get("clients") or []))}
                    self._add(families, "channel", labels, c, FIELDS + CHANNEL_FIELDS)
                    self._add_e2e(families["channel_e2e"], labels, c)
        yield health
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, Any]:
        families: dict[str, Any] = {}
        for level, labels, fields in (("topic", ["nsqd", "topic"], FIELDS),
                                      ("channel", ["nsqd", "topic", "channel"], FIELDS + CHANNEL_FIELDS)):
            for suffix, _, kind, doc in fields:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                families[f"{level}_{suffix}"] = cls(f"nsq_{level}_{suffix}", doc, labels=labels)
            families[f"{level}_e2e"] = GaugeMetricFamily(
                f"nsq_{level}_e2e_processing_latency_seconds",
                "End-to-end processing latency percentile computed by nsqd (--e2e-processing-latency-percentile).",
                labels=[*labels, "quantile"])
        return families

    @staticmethod
    def _add(families: dict, level: str, labels: list[str], stats: dict, fields) -> None:
        for suffix, key, _, _ in fields:
            families[f"{level}_{suffix}"].add_metric(labels, float(stats.get(key) or 0))

    @staticmethod
    def _add_e2e(family, labels: list[str], stats: dict) -> None:
        for p in (stats.get("e2e_processing_latency") or {}).get("percentiles") or []:
            family.add_metric([*labels, str(p["quantile"])], float(p["value"]) / 1e9)
