"""The topology schema and its loader: one ``topology.yaml`` describes the pipeline.

Each option is declared once below, as a pydantic field with its type, default,
bounds and description; ``pipeline.config.docs`` renders the reference docs
from the same declaration. The loader rejects unknown keys and reports every
problem as a :class:`~pipeline.errors.TopologyError` pointing at the offending
line and column::

    from pipeline.config.schema import load_topology

    topology = load_topology("topology.yaml")
    stage = topology.stage("primes")
    print(stage.input, stage.channel, topology.dead_letter_topic("primes"))

A broken file raises, for example::

    topology.yaml:12:15: stages.primes.replicas: must be >= 1
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.errors import TopologyError
from pipeline.config.observe import MonitorSpec, ReportSpec, environment_problems

__all__ = [
    "BatchSpec", "LookupdSpec", "NsqSpec", "NsqdSpec", "ProducerSpec", "StageSpec", "TopicSpec", "Topology",
    "TypeDoc", "load_topology", "split_address", "validate_topology",
]

NSQ_NAME_MAX = 64
#: nsqd's default --max-msg-size: no message, dead letters included, may be longer.
MAX_MSG_SIZE = 1024 * 1024
DEAD_LETTER_SUFFIX = ".dead"
# supervisord program (and log file) names the pipeline uses for itself
RESERVED_STAGE_NAMES = ("nsqd", "nsqlookupd", "nsqadmin", "restarter", "supervisord", "monitor", "auth",
                        "gateway")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_ADDRESS = re.compile(r"(\[[^\]]*\]|[^:\[\]]*):(\d+)")

# A rule broken: (location inside the model, reason, offending value).
Problems = list[tuple[tuple[Any, ...], str, Any]]


@dataclass(frozen=True)
class TypeDoc:
    """How the reference docs name a constrained string type and state its rule."""

    name: str
    rule: str


def _problem(reason: str) -> PydanticCustomError:
    # One error type for every rule of ours, so the loader reports ``reason`` verbatim.
    return PydanticCustomError("topology", "{reason}", {"reason": reason})


def _raise_problems(title: str, problems: Problems) -> None:
    """Raise one ValidationError holding each (loc, reason, input), so each lands on its own field."""
    if problems:
        details = [InitErrorDetails(type=_problem(r), loc=loc, input=v) for loc, r, v in problems]
        raise ValidationError.from_exception_data(title, details)


def _matching(kind: str, pattern: str, rule: str, must: str = "be") -> Any:
    """Return a str type that must fully match ``pattern``; errors and docs state ``rule``."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise _problem(f"{kind} {value!r} must {must} {rule}")
        return value

    return Annotated[str, AfterValidator(check), TypeDoc(kind, rule)]


def _not_a_dot_dir(value: str) -> str:
    # An nsqd name is a directory under var/nsqd/; these two would escape it.
    if value in (".", ".."):
        raise _problem(f"nsqd name {value!r} must not be '.' or '..'")
    return value


