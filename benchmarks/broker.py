"""A fresh nsqd for one measurement: preload the input, hold or release delivery, read /stats.

Every measurement gets its own nsqd on free 127.0.0.1 ports with a temporary
data directory, so topics start empty and nothing leaks from one run into the
next. The memory queues are made large enough to hold every preloaded
message, so no run is slowed by nsqd spilling to disk, unless the run is of
an ``nsq.durability`` profile, which keeps every message on disk.

Example::

    broker = Broker.start(Path("/tmp/bench/run1"), mem_queue_size=2_000_000)
    try:
        broker.prepare()
        broker.preload(bodies, deadline=time.monotonic() + 60)
        ...
        print(broker.snapshot().output_total)
    finally:
        broker.stop()
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.schema import DURABILITY_FLAGS
from pipeline.errors import PipelineError
from pipeline.client.nsqclient import NsqPublisher, NsqSubscriber
from pipeline.ops.processes import NsqProcess, start_nsqd

INPUT_TOPIC = "numbers"
CHANNEL = "bench"
OUTPUT_TOPICS = ("prime", "non_prime")
#: Created on the output topics before the clock starts when a contender's outputs are checked record by record.
VERIFY_CHANNEL = "verify"
PRELOAD_CHUNK = 2000
#: Ignore *_proxy variables: every address here is local.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_HTTP_TIMEOUT = 5.0


def nsqd_flags(mem_queue_size: int, durability: str = "default") -> list[str]:
    """The flags :meth:`Broker.start` gives nsqd: a memory queue of ``mem_queue_size``, or the profile's."""
    if durability == "default":
        return [f"--mem-queue-size={mem_queue_size}"]
    return list(DURABILITY_FLAGS[durability])


class BenchError(PipelineError):
    """Raised when a benchmark run cannot be carried out or does not finish in time."""


@dataclass
class Snapshot:
    """What one /stats read says about the bench topics."""

    outputs: dict[str, int]
    depth: int = 0
    backend_depth: int = 0
    in_flight: int = 0
    deferred: int = 0
    finished: int = 0
    verify_depths: dict[str, int] = field(default_factory=dict)
    clients: list[dict] = field(default_factory=list)
    producers: list[dict] = field(default_factory=list)

    @property
    def output_total(self) -> int:
        """Messages nsqd has accepted on all output topics."""
        return sum(self.outputs.values())

    @property
    def channel_empty(self) -> bool:
        """True when the input channel has nothing queued, in flight or deferred."""
        return self.depth + self.backend_depth + self.in_flight + self.deferred == 0


