"""Several nsqd behind several nsqlookupd: spreading, node loss and return, discovery without one lookupd.

The integration test runs 3 nsqd and 2 nsqlookupd on free 127.0.0.1 ports,
two `primes` workers as subprocesses that find the nodes through the
lookupds, and the numbers producer spreading 100,000 records over the nodes.
Mid-run one nsqd is stopped with SIGTERM (its queue is persisted) and one
lookupd is SIGKILLed; the nsqd is started again 10 s later on the same ports
and data dir. Every id must come out of the stage, and the workers must have
consumed from all three nodes, the returned one included.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict

import pytest
import yaml

from harness import Workers
from nsqhttp import channel_stats, lookupd_nodes, wait_until
from pipeline.client import nsqd_http
from pipeline.records.codecs import decode
from pipeline.errors import PublishError, TopologyError
from pipeline.client.nsqclient import NsqSubscriber
from pipeline.ops.processes import free_port
from pipeline.config import load_topology
from producers.numbers import produce_numbers

COUNT = 100_000
NETNS_COUNT = 30_000  # the same scenario across network namespaces, shorter
CHANNEL = "primes"
CHECK = "check"
DOWN_FOR = 10.0  # seconds the stopped nsqd stays down


def write_topology(tmp_path, nodes, lookupds, topic: str, **nsq) -> tuple:
    outputs = {"prime": f"{topic}_prime", "non_prime": f"{topic}_non_prime"}
    doc = {
        "nsq": {"nsqd": [{"name": n.name, "tcp": n.tcp, "http": n.http} for n in nodes],
                "lookupd": [{"tcp": lk.tcp, "http": lk.http} for lk in lookupds],
                "var_dir": str(tmp_path / "var"), **nsq},
        "topics": {topic: {}, outputs["prime"]: {}, outputs["non_prime"]: {"codec": "msgpack"}},
        "stages": {"primes": {"handler": "stages_for_tests:throttled_classify", "input": topic, "channel": CHANNEL,
                              "outputs": outputs, "replicas": 2, "max_in_flight": 200,
                              "batch": {"size": 100, "wait_ms": 5}}},
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, list(outputs.values())


def test_lookupd_poll_interval_is_a_topology_setting_the_worker_uses(tmp_path):
    from pipeline.runtime.worker import Worker

    class Node:
        def __init__(self, i):
            self.name, self.tcp, self.http = f"n{i}", f"127.0.0.1:{4000 + i}", f"127.0.0.1:{4100 + i}"

    path, _ = write_topology(tmp_path, [Node(0), Node(1)], [Node(2)], "t", lookupd_poll_interval=2)
    worker = Worker(load_topology(path), "primes")
    assert worker._discovery() == {"lookupd_http_addresses": ["127.0.0.1:4102"], "lookupd_poll_interval": 2,
                                   "nsqd_tcp_addresses": ["127.0.0.1:4000", "127.0.0.1:4001"]}
    path, _ = write_topology(tmp_path, [Node(0)], [Node(2)], "t", lookupd_poll_interval=0)
    with pytest.raises(TopologyError, match=r"topology.yaml:\d+:\d+: nsq.lookupd_poll_interval: must be >= 1"):
        load_topology(path)


class Collector:
    """Reads the stage's outputs on every node, reconnecting to nodes that come and go."""

    def __init__(self, nodes, topics):
        self.targets = [(n, t) for n in nodes for t in topics]
        self.subs: dict[tuple[str, str], NsqSubscriber] = {}
        self.ids: set[str] = set()
        self.received = 0

    def poll(self) -> None:
        for node, topic in self.targets:
            key = (node.tcp, topic)
            try:
                if key not in self.subs:
                    self.subs[key] = NsqSubscriber(node.tcp, topic, CHECK, timeout=1.0)
                for message in self.subs[key].messages(timeout=0.02):
                    self.ids.add(decode(message.body)["id"])
                    self.received += 1
            except PublishError:  # the node is down: try again on the next poll
                sub = self.subs.pop(key, None)
                if sub is not None:
                    sub.close()

    def close(self) -> None:
        for sub in self.subs.values():
            sub.close()


