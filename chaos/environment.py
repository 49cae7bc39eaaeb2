"""The private pipeline a chaos run works on: supervisord, nsqd behind Toxiproxy, the stages under test.

:class:`ChaosEnvironment` writes a topology into the run's folder with free
127.0.0.1 ports: one nsqlookupd, ``pipeline.nsqd`` nsqd nodes (``n0``,
``n1``, ...; supervisord gives each its own ``--node-id``) whose clients (the
workers) reach each through its own Toxiproxy proxy ``nsqd-<name>``
(``proxy_tcp``: lookupd hands out the proxy's port), every topic with
``replication`` copies when the scenario asks for more than one, and the
stages under test: the primes stage, or (workload ``kind:
ticks``) the features and signals stages of the repository's topology.yaml,
with their handlers and params, one replica per partition. supervisord runs all of it with
``NSQ_PIPELINE_FAULTPOINTS`` in its environment, so the workers load the fault
point middleware. The harness's own instruments (journaling producer, sinks,
/stats) talk to every nsqd directly. ``pids.json`` in the run folder lists every
process the environment started, for a test to check they are gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.runtime.middleware import faultpoints

from pipeline.client import nsqd_http
from pipeline.ops.control import Supervisor
from pipeline.ops.processes import free_port, pid_alive, stop_pid
from pipeline.config import DEAD_LETTER_SUFFIX, NsqdSpec, Topology, load_topology

from .scenario import PipelineSpec
from .toxiproxy import ToxiproxyServer

STAGE = "primes"
SINK_CHANNEL = "chaos_sink"
MARKET_STAGES = ("features", "signals")
#: The nsq-pipeline checkout this harness is part of.
CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_TOPOLOGY = CHECKOUT / "topology.yaml"


@dataclass(frozen=True)
class Topics:
    """The topics of a chaos run."""

    input: str = "numbers"
    prime: str = "prime"
    non_prime: str = "non_prime"

    @property
    def dead(self) -> str:
        return self.input + DEAD_LETTER_SUFFIX

    @property
    def sinks(self) -> list[str]:
        """The topics the checker's sinks read."""
        return [self.prime, self.non_prime, self.dead]

    @property
    def dead_topics(self) -> tuple[str, ...]:
        return (self.dead,)


@dataclass(frozen=True)
class TickTopics:
    """The topics of a ticks run: ``ticks`` and ``features`` partitioned, ``signals`` not."""

    partitions: int
    input: str = "ticks"
    features: str = "features"
    signals: str = "signals"

    @property
    def dead(self) -> str:
        return self.input + DEAD_LETTER_SUFFIX

    @property
    def dead_topics(self) -> tuple[str, ...]:
        return (self.dead, self.features + DEAD_LETTER_SUFFIX)

    @property
    def feature_topics(self) -> list[str]:
        return [f"{self.features}.{k}" for k in range(self.partitions)] if self.partitions > 1 else [self.features]

    @property
    def sinks(self) -> list[str]:
        """The topics the checker's sinks read: every partition of features, signals and both dead letters."""
        return [*self.feature_topics, self.signals, *self.dead_topics]