# nsqd's own rules (protocol.IsValidTopicName / IsValidChannelName): at most 64 characters.
_NAME_RULE = "1..64 characters of a-z A-Z 0-9 . _ -"
_NSQ_NAME = r"(?=.{1,64}\Z)[.a-zA-Z0-9_-]+"
TopicName = _matching("topic name", _NSQ_NAME, _NAME_RULE)
ChannelName = _matching(
    "channel name", _NSQ_NAME + "(#ephemeral)?", _NAME_RULE + ", optionally ending in #ephemeral"
)
NsqdName = Annotated[_matching("nsqd name", _NSQ_NAME, _NAME_RULE), AfterValidator(_not_a_dot_dir)]
# Stage and producer names become supervisord program names and CLI arguments.
LocalName = _matching("name", r"[a-zA-Z0-9_-]{1,64}", "1..64 characters of a-z A-Z 0-9 _ -")
HandlerPath = _matching("handler", rf"{_IDENT}(\.{_IDENT})*:{_IDENT}", "'package.module:function'", "look like")


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (host an IPv4 address, a name, or ``[v6]``) into host and port.

    The brackets of an IPv6 host are kept, so ``f"{host}:{port}"`` rebuilds it.

    Raises:
        ValueError: the address is malformed; the message says why.
    """
    match = _ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f"address {address!r} must be host:port, e.g. 127.0.0.1:4150")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {address!r} must be 1..65535")
    if not host:
        raise ValueError(f"address {address!r} has an empty host")
    if not _valid_host(host):
        raise ValueError(f"host {host!r} in {address!r} is not an IPv4 address, host name or [IPv6]")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        if host.startswith("["):
            ipaddress.IPv6Address(host[1:-1])
        elif re.fullmatch(r"[0-9.]+", host):
            ipaddress.IPv4Address(host)
        elif not _HOSTNAME.fullmatch(host):
            return False
    except ValueError:
        return False
    return True


def _address(value: str) -> str:
    try:
        split_address(value)
    except ValueError as e:
        raise _problem(str(e)) from e
    return value


Address = Annotated[str, AfterValidator(_address), TypeDoc("address", "host:port, port 1..65535")]


def _metrics_host(value: str) -> str:
    host = f"[{value}]" if ":" in value else value
    if not _valid_host(host):
        raise _problem(f"host {value!r} is not an IPv4 address, host name or IPv6 address")
    return value


MetricsHost = Annotated[str, AfterValidator(_metrics_host),
                        TypeDoc("host", "an IPv4 address, host name or IPv6 address")]


def _nsqd_flag(value: str) -> str:
    if not re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", value):
        raise _problem(f"nsqd flag {value!r} must look like --name or --name=value")
    return value


class _Spec(BaseModel):
    """Base of every topology model: unknown keys are errors, values are immutable."""

    # strict: YAML already types its scalars, so "5" for an int or `yes` for a number is a mistake.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class NsqdSpec(_Spec):
    """One nsqd broker: its name and the addresses it listens on."""

    name: NsqdName = Field(description="Name of this nsqd; its data lives in `<var_dir>/nsqd/<name>/`.")
    tcp: Address = Field(description="TCP address for producers and consumers (nsqd `--tcp-address`).")
    http: Address = Field(description="HTTP address for /pub, /stats and /ping (nsqd `--http-address`).")
    proxy_tcp: Address | None = Field(
        None, description="Address clients connect to instead of `tcp` (a Toxiproxy listener in a chaos run);"
                          " nsqd registers it with lookupd (`--broadcast-address`, `--broadcast-tcp-port`).")
    args: list[Annotated[str, AfterValidator(_nsqd_flag)]] = Field(
        default_factory=list, description="Extra nsqd flags, e.g. `[--mem-queue-size=0]`; they come last.")

    @property
    def client_tcp(self) -> str:
        """The TCP address clients use: ``proxy_tcp`` when set, else ``tcp``."""
        return self.proxy_tcp or self.tcp


class LookupdSpec(_Spec):
    """One nsqlookupd: workers and nsqadmin find the nsqd nodes through it."""

    tcp: Address = Field(description="TCP address nsqd registers with (nsqlookupd `--tcp-address`).")
    http: Address = Field(description="HTTP address consumers query (nsqlookupd `--http-address`).")


class NsqSpec(_Spec):
    """Where the NSQ cluster is; `pipeline up` starts these processes locally.

    Rules: nsqd names are unique, and no address appears twice in the whole section.
    """

    nsqd: list[NsqdSpec] = Field(min_length=1, description="The nsqd brokers; producers publish to them.")
    lookupd: list[LookupdSpec] = Field(
        default_factory=list, description="The nsqlookupd nodes; without any, consumers connect to nsqd directly."
    )
    admin: Address | None = Field(None, description="HTTP address of nsqadmin (`--http-address`); null: no nsqadmin.")
    admin_users: list[str] = Field(
        default_factory=list,
        description="Users allowed nsqadmin's privileged actions (nsqadmin `--admin-user`), as named by the"
                    " authenticating proxy in `admin_acl_header`; empty: every visitor is an admin.")
    admin_acl_header: str = Field(
        "X-Forwarded-User", min_length=1,
        description="Header the authenticating proxy puts the user name in (nsqadmin `--acl-http-header`).")
    var_dir: str = Field(
        "var", min_length=1,
        description="Directory for all state (NSQ data, logs, health.db), relative to the topology file.",
    )
    lookupd_poll_interval: int = Field(
        5, ge=1, le=3600,
        description="Seconds between a worker's queries of the lookupds for the nsqd nodes carrying its input"
                    " (one lookupd per query, in turn, with up to 30% jitter): a new or returning nsqd is"
                    " consumed from within about this long.",
    )

    @model_validator(mode="after")
    def _check_unique(self) -> NsqSpec:
        problems: Problems = []
        names: dict[str, int] = {}
        for i, nsqd in enumerate(self.nsqd):
            if nsqd.name in names:
                reason = f"nsqd name {nsqd.name!r} is already used by nsq.nsqd.{names[nsqd.name]}"
                problems.append((("nsqd", i, "name"), reason, nsqd.name))
            names.setdefault(nsqd.name, i)
        seen: dict[str, str] = {}
        for loc, address in self._addresses():
            where = ".".join(str(p) for p in ("nsq", *loc))
            if address.lower() in seen:
                problems.append((loc, f"address {address} is already used by {seen[address.lower()]}", address))
            seen.setdefault(address.lower(), where)
        _raise_problems("NsqSpec", problems)
        return self

    def _addresses(self) -> list[tuple[tuple[Any, ...], str]]:
        found: list[tuple[tuple[Any, ...], str]] = []
        for section, nodes in (("nsqd", self.nsqd), ("lookupd", self.lookupd)):
            for i, node in enumerate(nodes):
                found += [((section, i, "tcp"), node.tcp), ((section, i, "http"), node.http)]
                if getattr(node, "proxy_tcp", None) is not None:
                    found.append(((section, i, "proxy_tcp"), node.proxy_tcp))
        if self.admin is not None:
            found.append((("admin",), self.admin))
        return found


class TopicSpec(_Spec):
    """One NSQ topic the pipeline uses; every stage input and output must be declared here."""

    codec: Literal["json", "msgpack"] = Field(
        "json", description="Encoding of records published to this topic; decoding detects either."
    )
    partitions: int = Field(
        1, ge=1, le=64,
        description="Partitions of a keyed topic: records go to `<topic>.<k>` by a stable hash of `key`.",
    )
    key: LocalName | None = Field(None, description="Record field that routes a record to its partition.")
    seq: LocalName = Field("seq", description="Record field with the per-key sequence number (keyed stages).")
    pack: int = Field(
        1, ge=1, le=10000,
        description="Records per NSQ message: above 1, producers and stages publish msgpack envelopes of up to"
                    " this many records (throughput), and the envelope becomes the unit nsqd redelivers.",
    )

    schema_: dict[str, Literal["string", "integer", "number", "boolean", "object", "array"]] | None = Field(
        None, alias="schema",
        description="Required record fields and their types, checked by `pipeline gateway` before it publishes"
                    " (a violation is a 400 naming the field); null: no check.",
    )

    @model_validator(mode="after")
    def _check_key(self) -> TopicSpec:
        if self.partitions > 1 and self.key is None:
            reason = f"a topic with {self.partitions} partitions needs a key (the record field that routes it)"
            _raise_problems("TopicSpec", [(("partitions",), reason, self.partitions)])
        return self


class BatchSpec(_Spec):
    """How a stage groups messages: up to `size` messages or `wait_ms`, whichever comes first."""

    size: int = Field(256, ge=1, le=10000, description="Most messages handed to the handler in one call.")
    wait_ms: int = Field(5, ge=0, le=60000, description="Longest wait, in milliseconds, for a batch to fill.")


class StageSpec(_Spec):
    """One stage: a batch function reading one topic through one channel and publishing to its outputs.

    Rules: input and outputs are declared topics; outputs do not include the input;
    `batch.size <= max_in_flight`; `publish_timeout < msg_timeout`; two stages on the
    same input use different channels; `<input>.dead` is a valid topic name.
    """

    handler: HandlerPath = Field(description="Import path of the batch function; imported by the worker, not here.")
    input: TopicName = Field(description="Topic the stage consumes; failures go to `<input>.dead`.")
    channel: ChannelName = Field(description="NSQ channel all replicas share, so NSQ balances messages across them.")
    outputs: list[TopicName] | dict[LocalName, TopicName] = Field(
        default_factory=list,
        description="Topics the handler may emit to: a list of topics, or a mapping from the names the"
                    " handler emits to (its output names) to topics, so one handler serves any topic names.",
    )
    replicas: int = Field(1, ge=1, le=64, description="Worker processes of this stage (supervisord `numprocs`).")
    max_in_flight: int = Field(500, ge=1, le=2500, description="Messages a replica holds unfinished at once (RDY).")
    batch: BatchSpec = Field(default_factory=BatchSpec, description="How messages are grouped into handler calls.")
    max_tries: int = Field(5, ge=1, le=65535, description="Attempts before a message is dead-lettered, never dropped.")
    msg_timeout: float = Field(60.0, ge=1, le=900, description="Seconds nsqd waits for FIN before redelivering.")
    requeue_delay: float = Field(
        1.0, ge=0, le=3600,
        description="Seconds before a message requeued after a handler error returns; doubles per attempt.",
    )
    max_backoff_duration: float = Field(
        10.0, ge=0.1, le=3600, description="Longest pause, in seconds, of the consumer's backoff after failures."
    )
    publish_timeout: float = Field(
        10.0, ge=0.1, le=600,
        description="Seconds to wait for nsqd's OK to the outputs' publish before requeueing the inputs.",
    )
    output_buffer_timeout: int = Field(
        25, ge=1, le=30000,
        description="Milliseconds nsqd may hold messages for a replica before flushing them (pynsq's default is"
                    " 250, a quarter second per hop at low rates); nsqd refuses values below its"
                    " --min-output-buffer-timeout, 25 by default. Lower: less latency, more nsqd CPU.",
    )
    output_buffer_size: int = Field(
        16384, ge=-1, le=65536,
        description="Bytes nsqd may buffer for a replica before writing them (with output_buffer_timeout);"
                    " -1 writes every message at once: lowest latency, for latency-sensitive stages at"
                    " moderate rates. nsqd accepts 64 up to its --max-output-buffer-size (64 KiB by default).",
    )
    keyed: bool = Field(
        False,
        description="Stateful per key: replica k consumes partition k of the input, applies each key's records"
                    " in `seq` order once, and checkpoints its state before it FINs.",
    )
    checkpoint_interval_ms: int = Field(
        50, ge=0, le=60000,
        description="Keyed stages: the shortest time between two checkpoints (each is fsynced, ~0.5 ms of CPU"
                    " and several ms of disk); batches acknowledged meanwhile share the next one, and their"
                    " messages are finished with it. A checkpoint is taken sooner once half of max_in_flight"
                    " waits for one. Outputs are published at once whatever the interval; 0 checkpoints as"
                    " soon as the previous one is written.",
    )
    gap_max_count: int = Field(
        100000, ge=1, le=10000000,
        description="Keyed stages: records parked per key while waiting for a missing `seq`, before giving up on"
                    " it. Parked records are part of every checkpoint, so this also bounds its size.",
    )
    gap_max_ms: int | None = Field(
        None, ge=1, le=3600000,
        description="Keyed stages: longest wait, in milliseconds, for a missing `seq` before it is counted as a"
                    " gap; must exceed msg_timeout, since a crashed replica's messages come back only after it"
                    " (default: 2 x msg_timeout + 10 s). A gap is given up only once nsqd also holds nothing more"
                    " for the partition: a message behind a backlog is late, not lost.",
    )

    @property
    def gap_wait_ms(self) -> int:
        """How long a keyed stage waits for a missing ``seq``."""
        return self.gap_max_ms if self.gap_max_ms is not None else int(self.msg_timeout * 2000) + 10000
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the stage, passed to a stage class as `context.params`.",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Base port of the replicas' Prometheus endpoints: replica k serves `/metrics` on"
                    " `metrics_port + k`; 0 or null: no endpoint.",
    )
    metrics_host: MetricsHost = Field("127.0.0.1", description="Address the metrics endpoints listen on.")

    @property
    def output_topics(self) -> dict[str, str]:
        """The handler's output names mapped to topics (a list of topics maps each to itself)."""
        if isinstance(self.outputs, dict):
            return dict(self.outputs)
        return {topic: topic for topic in self.outputs}

    @model_validator(mode="after")
    def _check_timing(self) -> StageSpec:
        problems: Problems = []
        if len(self.input) + len(DEAD_LETTER_SUFFIX) > NSQ_NAME_MAX:
            dead = self.input + DEAD_LETTER_SUFFIX
            reason = f"dead-letter topic {dead!r} would be longer than {NSQ_NAME_MAX} characters"
            problems.append((("input",), reason, self.input))
        if self.batch.size > self.max_in_flight:
            reason = (f"batch.size {self.batch.size} is larger than max_in_flight {self.max_in_flight},"
                      " so a batch can never fill")
            problems.append((("batch", "size"), reason, self.batch.size))
        if self.gap_max_ms is not None and self.gap_max_ms <= self.msg_timeout * 1000:
            reason = (f"gap_max_ms {self.gap_max_ms} must exceed msg_timeout ({_num(self.msg_timeout)} s): the "
                      "messages of a crashed replica come back only after msg_timeout")
            problems.append((("gap_max_ms",), reason, self.gap_max_ms))
        if self.checkpoint_interval_ms * 2 >= self.msg_timeout * 1000:
            reason = (f"checkpoint_interval_ms {self.checkpoint_interval_ms} must be under half of msg_timeout"
                      f" ({_num(self.msg_timeout)} s): messages wait for a checkpoint before they are finished")
            problems.append((("checkpoint_interval_ms",), reason, self.checkpoint_interval_ms))
        if 0 <= self.output_buffer_size < 64:
            reason = f"output_buffer_size {self.output_buffer_size} must be -1 (no buffering) or at least 64"
            problems.append((("output_buffer_size",), reason, self.output_buffer_size))
        if self.publish_timeout >= self.msg_timeout:
            reason = (f"publish_timeout {_num(self.publish_timeout)} must be less than"
                      f" msg_timeout {_num(self.msg_timeout)}")
            problems.append((("publish_timeout",), reason, self.publish_timeout))
        _raise_problems("StageSpec", problems)
        return self