@dataclass
class Broker:
    """One nsqd started for one measurement; ``inputs`` are the topics whose :data:`CHANNEL` is the input
    (the input topic, or a replicated input's partitions)."""

    process: NsqProcess
    inputs: tuple[str, ...] = (INPUT_TOPIC,)

    @classmethod
    def start(cls, data_dir: Path, mem_queue_size: int, durability: str = "default",
              inputs: tuple[str, ...] = (INPUT_TOPIC,)) -> Broker:
        """Start an nsqd on free 127.0.0.1 ports keeping up to ``mem_queue_size`` messages per queue in memory.

        With ``durability`` other than ``default``, nsqd gets that ``nsq.durability`` profile's flags
        instead, as ``pipeline up`` gives them (``durable``: no message in memory), and ``mem_queue_size``
        is not used.
        """
        return cls(start_nsqd(data_dir, extra=nsqd_flags(mem_queue_size, durability)), inputs)

    @property
    def tcp(self) -> str:
        """nsqd's TCP address."""
        return self.process.tcp

    @property
    def pid(self) -> int:
        """nsqd's process id."""
        return self.process.pid

    def stop(self) -> None:
        """Stop nsqd; its data directory is the caller's to remove."""
        self.process.stop()

    def prepare(self, verify: bool = False) -> None:
        """Create the input channel paused (delivery waits for :meth:`release`) and the output topics.

        With ``verify``, also a :data:`VERIFY_CHANNEL` on each output topic, which keeps a copy of
        everything published there for :meth:`read_channel` to read after the clock stopped.
        """
        for topic in self.inputs:
            self._post("/topic/create", topic=topic)
            self._post("/channel/create", topic=topic, channel=CHANNEL)
            self._post("/channel/pause", topic=topic, channel=CHANNEL)
        for topic in OUTPUT_TOPICS:
            self._post("/topic/create", topic=topic)
            if verify:
                self._post("/channel/create", topic=topic, channel=VERIFY_CHANNEL)

    def release(self) -> None:
        """Unpause the input channel: subscribed consumers start receiving at once."""
        for topic in self.inputs:
            self._post("/channel/unpause", topic=topic, channel=CHANNEL)

    def preload(self, bodies: Sequence[bytes], deadline: float) -> Snapshot:
        """Publish ``bodies`` to the input topic and wait until all of them sit in the channel.

        Raises:
            BenchError: nsqd acknowledged fewer, or they did not reach the channel by ``deadline``.
        """
        return self.preload_parts({INPUT_TOPIC: bodies}, deadline)

    def preload_parts(self, parts: dict[str, Sequence[bytes]], deadline: float) -> Snapshot:
        """:meth:`preload` of each input topic's own ``bodies``."""
        bodies = [body for part in parts.values() for body in part]
        with NsqPublisher(self.tcp) as publisher:
            acked = sum(publisher.publish(topic, part, chunk=PRELOAD_CHUNK) for topic, part in parts.items())
        if acked != len(bodies):
            raise BenchError(f"preload: nsqd acknowledged {acked} of {len(bodies)} messages")
        while True:
            snap = self.snapshot()
            if snap.depth + snap.backend_depth >= len(bodies):
                return snap
            if time.monotonic() > deadline:
                raise BenchError(f"preload: only {snap.depth} of {len(bodies)} messages reached the channel")
            time.sleep(0.02)

    def read_channel(self, topic: str, channel: str, count: int, timeout: float = 10.0) -> list[bytes]:
        """Consume (and FIN) exactly ``count`` messages from ``topic``/``channel``; return their bodies.

        Raises:
            BenchError: fewer arrived, with no message for ``timeout`` seconds.
        """
        bodies: list[bytes] = []
        if count <= 0:
            return bodies
        with NsqSubscriber(self.tcp, topic, channel, rdy=min(count, 2500), timeout=timeout) as sub:
            for message in sub.messages(timeout=timeout):
                bodies.append(message.body)
                if len(bodies) >= count:
                    break
        if len(bodies) < count:
            raise BenchError(f"read {len(bodies)} of {count} messages from {topic}/{channel}")
        return bodies

    def http_mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Publish ``bodies`` (no newlines in them) with one HTTP /mpub, which opens no TCP producer connection."""
        self._request("POST", "/mpub", {"topic": topic}, body=b"\n".join(bodies))

    def snapshot(self, clients: bool = False) -> Snapshot:
        """Read /stats: output topic message counts, the input channel's queues, the verify channels' depths.

        With ``clients``, also the channel's consumers (and the messages they FINished, ``finished``)
        and nsqd's TCP producer connections.
        """
        params = {"format": "json", "include_mem": "false", "include_clients": "true" if clients else "false"}
        doc = json.loads(self._request("GET", "/stats", params))
        topics = {t["topic_name"]: t for t in doc.get("topics") or []}
        snap = Snapshot({name: int(topics.get(name, {}).get("message_count", 0)) for name in OUTPUT_TOPICS},
                        producers=doc.get("producers") or [])
        channels = [c for topic in self.inputs for c in (topics.get(topic) or {}).get("channels") or []]
        for channel in channels:
            if channel["channel_name"] == CHANNEL:
                snap.depth += channel["depth"]
                snap.backend_depth += channel["backend_depth"]
                snap.in_flight += channel["in_flight_count"]
                snap.deferred += channel["deferred_count"]
                snap.clients += channel.get("clients") or []
        snap.finished = sum(int(c.get("finish_count", 0)) for c in snap.clients)
        for name in OUTPUT_TOPICS:
            for channel in (topics.get(name) or {}).get("channels") or []:
                if channel["channel_name"] == VERIFY_CHANNEL:
                    snap.verify_depths[name] = channel["depth"] + channel["backend_depth"]
        return snap

    def _post(self, path: str, **params: str) -> None:
        self._request("POST", path, params)

    def _request(self, method: str, path: str, params: dict[str, str], body: bytes | None = None) -> bytes:
        url = f"http://{self.process.http}{path}?{urllib.parse.urlencode(params)}"
        if body is None and method == "POST":
            body = b""
        request = urllib.request.Request(url, method=method, data=body)
        try:
            with _LOCAL.open(request, timeout=_HTTP_TIMEOUT) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise BenchError(f"nsqd {method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e
        except OSError as e:
            raise BenchError(f"nsqd {method} {path}: {e}") from e
