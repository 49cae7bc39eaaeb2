"""Single-message ``/pub`` throughput of ``pipeline gateway`` over keep-alive connections.

The rule:

1. a fresh nsqd, and :data:`PROCESSES` ``pipeline gateway`` processes sharing
   one port (SO_REUSEPORT) in front of it, with one bearer token (no rate
   limit) that may publish to the topic ``gw``;
2. :data:`CONNECTIONS` keep-alive HTTP/1.1 connections, each keeping
   :data:`DEPTH` requests pipelined, send N ``POST /pub?topic=gw`` requests of one
   JSON record each (the same bytes as the drain contenders' records) from an
   asyncio client in this process;
3. the clock runs from the first request sent to the last ``200 OK`` read;
   the gateway answers only after nsqd acknowledged the message, so every 200
   is a message in nsqd. Afterwards nsqd's message count on ``gw`` must be N
   and every answer a 200, else the run fails.

Figures: messages/s, the gateway processes' CPU per million messages and their largest peak RSS.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pipeline import nsqd_http
from pipeline.codecs import encode_json
from pipeline.processes import free_port, start_process

from .broker import BenchError, Broker
from .drain import MEM_QUEUE_SIZE
from .procstat import cpu_seconds, peak_rss_mb

TOPIC = "gw"
BASE_COUNT = 200_000  # at scale 1: ten seconds at the 20,000 msg/s target
CONNECTIONS = 8
PROCESSES = 2  # one per core of the project's machine
DEPTH = 16  # pipelined requests in flight per connection
TOKEN_ENV = "NSQ_BENCH_GATEWAY_TOKEN"
TOKEN = "bench-" + "t" * 32
RUN_TIMEOUT = 300.0
TARGET = 20_000


@dataclass
class GatewaySample:
    """One run's figures."""

    records: int
    seconds: float
    records_per_s: float
    cpu_s_per_million: float
    peak_rss_mb: float
    nsqd_cpu_s_per_million: float
    connections: int
    depth: int
    processes: int

    def to_dict(self) -> dict:
        return asdict(self)


def write_topology(path: Path, broker: Broker) -> Path:
    """A topology with the bench topic and a gateway on a free port in front of ``broker``."""
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": broker.tcp, "http": broker.process.http}],
                "var_dir": str(path.parent / "var")},
        "topics": {TOPIC: {"codec": "json"}},
        "gateway": {"http": f"127.0.0.1:{free_port()}", "processes": PROCESSES,
                    "tokens": {"bench": {"secret": {"env": TOKEN_ENV}, "topics": [TOPIC]}}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def request_bytes(address: str, body: bytes) -> bytes:
    """One keep-alive ``POST /pub`` request, ready to write."""
    return (f"POST /pub?topic={TOPIC} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _connection(address: str, requests: list[bytes], depth: int) -> int:
    """Send ``requests`` on one connection, ``depth`` at a time; return how many were answered 200."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    ok = sent = answered = 0
    try:
        while answered < len(requests):
            while sent < len(requests) and sent - answered < depth:
                writer.write(requests[sent])
                sent += 1
            await writer.drain()
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            ok += status.startswith(b"HTTP/1.1 200")
            answered += 1
    finally:
        writer.close()
    return ok


async def _load(address: str, bodies: list[bytes], connections: int, depth: int) -> int:
    shares = [bodies[i::connections] for i in range(connections)]
    results = await asyncio.gather(*(_connection(address, [request_bytes(address, b) for b in share], depth)
                                     for share in shares if share))
    return sum(results)


def _run_load(address: str, bodies: list[bytes], connections: int, depth: int) -> int:
    # A private loop, not asyncio.run(): that would leave this thread without a current loop
    # for whatever runs next in the process (tornado code that asks for one, e.g. in the test suite).
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(_load(address, bodies, connections, depth), RUN_TIMEOUT))
    finally:
        loop.close()


def gateway_once(workdir: Path, count: int, connections: int = CONNECTIONS, depth: int = DEPTH) -> dict:
    """Run the gateway figure once with ``count`` messages; return its sample as a dict.

    Raises:
        BenchError: an answer was not 200, or nsqd does not hold exactly ``count`` messages after.
    """
    bodies = [encode_json({"id": f"bench-{n}", "ts": 0, "number": n}) for n in range(1, count + 1)]
    broker = Broker.start(workdir / "nsqd", MEM_QUEUE_SIZE)
    gateways = []
    try:
        nsqd_http.create_topic(broker.process.http, TOPIC)
        topology = write_topology(workdir / "topology.yaml", broker)
        address = yaml.safe_load(topology.read_text())["gateway"]["http"]
        os.environ[TOKEN_ENV] = TOKEN
        try:
            for k in range(PROCESSES):  # each is up once it listens (it connects to nsqd first)
                gateways.append(start_process(
                    f"gateway-{k}", [sys.executable, "-m", "pipeline.cli", "gateway", "-t", str(topology)],
                    http=address, log_path=workdir / f"gateway-{k}.log", ping_timeout=30))
        finally:
            del os.environ[TOKEN_ENV]
        pids = [g.pid for g in gateways]
        cpu0, nsqd0, start = sum(map(cpu_seconds, pids)), cpu_seconds(broker.pid), time.perf_counter()
        ok = _run_load(address, bodies, connections, depth)
        seconds = time.perf_counter() - start
        cpu, nsqd_cpu = sum(map(cpu_seconds, pids)) - cpu0, cpu_seconds(broker.pid) - nsqd0
        rss = max(map(peak_rss_mb, pids))
        landed = nsqd_http.topic_message_count(broker.process.http, TOPIC)
        if ok != count or landed != count:
            raise BenchError(f"gateway: {ok} of {count} answered 200, nsqd holds {landed}")
        return GatewaySample(count, seconds, count / seconds, cpu * 1e6 / count, rss, nsqd_cpu * 1e6 / count,
                             connections, depth, PROCESSES).to_dict()
    finally:
        for gateway in gateways:
            gateway.stop()
        broker.stop()
