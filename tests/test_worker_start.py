"""A worker starts consuming from the nsqd that answer while another one is SIGSTOPped.

A stopped nsqd still completes TCP handshakes (the kernel does), so a request
to it waits for its whole timeout. A worker restarted while one of several
nsqd is stopped must not wait for that node before it reads the others.
Regression fixture for the chaos soak's slow recoveries during `nsqd_stop`.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import yaml

from pipeline.client import nsqd_http
from pipeline.client.nsqclient import NsqPublisher
from pipeline.config import load_topology
from pipeline.runtime.worker import Worker

pytestmark = pytest.mark.integration

HTTP_TIMEOUT = 5.0  # nsqd_http.request's default: what a request to a stopped node waits


def _topology(tmp_path, nodes, topic: str):
    doc = {"nsq": {"nsqd": [{"name": f"n{i}", "tcp": n.tcp, "http": n.http} for i, n in enumerate(nodes)],
                   "var_dir": str(tmp_path / "var")},
           "topics": {topic: {"codec": "json"}, f"{topic}_prime": {"codec": "json"},
                      f"{topic}_non_prime": {"codec": "json"}},
           "stages": {"primes": {"handler": "consumers.primes:classify", "input": topic, "channel": "primes",
                                 "outputs": {"prime": f"{topic}_prime", "non_prime": f"{topic}_non_prime"},
                                 "replicas": 1, "batch": {"size": 10, "wait_ms": 5}}}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_topology(path)


def test_channel_creation_leaves_a_node_that_does_not_answer(nsq_factory, topic) -> None:
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    os.kill(nodes[2].pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        missed = nsqd_http.create_channel_on_nodes([n.http for n in nodes], topic, "c")
        elapsed = time.monotonic() - started
    finally:
        os.kill(nodes[2].pid, signal.SIGCONT)
    assert missed == [nodes[2].http]
    assert elapsed < HTTP_TIMEOUT / 2, f"waited {elapsed:.2f} s for the stopped node"
    for node in nodes[:2]:
        assert nsqd_http.topic_stats(node.http, topic)["channels"][0]["channel_name"] == "c"


def test_worker_consumes_from_the_nodes_that_answer_while_one_is_stopped(nsq_factory, tmp_path, topic) -> None:
    # Given three nsqd, a record waiting on each of the first two, and the third SIGSTOPped
    nodes = [nsq_factory.nsqd(f"n{i}") for i in range(3)]
    for i, node in enumerate(nodes[:2]):
        with NsqPublisher(node.tcp) as publisher:
            publisher.publish(topic, [b'{"id": "r%d", "number": %d}' % (i, 7 + i)])
    topology = _topology(tmp_path, nodes, topic)
    os.kill(nodes[2].pid, signal.SIGSTOP)

    async def run() -> tuple[float, float]:
        worker = Worker(topology, "primes")
        began = time.monotonic()
        try:
            # When the worker starts
            await worker.start()
            start_s = time.monotonic() - began
            # Then it reads both records from the two nodes that answer, the third still stopped
            while worker.stats["finished"] < 2:
                assert time.monotonic() - began < 30, f"consumed {dict(worker.stats)}"
                await asyncio.sleep(0.02)
            consumed_s = time.monotonic() - began
            # and subscribes to the third once it resumes
            os.kill(nodes[2].pid, signal.SIGCONT)
            while not ((conn := worker.reader.conns.get(nodes[2].tcp)) and conn.connected() and conn.last_rdy):
                assert time.monotonic() - began < 60, "never subscribed to the resumed nsqd"
                await asyncio.sleep(0.02)
            return start_s, consumed_s
        finally:
            os.kill(nodes[2].pid, signal.SIGCONT)
            await worker.drain()

    start_s, consumed_s = asyncio.run(run())
    assert start_s < HTTP_TIMEOUT / 2, f"start() took {start_s:.2f} s: it waited for the stopped nsqd"
    assert consumed_s < HTTP_TIMEOUT, f"consumed after {consumed_s:.2f} s"