class Consumption:
    """Messages the workers finished per nsqd, from each node's /stats (each client's finish_count)."""

    def __init__(self, nodes, topic):
        self.nodes, self.topic = nodes, topic
        self.finished: dict[str, dict[tuple, int]] = defaultdict(dict)
        self.last = 0.0

    def sample(self, every: float = 0.3) -> None:
        if time.monotonic() - self.last < every:
            return
        self.last = time.monotonic()
        for node in self.nodes:
            try:
                stats = channel_stats(node.http, self.topic, CHANNEL)
            except OSError:
                continue
            for client in (stats or {}).get("clients") or []:
                key = (client["remote_address"], client["connect_ts"])
                self.finished[node.name][key] = max(self.finished[node.name].get(key, 0), client["finish_count"])

    def per_node(self, since: int = 0) -> dict[str, int]:
        return {n.name: sum(c for (_, ts), c in self.finished[n.name].items() if ts >= since) for n in self.nodes}


class Loopback:
    """The scenario's processes on 127.0.0.1, free ports."""

    label = "loopback"

    def __init__(self, factory):
        self.factory = factory

    def lookupd(self, i: int):
        return self.factory.lookupd(f"nsqlookupd-{i}")

    def nsqd(self, i: int, registry: list[str]):
        return self.factory.nsqd(f"n{i}", lookupd_tcp=registry)

    def restart(self, process, registry: list[str]):
        return self.factory.restart(process, lookupd_tcp=registry)


@pytest.mark.integration
def test_three_nsqd_two_lookupd_lose_a_node_and_a_lookupd_and_deliver_every_id(nsq_factory, tmp_path, topic):
    node_loss_scenario(Loopback(nsq_factory), tmp_path, topic, COUNT)


def node_loss_scenario(cluster, tmp_path, topic: str, count: int) -> None:
    """3 nsqd, 2 lookupds, 2 workers; ``count`` numbers; one nsqd down for 10 s and one lookupd killed."""
    # Given: 2 lookupds, 3 nsqd registered with both, two workers discovering the nodes through the lookupds.
    lookupds = [cluster.lookupd(i) for i in range(2)]
    registry = [lk.tcp for lk in lookupds]
    nodes = [cluster.nsqd(i, registry) for i in range(3)]
    for lk in lookupds:
        wait_until(lambda: len(lookupd_nodes(lk.http)) == 3, 10.0, message=f"nodes never all registered with {lk.http}")
    path, outputs = write_topology(tmp_path, nodes, lookupds, topic, lookupd_poll_interval=1)
    for node in nodes:
        for out in outputs:
            nsqd_http.create_channel(node.http, out, CHECK)
    workers = Workers(path)
    collector, consumption = Collector(nodes, outputs), Consumption(nodes, topic)
    try:
        for replica in range(2):
            workers.start(replica)
        for node in nodes:
            workers.wait_subscribed(node.http, topic, 2)
        victim = nodes[1]

        # When: the producer spreads the numbers over the nodes; at 30% acknowledged the
        # victim nsqd gets SIGTERM and lookupd 0 SIGKILL; the victim returns 10 s later.
        progress: list[int] = []
        produced: dict[str, object] = {}

        def produce() -> None:
            try:
                produced["acked"] = produce_numbers([n.tcp for n in nodes], topic, 1, count, rate=20_000,
                                                    chunk=250, run_id="mn", on_progress=progress.append)
            except Exception as e:  # reported by the assertion below
                produced["error"] = e

        producer = threading.Thread(target=produce)
        producer.start()
        wait_until(lambda: progress and progress[-1] >= count * 0.3, 30.0, message="producer made no progress")
        consumption.sample(every=0)
        backlog = channel_stats(victim.http, topic, CHANNEL)
        victim.stop()
        os.kill(lookupds[0].pid, signal.SIGKILL)
        lookupds[0].stop()
        stopped_at = time.monotonic()
        while time.monotonic() - stopped_at < DOWN_FOR:  # the node stays down; meanwhile outputs are read
            collector.poll()
            consumption.sample()
        returned_at = int(time.time())
        restarted = cluster.restart(victim, registry)
        consumption.nodes = [restarted if n is victim else n for n in nodes]
        collector.targets = [(restarted if n is victim else n, t) for n, t in collector.targets]

        deadline = time.monotonic() + 60.0
        while len(collector.ids) < count and time.monotonic() < deadline:
            collector.poll()
            consumption.sample()
        producer.join(10.0)
        consumption.sample(every=0)
    finally:
        collector.close()
        workers.stop_all()

    # Then: every id came out, the producer counted each record once, and every node was consumed from.
    assert "error" not in produced and produced.get("acked") == count, produced
    missing = count - len(collector.ids)
    assert missing == 0, f"{missing} ids never delivered; workers:\n{workers.log_tail()}"
    assert collector.ids == {f"mn-{n}" for n in range(1, count + 1)}
    per_node, after_return = consumption.per_node(), consumption.per_node(since=returned_at)
    backlog_at_stop = backlog["depth"] + backlog["in_flight_count"]
    print(f"\n[{cluster.label}] {count} numbers; consumed per node: {per_node}; "
          f"from {victim.name} after its return: {after_return[victim.name]}; "
          f"its backlog at SIGTERM: {backlog_at_stop}; outputs received: {collector.received} "
          f"({collector.received - count} duplicates)")
    assert all(n > 0 for n in per_node.values()), per_node
    assert backlog_at_stop > 0, "the stopped node had nothing queued; the test proves nothing about persistence"
    assert after_return[victim.name] > 0, "nothing was consumed from the node after it returned"


