"""Single-message ``/pub`` throughput of ``pipeline gateway`` over keep-alive connections.

The rule:

1. a fresh nsqd, and :data:`PROCESSES` ``pipeline gateway`` processes sharing
   one port (SO_REUSEPORT) in front of it, with one bearer token (no rate
   limit) that may publish to the topic ``gw``;
2. :data:`CONNECTIONS` keep-alive HTTP/1.1 connections, each keeping
   :data:`DEPTH` requests pipelined, send N ``POST /pub?topic=gw`` requests of one
   JSON record each (the same bytes as the drain contenders' records). The
   client is one asyncio ``Protocol`` per connection in this process (which
   does nothing else meanwhile): it parses every complete answer of a read at
   once and sends as many new requests as were answered, in one write;
3. the clock runs from the first connection opened to the last ``200 OK`` read;
   the gateway answers only after nsqd acknowledged the message (it publishes
   the requests of one IOLoop iteration as one MPUB), so every 200 is a message
   in nsqd. Afterwards nsqd's message count on ``gw`` must be N and every
   answer a 200, else the run fails.

Figures: messages/s, the gateway processes' CPU per million messages and their
largest peak RSS, nsqd's CPU and the client's own (this process's) CPU per million.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pipeline.client import nsqd_http
from pipeline.config import socket_address
from pipeline.records.codecs import encode_json
from pipeline.ops.processes import free_port, start_process

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
    client_cpu_s_per_million: float
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


class _Client(asyncio.Protocol):
    """One keep-alive connection sending its share of requests, ``depth`` unanswered at a time.

    Lean on purpose, so that the client is not what limits the figure: every
    complete answer in a read is parsed at once (status line, ``Content-Length``,
    body), and one write sends as many new requests as were just answered.
    """

    def __init__(self, requests: list[bytes], depth: int, done: asyncio.Future):
        self.requests, self.depth, self.done = requests, depth, done
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.sent = self.answered = self.ok = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send(self.depth)

    def _send(self, count: int) -> None:
        batch = self.requests[self.sent:self.sent + count]
        if batch:
            self.sent += len(batch)
            self.transport.write(b"".join(batch))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        pos, answered, ok = 0, 0, 0
        while (end := buffer.find(b"\r\n\r\n", pos)) >= 0:
            head = buffer[pos:end].lower()
            length, at = 0, head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 17)
                length = int(head[at + 17:stop if stop >= 0 else len(head)])
            if end + 4 + length > len(buffer):
                break
            ok += head.startswith(b"http/1.1 200 ")
            answered += 1
            pos = end + 4 + length
        self.buffer = buffer[pos:]
        self.answered += answered
        self.ok += ok
        if self.answered >= len(self.requests):
            self.transport.close()
            if not self.done.done():
                self.done.set_result(self.ok)
        elif answered:
            self._send(answered)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(BenchError(f"gateway closed a connection after {self.answered} answers: {exc}"))


async def _load(address: str, shares: list[list[bytes]], depth: int) -> int:
    host, port = socket_address(address)
    loop = asyncio.get_running_loop()
    futures = []
    for share in shares:
        done = loop.create_future()
        futures.append(done)
        await loop.create_connection(lambda s=share, d=done: _Client(s, depth, d), host, port)
    return sum(await asyncio.gather(*futures))


def _run_load(address: str, shares: list[list[bytes]], depth: int) -> int:
    # A private loop, not asyncio.run(): that would leave this thread without a current loop
    # for whatever runs next in the process (tornado code that asks for one, e.g. in the test suite).
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(_load(address, shares, depth), RUN_TIMEOUT))
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
        shares = [[request_bytes(address, b) for b in bodies[i::connections]] for i in range(connections)]
        cpu0, nsqd0, client0 = sum(map(cpu_seconds, pids)), cpu_seconds(broker.pid), time.process_time()
        start = time.perf_counter()
        ok = _run_load(address, [share for share in shares if share], depth)
        seconds = time.perf_counter() - start
        cpu, nsqd_cpu = sum(map(cpu_seconds, pids)) - cpu0, cpu_seconds(broker.pid) - nsqd0
        client_cpu = time.process_time() - client0
        rss = max(map(peak_rss_mb, pids))
        landed = nsqd_http.topic_message_count(broker.process.http, TOPIC)
        if ok != count or landed != count:
            raise BenchError(f"gateway: {ok} of {count} answered 200, nsqd holds {landed}")
        return GatewaySample(count, seconds, count / seconds, cpu * 1e6 / count, rss, nsqd_cpu * 1e6 / count,
                             client_cpu * 1e6 / count, connections, depth, PROCESSES).to_dict()
    finally:
        for gateway in gateways:
            gateway.stop()
        broker.stop()