class ProducerSpec(_Spec):
    """One producer (`pipeline produce NAME`): where it publishes and how fast."""

    topic: TopicName = Field(description="Declared topic the producer publishes to.")
    chunk: int = Field(500, ge=1, le=10000, description="Messages per MPUB.")
    rate: float = Field(0.0, ge=0, description="Messages per second; 0 means as fast as nsqd accepts them.")


class SecretSpec(_Spec):
    """Where a secret comes from: an environment variable, or a file only its owner may read (mode 0600).

    Rules: exactly one of `env` and `file`.
    """

    env: _matching("variable", r"[A-Za-z_][A-Za-z0-9_]*", "a shell variable name") | None = Field(
        None, description="Environment variable holding the secret.")
    file: str | None = Field(
        None, min_length=1,
        description="File holding the secret (relative to the topology file); refused unless its mode is 0600 or"
                    " stricter.")

    @model_validator(mode="after")
    def _check_one(self) -> SecretSpec:
        if (self.env is None) == (self.file is None):
            _raise_problems("SecretSpec", [((), "give exactly one of env and file", None)])
        return self


class GatewayTokenSpec(_Spec):
    """One bearer token of `pipeline gateway`: which topics it may publish to, and how fast."""

    secret: SecretSpec = Field(description="Where the token comes from (`Authorization: Bearer <token>`).")
    topics: list[TopicName] = Field(min_length=1, description="Declared topics this token may publish to.")
    rate: float = Field(0.0, ge=0, description="Messages per second allowed to this token; 0: no limit.")
    burst: int = Field(0, ge=0, description="Messages above the rate allowed at once (default: one second's worth).")


