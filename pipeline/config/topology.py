"""The root of topology.yaml: the whole pipeline, its cross-section rules, and what the runtime asks of it.

The sections are declared in :mod:`pipeline.config.schema`; this model ties them
together (declared topics, channels, keyed stages, ports, security) and answers the
runtime's questions (a stage's input, codec, dead-letter topic, nsqd addresses).
Load one with :func:`pipeline.config.load_topology`; the big picture is in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from pipeline.config.observe import MonitorSpec, ReportSpec
from pipeline.config.schema import (
    AuthSpec,
    GatewaySpec,
    NsqSpec,
    ProducerSpec,
    Spec,
    StageSpec,
    TlsSpec,
    TopicSpec,
)
from pipeline.config.types import (
    DEAD_LETTER_SUFFIX,
    RESERVED_STAGE_NAMES,
    LocalName,
    Problems,
    TopicName,
    raise_problems,
    split_address,
)

__all__ = ["Topology"]


class Topology(Spec):
    """The whole pipeline: the NSQ cluster, its topics, the stages and the producers.

    Load it with :func:`load_topology`; the helpers answer what the runtime asks::

        topology = load_topology("topology.yaml")
        topology.codec_for("prime")            # "json"
        topology.dead_letter_topic("primes")   # "numbers.dead"

    Rules: a producer's topic is declared; a stage is not named after the pipeline's own programs
    (nsqd, nsqlookupd, nsqadmin, restarter, supervisord, monitor, auth, gateway, alone or followed by `-...`).
    """

    nsq: NsqSpec = Field(description="Where the NSQ cluster is.")
    topics: dict[TopicName, TopicSpec] = Field(default_factory=dict, description="The topics, by name.")
    stages: dict[LocalName, StageSpec] = Field(default_factory=dict, description="The stages, by name.")
    producers: dict[LocalName, ProducerSpec] = Field(default_factory=dict, description="The producers, by name.")
    monitor: MonitorSpec | None = Field(None, description="`pipeline monitor` (a supervisord program when set).")
    report: ReportSpec | None = Field(None, description="The daily health report email (sent by the monitor).")
    gateway: GatewaySpec | None = Field(None, description="The authenticated /pub edge; null: no gateway.")
    auth: AuthSpec | None = Field(None, description="nsqd authorization from the topology; null: no auth.")
    tls: TlsSpec | None = Field(None, description="TLS between clients and nsqd; null: plain TCP.")
    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_references(self) -> Topology:
        problems: Problems = []
        channels: dict[tuple[str, str], str] = {}
        for name, stage in self.stages.items():
            if name.split("-")[0] in RESERVED_STAGE_NAMES:
                reason = (f"stage name {name!r} clashes with the pipeline's own programs and logs "
                          f"({', '.join(RESERVED_STAGE_NAMES)})")
                problems.append((("stages", name), reason, name))
            problems += self._undeclared(("stages", name, "input"), stage.input)
            problems += self._keyed_rules(name, stage)
            outputs: set[str] = set()
            keys = stage.outputs if isinstance(stage.outputs, dict) else range(len(stage.outputs))
            for key, output in zip(keys, stage.output_topics.values(), strict=False):
                loc = ("stages", name, "outputs", key)
                if output == stage.input:
                    reason = f"output {output!r} is the stage's own input; it would consume its own output"
                    problems.append((loc, reason, output))
                elif output in outputs and not isinstance(stage.outputs, dict):
                    problems.append((loc, f"output {output!r} is listed twice", output))
                else:
                    problems += self._undeclared(loc, output)
                outputs.add(output)
            owner = channels.setdefault((stage.input, stage.channel), name)
            if owner != name:
                reason = (f"channel {stage.channel!r} on topic {stage.input!r} is already used by stage {owner!r};"
                          " the two stages would steal each other's messages")
                problems.append((("stages", name, "channel"), reason, stage.channel))
        for name, producer in self.producers.items():
            problems += self._undeclared(("producers", name, "topic"), producer.topic)
        problems += self._metrics_port_rules()
        problems += self._replication_rules()
        raise_problems("Topology", problems)
        return self

    def _metrics_port_rules(self) -> Problems:
        """Replicas' metrics ports (base + k) must not collide with another stage's or with NSQ's."""
        taken = {split_address(a)[1]: f"nsq.{'.'.join(map(str, loc))}" for loc, a in self.nsq.addresses()}
        problems: Problems = []
        for name, stage in self.stages.items():
            if not stage.metrics_port:
                continue
            ports = range(stage.metrics_port, stage.metrics_port + stage.replicas)
            if ports[-1] > 65535:
                problems.append((("stages", name, "metrics_port"), f"replica {stage.replicas - 1} would listen on "
                                 f"port {ports[-1]}, above 65535", stage.metrics_port))
                continue
            clash = next((p for p in ports if p in taken), None)
            if clash is not None:
                reason = f"port {clash} (replica {clash - stage.metrics_port}) is already used by {taken[clash]}"
                problems.append((("stages", name, "metrics_port"), reason, stage.metrics_port))
            taken.update({p: f"stages.{name}.metrics_port (replica {p - stage.metrics_port})" for p in ports})
        return problems

    @model_validator(mode="after")
    def _check_security(self) -> Topology:
        problems: Problems = []
        if self.gateway is not None:
            for name, token in self.gateway.tokens.items():
                for i, topic in enumerate(token.topics):
                    loc = ("gateway", "tokens", name, "topics", i)
                    problems += self._undeclared(loc, topic)
                    if topic in self.topics and self.topics[topic].partitions > 1:
                        reason = (f"topic {topic!r} is partitioned; the gateway publishes to single topics only"
                                  " (an /mpub across partitions could not be all-or-nothing)")
                        problems.append((loc, reason, topic))
        if self.auth is not None:
            known = set(self.identities())
            for name in self.auth.secrets:
                if name not in known:
                    reason = f"{name!r} is no identity; expected one of: {', '.join(sorted(known))}"
                    problems.append((("auth", "secrets", name), reason, name))
        if self.tls is not None and (self.tls.client_cert is None) != (self.tls.client_key is None):
            problems.append((("tls", "client_cert"), "give client_cert and client_key together", None))
        elif self.tls is not None and self.tls.client_auth_policy != "none" and self.tls.client_cert is None:
            reason = f"client_auth_policy {self.tls.client_auth_policy} needs client_cert and client_key"
            problems.append((("tls", "client_auth_policy"), reason, self.tls.client_auth_policy))
        raise_problems("Topology", problems)
        return self

    def identities(self) -> list[str]:
        """The names nsqd's auth knows: every stage and producer, plus ``gateway`` and ``tail``."""
        return [*self.stages, *(p for p in self.producers if p not in self.stages), "gateway", "tail"]

    def _keyed_rules(self, name: str, stage: StageSpec) -> Problems:
        topic = self.topics.get(stage.input)
        if topic is None:
            return []
        if not stage.keyed:
            if topic.replication > 1 and stage.replicas != topic.partitions:
                reason = (f"topic {stage.input!r} is replicated, so the copies of a message must meet in one replica:"
                          f" a plain stage reading it runs one replica per partition ({topic.partitions}); give the"
                          f" topic `partitions: {stage.replicas}` and a `key`, or the stage {topic.partitions}"
                          f" replica{'s' if topic.partitions > 1 else ''}")
                return [(("stages", name, "replicas"), reason, stage.replicas)]
            if topic.partitions > 1 and topic.replication == 1:
                reason = (f"topic {stage.input!r} has {topic.partitions} partitions; a stage reading it must be "
                          "keyed (keyed: true), one replica per partition")
                return [(("stages", name, "input"), reason, stage.input)]
            return []
        if topic.key is None:
            reason = f"a keyed stage needs an input topic with a key; topic {stage.input!r} has none"
            return [(("stages", name, "keyed"), reason, stage.keyed)]
        if stage.replicas != topic.partitions:
            reason = (f"a keyed stage runs one replica per partition: topic {stage.input!r} has "
                      f"{topic.partitions} partitions, so replicas must be {topic.partitions}")
            return [(("stages", name, "replicas"), reason, stage.replicas)]
        return []

    def _replication_rules(self) -> Problems:
        nodes = len(self.nsq.nsqd)
        return [(("topics", name, "replication"), f"{spec.replication} copies need {spec.replication} nsqd, each "
                 f"holding one; nsq.nsqd has {nodes}", spec.replication)
                for name, spec in self.topics.items() if spec.replication > nodes]

    def copies(self, topic: str) -> int:
        """How many nsqd hold each message of NSQ topic ``topic`` (a declared topic, one of its partitions
        ``<topic>.<k>``, or the dead-letter topic of a stage reading it, which inherits its copies); 1 otherwise."""
        spec = self.topics.get(topic)
        if spec is None:
            base, _, suffix = topic.rpartition(".")
            if base and (suffix.isdigit() or "." + suffix == DEAD_LETTER_SUFFIX):
                return self.copies(base)
            return 1
        return spec.replication

    def placement(self, topic: str, sticky: bool = False) -> tuple[int, str | None]:
        """Where a publisher puts NSQ topic ``topic``'s messages: its :meth:`copies`, and the key that keeps
        it on one nsqd while that node is up (a partition always; any topic with ``sticky``, a keyed
        stage's outputs, so one key's records stay in order), or None: round-robin over the nodes."""
        base, _, k = topic.rpartition(".")
        partition = k.isdigit() and base in self.topics and self.topics[base].partitions > 1
        return self.copies(topic), topic if sticky or partition else None

    def physical_topics(self, topic: str) -> list[str]:
        """The NSQ topics behind ``topic``: ``<topic>.<k>`` per partition, or the topic itself."""
        spec = self.topics.get(topic)
        if spec is None or spec.partitions == 1:
            return [topic]
        return [f"{topic}.{k}" for k in range(spec.partitions)]

    def input_topic(self, stage_name: str, replica: int) -> str:
        """The NSQ topic replica ``replica`` of a stage consumes (its partition, for a keyed stage or a
        partitioned replicated topic)."""
        stage = self.stage(stage_name)
        topics = self.physical_topics(stage.input)
        return topics[replica] if len(topics) > 1 else topics[0]  # keyed, or replicated: its partition

    def _undeclared(self, loc: tuple[Any, ...], topic: str) -> Problems:
        if topic in self.topics:
            return []
        known = ", ".join(self.topics) or "none"
        return [(loc, f"topic {topic!r} is not declared under topics (declared: {known})", topic)]

    @property
    def path(self) -> Path | None:
        """The file this topology was loaded from; None when built in code."""
        return self._path

    @property
    def var_dir(self) -> Path:
        """The absolute state directory: ``nsq.var_dir`` relative to the topology file's directory."""
        base = self._path.parent if self._path is not None else Path.cwd()
        return Path(os.path.abspath(base / self.nsq.var_dir))

    def stage(self, name: str) -> StageSpec:
        """Return the stage called ``name``.

        Raises:
            KeyError: no such stage; the message lists the known ones.
        """
        try:
            return self.stages[name]
        except KeyError:
            known = ", ".join(self.stages) or "none"
            raise KeyError(f"unknown stage {name!r}; known stages: {known}") from None

    def pack_for(self, topic: str) -> int:
        """Records per message on ``topic`` (1 for undeclared topics such as dead letters)."""
        spec = self.topics.get(topic)
        return spec.pack if spec else 1

    def codec_for(self, topic: str) -> str:
        """Return the codec of records on ``topic``; "json" for undeclared topics such as dead letters."""
        spec = self.topics.get(topic)
        return spec.codec if spec is not None else "json"

    def dead_letter_topic(self, stage_name: str) -> str:
        """Return the topic where ``stage_name`` sends records it cannot process: ``<input>.dead``."""
        return self.stage(stage_name).input + DEAD_LETTER_SUFFIX

    def kept_topics(self) -> dict[str, int | None]:
        """The NSQ topics no stage reads, each with the most messages its ``keep`` channel holds (None: all).

        Terminal topics (declared, no stage's input; every partition) hold their topic's
        ``keep``; dead-letter topics hold their stage's ``dead_keep`` (None: every letter;
        two stages on one input share theirs, bounded by the larger).
        """
        read = {t for stage in self.stages.values() for t in self.physical_topics(stage.input)}
        kept: dict[str, int | None] = {t: spec.keep for name, spec in self.topics.items()
                                       for t in self.physical_topics(name) if t not in read}
        dead: dict[str, list[int | None]] = {}
        for name, stage in self.stages.items():
            dead.setdefault(self.dead_letter_topic(name), []).append(stage.dead_keep)
        for topic, bounds in dead.items():
            if topic not in read:
                kept[topic] = None if None in bounds else max(b for b in bounds if b is not None)
        return kept

    def nsqd_tcp_addresses(self) -> list[str]:
        """Return the TCP addresses clients use for every nsqd (its ``proxy_tcp`` if set), in file order."""
        return [nsqd.client_tcp for nsqd in self.nsq.nsqd]

    def nsqd_http_addresses(self) -> list[str]:
        """Return the HTTP addresses of every nsqd, in file order."""
        return [nsqd.http for nsqd in self.nsq.nsqd]

    def lookupd_tcp_addresses(self) -> list[str]:
        """Return the TCP addresses of every nsqlookupd (what nsqd registers with)."""
        return [lookupd.tcp for lookupd in self.nsq.lookupd]

    def lookupd_http_addresses(self) -> list[str]:
        """Return the HTTP addresses of every nsqlookupd (what consumers query)."""
        return [lookupd.http for lookupd in self.nsq.lookupd]