class ChaosEnvironment:
    """Start with :meth:`start` (or ``with``); :meth:`stop` stops everything it started, whatever state it is in."""

    def __init__(self, folder: Path, spec: PipelineSpec, kind: str = "numbers"):
        self.folder = Path(folder).absolute()
        self.spec = spec
        self.kind = kind
        self.topics = TickTopics(spec.replicas) if kind == "ticks" else Topics()
        #: The stages the monkey's worker faults hit and the probes and recovery tracker watch.
        self.stages: tuple[str, ...] = MARKET_STAGES if kind == "ticks" else (STAGE,)
        self.toxiproxy: ToxiproxyServer | None = None
        self.supervisor: Supervisor | None = None
        self.topology: Topology | None = None
        self.faultpoints_path = self.folder / "faultpoints.json"
        self._pids: dict[str, int] = {}

    # -- addresses --------------------------------------------------------------------------

    @property
    def nodes(self) -> list[NsqdSpec]:
        """The nsqd nodes, n0 first."""
        return list(self.topology.nsq.nsqd)

    @property
    def tcp_addresses(self) -> list[str]:
        """Every nsqd's own TCP address (the harness's instruments bypass the proxies)."""
        return [node.tcp for node in self.nodes]

    @property
    def http_addresses(self) -> list[str]:
        """Every nsqd's HTTP address."""
        return [node.http for node in self.nodes]

    @property
    def proxies(self) -> list[str]:
        """The Toxiproxy proxy of every nsqd, the workers' way to it."""
        return [proxy_name(node.name) for node in self.nodes]

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> ChaosEnvironment:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start Toxiproxy and the pipeline; return once every replica is subscribed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.faultpoints_path.unlink(missing_ok=True)
        self.toxiproxy = ToxiproxyServer.start(self.folder / "var" / "log" / "toxiproxy.log")
        self._record("toxiproxy", self.toxiproxy.pid)
        self.topology = load_topology(self._write_topology())
        for node in self.nodes:
            self.toxiproxy.create_proxy(proxy_name(node.name), listen=node.proxy_tcp, upstream=node.tcp)
        self.supervisor = Supervisor(self.topology)
        # the workers run in the run's folder and import the reference stages (consumers/) from this checkout
        checkout = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
        with _environ(faultpoints.ENV, str(self.faultpoints_path)), _environ("PYTHONPATH", checkout):
            self.supervisor.up(log=lambda line: None)
        self._record("supervisord", self.supervisor.rpc().supervisor.getPID())
        for process in self.supervisor.processes():
            self._record(process.full_name, process.pid)
        for topic in self.topics.sinks:  # a topic's messages are spread over the nodes: a sink reads each
            for http in self.http_addresses:
                nsqd_http.create_channel(http, topic, SINK_CHANNEL)

    def stop(self) -> None:
        """Resume stopped processes, stop supervisord (and the pipeline with it) and Toxiproxy."""
        try:
            if self.supervisor is not None and self.supervisor.running():
                self.resume_all()
                for process in self.supervisor.processes():
                    self._record(process.full_name, process.pid)
                # The run is over, so no `down` in dependency order: supervisord's own
                # shutdown stops everything (workers first, by priority) in a third of the time.
                rpc = self.supervisor.rpc()
                pid = rpc.supervisor.getPID()
                rpc.supervisor.shutdown()
                stop_pid(pid, grace=90)
        finally:
            if self.toxiproxy is not None:
                self.toxiproxy.stop()
            for name, pid in self._pids.items():  # anything supervisord left behind
                if pid and pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)  # so a stopped process can die
                    stop_pid(pid, grace=5)

    def resume_all(self) -> None:
        """SIGCONT every process supervisord runs (a rollback: a stopped process never heals)."""
        for process in self.supervisor.processes():
            if process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)

    def _record(self, name: str, pid: int) -> None:
        if pid and pid not in self._pids.values():
            self._pids[name if name not in self._pids else f"{name}@{pid}"] = pid
            (self.folder / "pids.json").write_text(json.dumps(self._pids, indent=1))

    def note_pid(self, name: str, pid: int) -> None:
        """Remember a process the run saw (e.g. a restarted worker) for the leftover check."""
        self._record(name, pid)

    # -- topology ---------------------------------------------------------------------------

    @property
    def channels(self) -> set[str]:
        """The channels of the stages under test."""
        return {self.topology.stage(name).channel for name in self.stages}

    def _write_topology(self) -> Path:
        spec = self.spec
        address = lambda: f"127.0.0.1:{free_port()}"  # noqa: E731
        nsq = {"nsqd": [{"name": f"n{k}", "tcp": address(), "http": address(), "proxy_tcp": address(),
                         "args": list(spec.nsqd_args)} for k in range(spec.nsqd)],
               "lookupd": [{"tcp": address(), "http": address()}],
               "var_dir": "var"}
        doc = self._ticks_pipeline() if self.kind == "ticks" else self._primes_pipeline()
        if spec.replication > 1:
            for topic in doc["topics"].values():
                topic["replication"] = spec.replication
        path = self.folder / "topology.yaml"
        path.write_text(yaml.safe_dump({"nsq": nsq, **doc}, sort_keys=False))
        return path

    def _runtime_options(self) -> dict:
        spec = self.spec
        return {"max_in_flight": spec.max_in_flight, "max_tries": spec.max_tries, "msg_timeout": spec.msg_timeout,
                "publish_timeout": spec.publish_timeout, "requeue_delay": 0.2, "max_backoff_duration": 1.0}

    def _ticks_pipeline(self) -> dict:
        """topology.yaml's features and signals stages (handlers, params, batches) on ``replicas`` partitions."""
        default = load_topology(DEFAULT_TOPOLOGY)
        topics, n = self.topics, self.spec.replicas
        stages = {}
        for name, source in zip(MARKET_STAGES, (topics.input, topics.features)):
            stage = default.stage(name)
            output = topics.features if name == "features" else topics.signals
            stages[name] = {"handler": stage.handler, "input": source, "channel": name, "outputs": [output],
                            "keyed": True, "replicas": n, "params": dict(stage.params),
                            "batch": {"size": min(stage.batch.size, self.spec.max_in_flight),
                                      "wait_ms": stage.batch.wait_ms}, **self._runtime_options()}
        return {"topics": {topics.input: {"codec": "msgpack", "partitions": n, "key": "symbol"},
                           topics.features: {"codec": "msgpack", "partitions": n, "key": "symbol",
                                             "seq": "feature_seq"},
                           topics.signals: {"codec": "json"}},
                "stages": stages, "producers": {"ticks": {"topic": topics.input}}}

    def _primes_pipeline(self) -> dict:
        spec, topics = self.spec, self.topics
        stage = {"handler": spec.handler, "input": topics.input, "channel": STAGE,
                 "outputs": [topics.prime, topics.non_prime], "replicas": spec.replicas,
                 "max_in_flight": spec.max_in_flight, "batch": {"size": min(spec.batch_size, spec.max_in_flight),
                                                                "wait_ms": 5},
                 "max_tries": spec.max_tries, "crash_tries": spec.crash_tries, "msg_timeout": spec.msg_timeout,
                 "publish_timeout": spec.publish_timeout, "requeue_delay": 0.2, "max_backoff_duration": 1.0}
        declared = {t: {"codec": "json"} for t in (topics.input, topics.prime, topics.non_prime)}
        if spec.replication > 1 and spec.replicas > 1:
            # the copies of a message must meet in one replica: replica k reads partition k on every node
            declared[topics.input].update(partitions=spec.replicas, key="id")
        return {"topics": declared, "stages": {STAGE: stage}, "producers": {"numbers": {"topic": topics.input}}}


def proxy_name(node: str) -> str:
    """The Toxiproxy proxy in front of nsqd ``node``."""
    return f"nsqd-{node}"


@contextlib.contextmanager
def _environ(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