class GatewaySpec(_Spec):
    """`pipeline gateway`: an authenticated HTTP edge compatible with nsqd's `/pub` and `/mpub`."""

    http: Address = Field(description="HTTP address the gateway listens on.")
    tokens: dict[LocalName, GatewayTokenSpec] = Field(min_length=1, description="The bearer tokens, by name.")
    max_msg_size: int = Field(
        1048576, ge=1, le=1073741824, description="Largest message, in bytes (nsqd `--max-msg-size`).")
    max_body_size: int = Field(
        5242880, ge=1, le=1073741824, description="Largest `/mpub` body, in bytes (nsqd `--max-body-size`).")
    publish_timeout: float = Field(5.0, ge=0.1, le=600, description="Seconds to wait for nsqd's OK before a 503.")
    processes: int = Field(
        1, ge=1, le=64,
        description="Gateway processes sharing the port (SO_REUSEPORT; supervisord `numprocs`); a rate limit"
                    " applies per process.")


class AuthSpec(_Spec):
    """`pipeline auth-server`: nsqd's `--auth-http-address`, answering from the topology.

    Each stage and producer (and `gateway`, `tail`) is an identity with a secret: a stage may subscribe to its
    input channel and publish to its outputs and its dead-letter topic; a producer may publish to its topic.
    """

    http: Address = Field(description="HTTP address of the auth server (nsqd `--auth-http-address`).")
    ttl: int = Field(3600, ge=1, le=86400, description="Seconds nsqd may cache an answer.")
    secrets: dict[LocalName, SecretSpec] = Field(
        default_factory=dict,
        description="Secret of each identity by stage or producer name; unlisted ones read the environment"
                    " variable `NSQ_SECRET_<NAME>` (upper case, `-` as `_`).")


