"""The contenders: what each one runs, how many records it gets, and which outputs prove it drained.

Every contender reads the input topic through the same channel of a fresh
nsqd (see :mod:`benchmarks.broker`) and writes to ``prime`` / ``non_prime``,
except ``nsq_to_nsq``, which passes every message through to ``prime``.
``batched`` is the primes stage on topics with ``pack: 1000``: its input
messages are msgpack envelopes of 1000 records each, and so are its outputs.
``durable2`` is ``primes2`` with its nsqd on ``nsq.durability: durable``.
``replicated2`` is ``primes2`` on two nsqd with every topic at ``replication: 2``:
its input preloaded on both nodes (each message twice, in one partition per
replica, by ``id``) and its outputs published to both.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from pipeline.config import load_topology
from pipeline.config.schema import DURABILITY_FLAGS
from pipeline.ops.install import nsq_binary
from pipeline.records.partition import partition_of

from .broker import CHANNEL, INPUT_TOPIC, OUTPUT_TOPICS, Broker

#: The primes stage as benchmarked (max_in_flight is the topology schema's maximum).
STAGE = "primes"
STAGE_MAX_IN_FLIGHT = 2500
STAGE_BATCH = {"size": 256, "wait_ms": 5}
FULL_COUNT = 1_000_000
TEXTBOOK_COUNT = 100_000  # the textbook consumer is slow: fewer records keep its runs short
#: The batched contender: records per envelope on every topic, messages per handler call, records.
BATCHED_PACK = 1000
BATCHED_BATCH = {"size": 20, "wait_ms": 5}
BATCHED_COUNT = 4_000_000  # about 2 s at the 2,000,000 records/s target: the 50 ms polling matters less
PRIMES_KINDS = ("primes", "batched")


@dataclass(frozen=True)
class Contender:
    """One thing to drain the preloaded input with.

    Parameters:
        name: the short name ``--only`` selects it by.
        label: how the report names it.
        kind: ``textbook``, ``nsq_to_nsq``, ``primes`` or ``batched``.
        processes: how many processes it runs as.
        base_count: records it drains at ``--scale 1``.
        outputs: the output topics; with ``pack`` 1 their message counts must add up to the records.
        pack: records per message on the input and output topics (``batched``: 1000).
        batch: the stage's ``batch`` setting (primes kinds only).
        durability: the ``nsq.durability`` its nsqd and topology run with (``durable``: every message on disk).
        replication: its topics' ``replication``: that many nsqd, each holding a copy of every message.
    """

    name: str
    label: str
    kind: str
    processes: int
    base_count: int
    outputs: tuple[str, ...] = OUTPUT_TOPICS
    pack: int = 1
    batch: tuple[tuple[str, int], ...] = tuple(STAGE_BATCH.items())
    durability: str = "default"
    replication: int = 1

    @property
    def inputs(self) -> tuple[str, ...]:
        """The NSQ topics its input is preloaded on: the input, or a replicated input's partitions."""
        if self.replication == 1:
            return (INPUT_TOPIC,)
        return tuple(f"{INPUT_TOPIC}.{k}" for k in range(self.processes))

    def parts(self, bodies: Sequence[bytes]) -> dict[str, list[bytes]]:
        """``bodies`` by input topic: all on the input, or each on its ``id``'s partition (as a Producer routes)."""
        if self.replication == 1:
            return {INPUT_TOPIC: list(bodies)}
        topics = self.inputs
        parts: dict[str, list[bytes]] = {topic: [] for topic in topics}
        for body in bodies:
            parts[topics[partition_of(orjson.loads(body)["id"], len(topics))]].append(body)
        return parts

    def count(self, scale: float) -> int:
        """Records to preload at ``scale``: at least one."""
        return max(1, round(self.base_count * scale))

    def messages(self, scale: float) -> int:
        """Input messages those records make: one each, or one envelope per ``pack`` records."""
        return math.ceil(self.count(scale) / self.pack)

    def argvs(self, brokers: Sequence[Broker], workdir: Path) -> list[list[str]]:
        """Return the command line of each of its processes, against ``brokers`` (one unless replicated)."""
        broker = brokers[0]
        if self.kind == "textbook":
            return [textbook_argv(broker) for _ in range(self.processes)]
        if self.kind == "nsq_to_nsq":
            return [nsq_to_nsq_argv(broker)]
        if self.kind not in PRIMES_KINDS:
            raise ValueError(f"unknown contender kind {self.kind!r}")
        topology = write_topology(workdir / "topology.yaml", brokers, replicas=self.processes, pack=self.pack,
                                  batch=dict(self.batch), durability=self.durability, replication=self.replication)
        return [worker_argv(topology, replica) for replica in range(self.processes)]