class Netns:
    """Each nsqd on its own test host: a network namespace joined to this one by a veth pair.

    Node k lives at 10.X.Y.(4k+2) in namespace ``<prefix>k``; this side of its
    link is 10.X.Y.(4k+1). The lookupds, workers and producer stay here; the
    lookupds listen on the first link's address, which every namespace reaches
    through its default route (a local address of this namespace).
    """

    label = "netns"

    def __init__(self, factory):
        self.factory = factory
        self.prefix = f"mn{os.getpid() % 100000}x"
        self.net = self._free_net()
        self.namespaces: list[str] = []

    @staticmethod
    def _free_net() -> str:
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        for _ in range(50):
            net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
            if f" {net}." not in used:
                return net
        raise AssertionError("no free 10.x.y.0/24 for the test hosts")

    @classmethod
    def unavailable(cls) -> str | None:
        """Why namespaces cannot be used here, or None when they can."""
        if shutil.which("ip") is None:
            return "the ip command (iproute2) is not installed"
        name = f"mnprobe{os.getpid() % 100000}"
        added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if added.returncode != 0:
            return f"ip netns is not permitted here: {added.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return None

    def _ip(self, *args: str, namespace: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)

    def host(self, k: int) -> tuple[str, str]:
        """Create test host k (once); return (its address, this side's address)."""
        ns, here, there = f"{self.prefix}{k}", f"{self.net}.{4 * k + 1}", f"{self.net}.{4 * k + 2}"
        if ns not in self.namespaces:
            self._ip("netns", "add", ns)
            self.namespaces.append(ns)
            self._ip("link", "add", f"{ns}a", "type", "veth", "peer", "name", f"{ns}b")
            self._ip("link", "set", f"{ns}b", "netns", ns)
            self._ip("addr", "add", f"{here}/30", "dev", f"{ns}a")
            self._ip("link", "set", f"{ns}a", "up")
            for args in (("addr", "add", f"{there}/30", "dev", f"{ns}b"), ("link", "set", f"{ns}b", "up"),
                         ("link", "set", "lo", "up"), ("route", "add", "default", "via", here)):
                self._ip(*args, namespace=ns)
        return there, here

    def lookupd(self, i: int):
        _, here = self.host(0)
        return self.factory.lookupd(f"nsqlookupd-{i}", tcp=f"{here}:{free_port()}", http=f"{here}:{free_port()}")

    def nsqd(self, i: int, registry: list[str]):
        there, _ = self.host(i)
        return self.factory.nsqd(f"n{i}", lookupd_tcp=registry, tcp=f"{there}:4150", http=f"{there}:4151",
                                 extra=[f"--broadcast-address={there}"],
                                 prefix=["ip", "netns", "exec", f"{self.prefix}{i}"])

    def restart(self, process, registry: list[str]):
        return self.factory.restart(process, lookupd_tcp=registry)

    def close(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.integration
def test_the_node_loss_scenario_with_each_nsqd_on_its_own_test_host(nsq_factory, tmp_path, topic):
    why = Netns.unavailable()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    hosts = Netns(nsq_factory)
    try:
        node_loss_scenario(hosts, tmp_path, topic, NETNS_COUNT)
    finally:
        nsq_factory.stop_all()  # before the namespaces go (stop_all again at teardown is a no-op)
        hosts.close()


@pytest.mark.integration
def test_status_shows_each_nodes_health_and_registration(nsq_factory, tmp_path, topic):
    from io import StringIO

    from rich.console import Console

    from pipeline.observe.status import collect
    from pipeline.observe.views import print_status

    # Given: 2 lookupds and 2 nsqd registered with both; then one nsqd and one lookupd are stopped.
    lookupds = [nsq_factory.lookupd(f"nsqlookupd-{i}") for i in range(2)]
    nodes = [nsq_factory.nsqd(f"n{i}", lookupd_tcp=[lk.tcp for lk in lookupds]) for i in range(2)]
    path, _ = write_topology(tmp_path, nodes, lookupds, topic)
    nsqd_http.create_channel(nodes[0].http, topic, CHANNEL)
    report = collect(load_topology(path), interval=0.0)
    assert [(n.name, n.health, n.lookupds) for n in report.nsqd] == [("n0", "OK", 2), ("n1", "OK", 2)]
    nodes[1].stop()
    lookupds[1].stop()
    # When: status is collected. Then: the lost nsqd and lookupd are unreachable, n0 is listed by 1 of 2.
    wait_until(lambda: len(lookupd_nodes(lookupds[0].http)) == 1, 10.0, message="n1 never unregistered")
    report = collect(load_topology(path), interval=0.0)
    assert [(n.name, n.health, n.lookupds) for n in report.nsqd] == [("n0", "OK", 1), ("n1", "unreachable", 0)]
    assert [(lk.health, lk.nodes) for lk in report.lookupd] == [("OK", 1), ("unreachable", 0)]
    assert not report.healthy and report.to_dict()["lookupd"][1]["health"] == "unreachable"
    out = StringIO()
    print_status(report, Console(file=out, width=200))
    assert "nsqlookupd" in out.getvalue() and "1/2" in out.getvalue() and "unreachable" in out.getvalue()


@pytest.mark.integration
def test_a_worker_starts_while_a_node_is_down_and_consumes_from_it_once_it_is_up(nsq_factory, tmp_path, topic):
    # Given: two nsqd in the topology, n1 down when the worker starts.
    lookupd = nsq_factory.lookupd()
    up, down = (nsq_factory.nsqd(f"n{i}", lookupd_tcp=[lookupd.tcp]) for i in range(2))
    down.stop()
    path, outputs = write_topology(tmp_path, [up, down], [lookupd], topic, lookupd_poll_interval=1)
    for out in outputs:
        nsqd_http.create_channel(up.http, out, CHECK)
    workers = Workers(path)
    collector = None
    try:
        workers.start(0)
        workers.wait_subscribed(up.http, topic, 1)
        # When: n1 comes up and records are published to it alone.
        back = nsq_factory.restart(down, lookupd_tcp=[lookupd.tcp])
        for out in outputs:
            nsqd_http.create_channel(back.http, out, CHECK)
        assert produce_numbers([back.tcp], topic, 1, 1000, run_id="late") == 1000
        # Then: the worker found n1 through the lookupd and classified every record.
        collector = Collector([up, back], outputs)
        wait_until(lambda: collector.poll() or len(collector.ids) == 1000, 30.0,
                   message="records published to the late node were not consumed")
    finally:
        if collector is not None:
            collector.close()
        workers.stop_all()
    assert collector.ids == {f"late-{n}" for n in range(1, 1001)}