class TlsSpec(_Spec):
    """TLS between every client and nsqd (nsqd's `--tls-*` flags; clients verify nsqd against `root_ca_file`).

    Paths are relative to the topology file.
    """

    cert: str = Field(min_length=1, description="nsqd's certificate (nsqd `--tls-cert`).")
    key: str = Field(min_length=1, description="nsqd's private key (nsqd `--tls-key`).")
    root_ca_file: str = Field(
        min_length=1, description="CA that signed the certificates; clients verify nsqd with it, nsqd verifies"
                                  " clients with it (nsqd `--tls-root-ca-file`).")
    required: bool = Field(
        True, description="Refuse TCP clients that do not upgrade to TLS (nsqd `--tls-required=tcp-https`; the"
                          " plain HTTP port, on loopback, stays usable for stats and topic creation).")
    client_auth_policy: Literal["none", "require", "require-verify"] = Field(
        "none", description="Client certificates nsqd asks for (nsqd `--tls-client-auth-policy`).")
    min_version: Literal["tls1.2", "tls1.3"] = Field(
        "tls1.2", description="Oldest TLS version nsqd accepts (nsqd `--tls-min-version`).")
    client_cert: str | None = Field(None, description="Certificate the pipeline's clients present to nsqd.")
    client_key: str | None = Field(None, description="Private key of `client_cert`.")


