"""The contenders: what each one runs, how many records it gets, and which outputs prove it drained.

Every contender reads the input topic through the same channel of a fresh
nsqd (see :mod:`benchmarks.broker`) and writes to ``prime`` / ``non_prime``,
except ``nsq_to_nsq``, which passes every message through to ``prime``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.install import nsq_binary
from pipeline.topology import load_topology

from .broker import CHANNEL, INPUT_TOPIC, OUTPUT_TOPICS, Broker

#: The primes stage as benchmarked (max_in_flight is the topology schema's maximum).
STAGE = "primes"
STAGE_MAX_IN_FLIGHT = 2500
STAGE_BATCH = {"size": 256, "wait_ms": 5}
FULL_COUNT = 1_000_000
TEXTBOOK_COUNT = 100_000  # the textbook consumer is slow: fewer records keep its runs short


@dataclass(frozen=True)
class Contender:
    """One thing to drain the preloaded input with.

    Parameters:
        name: the short name ``--only`` selects it by.
        label: how the report names it.
        kind: ``textbook``, ``nsq_to_nsq`` or ``primes``.
        processes: how many processes it runs as.
        base_count: records it drains at ``--scale 1``.
        outputs: the output topics whose message counts must add up to the records.
    """

    name: str
    label: str
    kind: str
    processes: int
    base_count: int
    outputs: tuple[str, ...] = OUTPUT_TOPICS

    def count(self, scale: float) -> int:
        """Records to preload at ``scale``: at least one."""
        return max(1, round(self.base_count * scale))

    def argvs(self, broker: Broker, workdir: Path) -> list[list[str]]:
        """Return the command line of each of its processes, against ``broker``."""
        if self.kind == "textbook":
            return [textbook_argv(broker) for _ in range(self.processes)]
        if self.kind == "nsq_to_nsq":
            return [nsq_to_nsq_argv(broker)]
        topology = write_topology(workdir / "topology.yaml", broker, replicas=self.processes)
        return [worker_argv(topology, replica) for replica in range(self.processes)]


DRAIN_CONTENDERS = (
    Contender("textbook1", "textbook (HPP ex. 10-9), 1 process", "textbook", 1, TEXTBOOK_COUNT),
    Contender("textbook2", "textbook (HPP ex. 10-9), 2 processes", "textbook", 2, TEXTBOOK_COUNT),
    Contender("nsq_to_nsq", "nsq_to_nsq pass-through", "nsq_to_nsq", 1, FULL_COUNT, outputs=("prime",)),
    Contender("primes1", "primes stage, 1 replica", "primes", 1, FULL_COUNT),
    Contender("primes2", "primes stage, 2 replicas", "primes", 2, FULL_COUNT),
)
RESTART = "restart"
#: Figures whose code lands with other issues; the report says so instead of leaving them out silently.
PENDING = {
    "batched": "(d) primes stage with batched envelopes",
    "ticks": "(e) ticks latency",
}
ALL_NAMES = (*(c.name for c in DRAIN_CONTENDERS), RESTART, *PENDING)


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


def write_topology(path: Path, broker: Broker, replicas: int) -> Path:
    """Write (and validate) a topology running the primes stage against ``broker``; return its path."""
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": broker.tcp, "http": broker.process.http}],
                "var_dir": str(path.parent / "var")},
        "topics": {name: {"codec": "json"} for name in (INPUT_TOPIC, *OUTPUT_TOPICS)},
        "stages": {STAGE: {
            "handler": "consumers.primes:classify", "input": INPUT_TOPIC, "channel": CHANNEL,
            "outputs": list(OUTPUT_TOPICS), "replicas": replicas,
            "max_in_flight": STAGE_MAX_IN_FLIGHT, "batch": STAGE_BATCH,
        }},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_topology(path)  # a schema change should fail here, with the reason, not in a worker's log
    return path