DRAIN_CONTENDERS = (
    Contender("textbook1", "textbook (HPP ex. 10-9), 1 process", "textbook", 1, TEXTBOOK_COUNT),
    Contender("textbook2", "textbook (HPP ex. 10-9), 2 processes", "textbook", 2, TEXTBOOK_COUNT),
    Contender("nsq_to_nsq", "nsq_to_nsq pass-through", "nsq_to_nsq", 1, FULL_COUNT, outputs=("prime",)),
    Contender("primes1", "primes stage, 1 replica", "primes", 1, FULL_COUNT),
    Contender("primes2", "primes stage, 2 replicas", "primes", 2, FULL_COUNT),
    Contender("durable2", "primes stage, 2 replicas, nsq.durability: durable ("
              + " ".join(DURABILITY_FLAGS["durable"]) + ")", "primes", 2, FULL_COUNT, durability="durable"),
    Contender("replicated2", "primes stage, 2 replicas, 2 nsqd, every topic replication: 2", "primes", 2,
              FULL_COUNT, replication=2),
    Contender("batched", f"(d) primes stage, batched envelopes (pack {BATCHED_PACK}), 2 replicas", "batched", 2,
              BATCHED_COUNT, pack=BATCHED_PACK, batch=tuple(BATCHED_BATCH.items())),
)
RESTART = "restart"
#: (e) tick -> feature -> signal latency of the keyed market pipeline (see :mod:`benchmarks.ticks`).
TICKS = "ticks"
#: Single-message /pub throughput of `pipeline gateway` (see :mod:`benchmarks.gateway`).
GATEWAY = "gateway"
#: Figures whose code lands with other issues; the report says so instead of leaving them out silently.
PENDING: dict[str, str] = {}
ALL_NAMES = (*(c.name for c in DRAIN_CONTENDERS), RESTART, TICKS, GATEWAY, *PENDING)


def textbook_argv(broker: Broker) -> list[str]:
    """The textbook consumer on the bench topic and channel."""
    return [sys.executable, "-m", "benchmarks.textbook", "--topic", INPUT_TOPIC, "--channel", CHANNEL,
            "--nsqd-tcp-address", broker.tcp]


def nsq_to_nsq_argv(broker: Broker) -> list[str]:
    """NSQ's own relay, copying the input channel to ``prime`` on the same nsqd."""
    return [nsq_binary("nsq_to_nsq"), f"--topic={INPUT_TOPIC}", f"--channel={CHANNEL}",
            "--destination-topic=prime", f"--max-in-flight={STAGE_MAX_IN_FLIGHT}",
            f"--nsqd-tcp-address={broker.tcp}", f"--destination-nsqd-tcp-address={broker.tcp}"]


def worker_argv(topology: Path, replica: int) -> list[str]:
    """One replica of the primes stage, as supervisord would start it."""
    return [sys.executable, "-m", "pipeline.cli", "worker", STAGE, "--replica", str(replica), "-t", str(topology)]


def write_topology(path: Path, brokers: Broker | Sequence[Broker], replicas: int, pack: int = 1,
                   batch: dict[str, int] | None = None, durability: str = "default", replication: int = 1) -> Path:
    """Write (and validate) a topology running the primes stage against ``brokers``; return its path.

    With ``pack`` above 1 every topic carries msgpack envelopes of up to ``pack`` records; with
    ``replication`` above 1 every topic has that many copies, the input one partition per replica.
    """
    nodes = [brokers] if isinstance(brokers, Broker) else list(brokers)
    topic: dict = {"codec": "json"} if pack == 1 else {"codec": "msgpack", "pack": pack}
    if replication > 1:
        topic["replication"] = replication
    topics = {name: dict(topic) for name in (INPUT_TOPIC, *OUTPUT_TOPICS)}
    if replication > 1:
        topics[INPUT_TOPIC].update(partitions=replicas, key="id")
    doc = {
        "nsq": {"nsqd": [{"name": f"n{k}", "tcp": b.tcp, "http": b.process.http} for k, b in enumerate(nodes)],
                "var_dir": str(path.parent / "var"), "durability": durability},
        "topics": topics,
        "stages": {STAGE: {
            "handler": "consumers.primes:classify", "input": INPUT_TOPIC, "channel": CHANNEL,
            "outputs": list(OUTPUT_TOPICS), "replicas": replicas,
            "max_in_flight": STAGE_MAX_IN_FLIGHT, "batch": dict(batch or STAGE_BATCH),
        }},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_topology(path)  # a schema change should fail here, with the reason, not in a worker's log
    return path