class Topology(_Spec):
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
            for key, output in zip(keys, stage.output_topics.values()):
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
        _raise_problems("Topology", problems)
        return self

    def _metrics_port_rules(self) -> Problems:
        """Replicas' metrics ports (base + k) must not collide with another stage's or with NSQ's."""
        taken = {split_address(a)[1]: f"nsq.{'.'.join(map(str, loc))}" for loc, a in self.nsq._addresses()}
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
        _raise_problems("Topology", problems)
        return self

    def identities(self) -> list[str]:
        """The names nsqd's auth knows: every stage and producer, plus ``gateway`` and ``tail``."""
        return [*self.stages, *(p for p in self.producers if p not in self.stages), "gateway", "tail"]

    def _keyed_rules(self, name: str, stage: StageSpec) -> Problems:
        topic = self.topics.get(stage.input)
        if topic is None:
            return []
        if not stage.keyed:
            if topic.partitions > 1:
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

    def physical_topics(self, topic: str) -> list[str]:
        """The NSQ topics behind ``topic``: ``<topic>.<k>`` per partition, or the topic itself."""
        spec = self.topics.get(topic)
        if spec is None or spec.partitions == 1:
            return [topic]
        return [f"{topic}.{k}" for k in range(spec.partitions)]

    def input_topic(self, stage_name: str, replica: int) -> str:
        """The NSQ topic replica ``replica`` of a stage consumes (its partition, for a keyed stage)."""
        stage = self.stage(stage_name)
        topics = self.physical_topics(stage.input)
        return topics[replica] if stage.keyed and len(topics) > 1 else topics[0]

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


def _num(value: float) -> str:
    """Format a number the way the user most likely wrote it: 60.0 as 60, 0.5 as 0.5."""
    return format(value, "g")


# --- loading: YAML with positions, pydantic errors as TopologyError ---------------------------

Loc = tuple[str, ...]


@dataclass
class _Positions:
    """Where each key and value of a YAML document starts (1-based line, col), by field path."""

    root: tuple[int, int] = (1, 1)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[tuple[Loc, str]] = field(default_factory=list)

    def locate(self, loc: Loc, *, at_key: bool = False) -> tuple[int, int]:
        """Return the position of ``loc``, else of the key of its nearest ancestor in the file."""
        table = self.keys if at_key else self.values
        if loc in table:
            return table[loc]
        for end in range(len(loc) - 1, 0, -1):
            if loc[:end] in self.keys:
                return self.keys[loc[:end]]
        return self.root


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(node: yaml.Node, path: Loc, positions: _Positions, stack: tuple[int, ...] = ()) -> None:
    """Record the position of every key and value under ``node`` and note duplicate keys."""
    if id(node) in stack:  # a recursive alias; the validator reports it
        return
    stack = (*stack, id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            loc = (*path, str(i))
            positions.keys[loc] = positions.values[loc] = _mark(item)
            _walk(item, loc, positions, stack)
    elif isinstance(node, yaml.MappingNode):
        first_seen: dict[str, int] = {}
        for key, value in node.value:
            # Merge keys (<<) splice in another mapping; its keys are reported at the parent.
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            loc = (*path, key.value)
            if key.value in first_seen:
                reason = f"duplicate key {key.value!r} (first defined at line {first_seen[key.value]})"
                positions.duplicates.append((loc, reason))
            else:
                first_seen[key.value] = _mark(key)[0]
            positions.keys[loc], positions.values[loc] = _mark(key), _mark(value)
            _walk(value, loc, positions, stack)


def _parse(text: str) -> tuple[Any, _Positions]:
    """Parse one YAML document into plain data and the positions of its nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        positions = _Positions()
        if node is not None:
            positions.root = _mark(node)
            # Walk before constructing: construction flattens merge keys in place.
            _walk(node, (), positions)
        return (loader.construct_document(node) if node is not None else None), positions
    finally:
        loader.dispose()


_REASONS = {
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "greater_than": "must be > {gt}",
    "less_than": "must be < {lt}",
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "must be an integer"),
    **dict.fromkeys(("float_type", "float_parsing"), "must be a number"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "must be true or false"),
    **dict.fromkeys(("dict_type", "model_type", "model_attributes_type"), "must be a mapping"),
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "missing": "required field is missing",
    "list_type": "must be a list",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "recursion_loop": "must not contain itself",
}


def _reason(error: dict[str, Any]) -> str:
    """Turn one pydantic error into a short, human-readable reason."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        model = _model_at(error["loc"][:-1])
        allowed = ", ".join(f.alias or n for n, f in model.model_fields.items()) if model is not None else "?"
        return f"unknown field; expected one of: {allowed}"
    if kind == "literal_error":
        return "must be one of: " + ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
    if kind in _REASONS:
        return _REASONS[kind].format(**ctx)
    msg = error["msg"]
    return msg if kind == "topology" else msg[:1].lower() + msg[1:]


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from a type annotation."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or type(annotation).__name__ == "UnionType":
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Return the model class that validates the value at ``loc`` in a topology, if any."""
    annotation: Any = Topology
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model_field = annotation.model_fields.get(str(part))
            if model_field is None:
                return None
            annotation = model_field.annotation
        else:  # list[X] or dict[str, X]: the part is an index or a key
            args = get_args(annotation)
            annotation = args[-1] if args else None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _to_topology_error(shown: str, positions: _Positions, error: dict[str, Any]) -> TopologyError:
    loc = tuple(str(part) for part in error["loc"])
    on_key = error["type"] == "extra_forbidden" or loc[-1:] == ("[key]",)
    if loc[-1:] == ("[key]",):
        loc = loc[:-1]
    line, col = positions.locate(loc, at_key=on_key)
    return TopologyError(shown, line, col, ".".join(loc), _reason(error))


@dataclass
class _Outcome:
    """What loading a file gave: a topology, or else the problems (at least one) and their cause."""

    topology: Topology | None
    problems: list[TopologyError]
    cause: BaseException | None = None


def _read(shown: str) -> tuple[dict[str, Any], _Positions]:
    """Read and parse the file into a mapping and its positions.

    Raises:
        TopologyError: the file cannot be read, is not YAML, or is not a mapping.
    """
    try:
        data, positions = _parse(Path(shown).read_text(encoding="utf-8"))
    except OSError as e:
        raise TopologyError(shown, 0, 0, "", f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TopologyError(shown, 0, 0, "", "cannot read: not UTF-8 text") from e
    except yaml.YAMLError as e:
        raise _yaml_error(shown, e) from e
    except RecursionError as e:  # PyYAML and our position walk recurse once per nesting level
        raise TopologyError(shown, 0, 0, "", "invalid YAML: nested too deeply") from e
    if not isinstance(data, dict):
        what = "the file is empty" if data is None else f"got {type(data).__name__}"
        reason = f"top level must be a mapping with sections nsq, topics, stages, producers; {what}"
        raise TopologyError(shown, *positions.root, "", reason)
    return data, positions


def _yaml_error(shown: str, error: yaml.YAMLError) -> TopologyError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    if problem:
        reason = f"{problem} ({context})" if context else problem
    else:
        reason = str(error).replace("\n", " ")
    return TopologyError(shown, line, col, "", f"invalid YAML: {reason}")


def _load(path: str | os.PathLike[str], environment: bool = False) -> _Outcome:
    """Read, parse and validate a topology file, collecting every problem in file order."""
    shown = os.fspath(path)
    try:
        data, positions = _read(shown)
    except TopologyError as e:
        return _Outcome(None, [e], e.__cause__)
    problems = [TopologyError(shown, *positions.locate(loc, at_key=True), ".".join(loc), reason)
                for loc, reason in positions.duplicates]
    topology, cause = None, None
    try:
        topology = Topology.model_validate(data)
    except ValidationError as e:
        cause = e
        problems += [_to_topology_error(shown, positions, err) for err in e.errors(include_url=False)]
    if environment and topology is not None:  # e.g. the SMTP password's variable: checked where it is needed
        problems += [TopologyError(shown, *positions.locate(loc), ".".join(loc), reason)
                     for loc, reason in environment_problems(topology)]
    if problems:
        return _Outcome(None, sorted(problems, key=lambda p: (p.line, p.col)), cause)
    topology._path = Path(shown)
    return _Outcome(topology, [])


def load_topology(path: str | os.PathLike[str], *, environment: bool = False) -> Topology:
    """Load and validate a topology file.

    Parameters:
        path: the topology file; error messages show it exactly as given.
        environment: also check what the environment must provide (the SMTP password's variable).

    Raises:
        TopologyError: the file cannot be read, is not YAML, or breaks the schema;
            the first problem in file order, as ``PATH:LINE:COL: field: reason``.
    """
    outcome = _load(path, environment)
    if outcome.topology is None:
        raise outcome.problems[0] from outcome.cause
    return outcome.topology


def validate_topology(path: str | os.PathLike[str], *, environment: bool = True) -> list[TopologyError]:
    """Return every problem of a topology file, sorted by line; empty when it is valid.

    Cross-field rules (declared topics, timeouts, channels) are checked once the
    fields they compare are themselves valid.
    """
    return _load(path, environment).problems
