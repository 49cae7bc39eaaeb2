"""The sections of topology.yaml: one pydantic model per section, each field declared once.

Every field carries its type, default, bounds and description; ``pipeline.config.docs``
renders the reference docs from the same declaration, and rules that compare fields
of one section live on its model. The root model is :class:`~pipeline.config.topology.Topology`;
the big picture is in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config.types import (
    DEAD_LETTER_SUFFIX,
    NSQ_NAME_MAX,
    Address,
    ChannelName,
    EnvName,
    HandlerPath,
    LocalName,
    MetricsHost,
    NsqdFlag,
    NsqdName,
    Problems,
    TopicName,
    raise_problems,
)

__all__ = [
    "AuthSpec", "BatchSpec", "Spec", "GatewaySpec", "GatewayTokenSpec", "LookupdSpec", "NsqSpec", "NsqdSpec",
    "DURABILITY_FLAGS", "ProducerSpec", "SecretSpec", "StageSpec", "TlsSpec", "TopicSpec",
]


class Spec(BaseModel):
    """Base of every topology model: unknown keys are errors, values are immutable."""

    # strict: YAML already types its scalars, so "5" for an int or `yes` for a number is a mistake.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class NsqdSpec(Spec):
    """One nsqd broker: its name and the addresses it listens on."""

    name: NsqdName = Field(description="Name of this nsqd; its data lives in `<var_dir>/nsqd/<name>/`.")
    tcp: Address = Field(description="TCP address for producers and consumers (nsqd `--tcp-address`).")
    http: Address = Field(description="HTTP address for /pub, /stats and /ping (nsqd `--http-address`).")
    proxy_tcp: Address | None = Field(
        None, description="Address clients connect to instead of `tcp` (a Toxiproxy listener in a chaos run);"
                          " nsqd registers it with lookupd (`--broadcast-address`, `--broadcast-tcp-port`).")
    args: list[NsqdFlag] = Field(
        default_factory=list, description="Extra nsqd flags, e.g. `[--max-msg-size=2097152]`; they come last and"
                                          " replace a flag of `nsq.durability` of the same name.")

    @property
    def client_tcp(self) -> str:
        """The TCP address clients use: ``proxy_tcp`` when set, else ``tcp``."""
        return self.proxy_tcp or self.tcp


class LookupdSpec(Spec):
    """One nsqlookupd: workers and nsqadmin find the nsqd nodes through it."""

    tcp: Address = Field(description="TCP address nsqd registers with (nsqlookupd `--tcp-address`).")
    http: Address = Field(description="HTTP address consumers query (nsqlookupd `--http-address`).")


#: nsqd's flags for each ``nsq.durability``; docs/RELIABILITY.md states what each keeps across a kill.
#: ``durable``: no message waits in memory, and each topic's and channel's disk queue syncs (fsyncs its
#: data, then writes its read and write positions) after 2,500 reads and writes, or within 200 ms of an
#: unsynced one. nsqd's own 2,500 because fewer cost CPU per record (1,000: up to a quarter more, 100: 2.5
#: times as much in `make bench`'s durable2); 200 ms, not nsqd's 2 s, cost nothing measurable and bound a
#: power loss at a low rate, and a new queue's first sync, ten times tighter.
DURABILITY_FLAGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "durable": ("--mem-queue-size=0", "--sync-every=2500", "--sync-timeout=200ms"),
}
_MEM_QUEUE_SIZE = "--mem-queue-size"


def _flag_name(flag: str) -> str:
    return flag.partition("=")[0]


class NsqSpec(Spec):
    """Where the NSQ cluster is; `pipeline up` starts these processes locally.

    Rules: nsqd names are unique, no address appears twice in the whole section, and with `durability:
    durable` no nsqd's `args` sets `--mem-queue-size` above 0.
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
    durability: Literal["default", "durable"] = Field(
        "default",
        description="How every nsqd keeps its messages. `default`: nsqd's own flags, up to 10,000 messages per"
                    " topic and channel in memory, lost when nsqd is killed (SIGKILL, out of memory)."
                    " `durable`: `" + " ".join(DURABILITY_FLAGS["durable"]) + "`, every message on disk:"
                    " a killed nsqd keeps what it acknowledged but the messages in flight or deferred, at a"
                    " cost in records/s and CPU that `make bench` measures (docs/RELIABILITY.md states both)."
                    " An nsqd's `args` may replace the sync flags, not the memory queue.",
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
        for loc, address in self.addresses():
            where = ".".join(str(p) for p in ("nsq", *loc))
            if address.lower() in seen:
                problems.append((loc, f"address {address} is already used by {seen[address.lower()]}", address))
            seen.setdefault(address.lower(), where)
        problems += self._durability_conflicts()
        raise_problems("NsqSpec", problems)
        return self

    def _durability_conflicts(self) -> Problems:
        """An nsqd flag that would keep messages in memory under ``durability: durable``."""
        if self.durability == "default":
            return []
        return [(("nsqd", i, "args", j), f"{flag} keeps messages in memory, against durability: {self.durability}"
                 " (--mem-queue-size=0); remove it, or set nsq.durability: default", flag)
                for i, node in enumerate(self.nsqd) for j, flag in enumerate(node.args)
                if _flag_name(flag) == _MEM_QUEUE_SIZE and flag != f"{_MEM_QUEUE_SIZE}=0"]

    def nsqd_flags(self, node: NsqdSpec) -> list[str]:
        """The flags of ``node`` beyond its addresses: its durability profile's, then its own ``args``.

        A flag in ``args`` replaces the profile's flag of the same name (e.g. a stricter ``--sync-every``).
        """
        own = {_flag_name(flag) for flag in node.args}
        return [*(f for f in DURABILITY_FLAGS[self.durability] if _flag_name(f) not in own), *node.args]

    def addresses(self) -> list[tuple[tuple[Any, ...], str]]:
        """Every address of the section with its place in it, e.g. ``(("nsqd", 0, "tcp"), "127.0.0.1:4150")``."""
        found: list[tuple[tuple[Any, ...], str]] = []
        sections: tuple[tuple[str, Sequence[NsqdSpec | LookupdSpec]], ...] = (
            ("nsqd", self.nsqd), ("lookupd", self.lookupd))
        for section, nodes in sections:
            for i, node in enumerate(nodes):
                found += [((section, i, "tcp"), node.tcp), ((section, i, "http"), node.http)]
                proxy_tcp = getattr(node, "proxy_tcp", None)
                if proxy_tcp is not None:
                    found.append(((section, i, "proxy_tcp"), proxy_tcp))
        if self.admin is not None:
            found.append((("admin",), self.admin))
        return found


class TopicSpec(Spec):
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

    replication: int = Field(
        1, ge=1, le=3,
        description="Copies of every message, each on its own nsqd: 2 survives an nsqd SIGKILL. Producers and"
                    " stages publish each message to that many nodes and count it published only when every"
                    " copy was acknowledged; the stage reading the topic applies a record once (a keyed stage"
                    " drops a repeated `seq`, a plain one a message it has seen in its `dedup_window`)."
                    " Needs as many nsqd; see docs/ARCHITECTURE.md, \"Replicated topics\".",
    )
    keep: int | None = Field(
        100_000, ge=1,
        description="A topic no stage reads: the most messages its durable channel `keep` holds, per nsqd and"
                    " partition (`pipeline up` creates it, so an `nsq_tail` or `pipeline tail` only reads copies);"
                    " `pipeline monitor` removes the oldest beyond it every `interval`. null: keep every message"
                    " (each stays on nsqd's disk until read). Ignored on a topic a stage reads.",
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
            raise_problems("TopicSpec", [(("partitions",), reason, self.partitions)])
        return self


class BatchSpec(Spec):
    """How a stage groups messages: up to `size` messages or `wait_ms`, whichever comes first."""

    size: int = Field(256, ge=1, le=10000, description="Most messages handed to the handler in one call.")
    wait_ms: int = Field(5, ge=0, le=60000, description="Longest wait, in milliseconds, for a batch to fill.")


class StageSpec(Spec):
    """One stage: a batch function reading one topic through one channel and publishing to its outputs.

    Rules: input and outputs are declared topics; outputs do not include the input;
    `batch.size <= max_in_flight`; `publish_timeout < msg_timeout`; two stages on the
    same input use different channels; `<input>.dead` is a valid topic name.
    """

    handler: HandlerPath = Field(
        description="Import path of the batch function or stage class, found from the topology's folder, then"
                    " `PYTHONPATH`; `pipeline check` imports it as the worker does.")
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
    crash_tries: int = Field(
        2, ge=1, le=100,
        description="Worker deaths (a segfault, `os._exit`, an OOM kill) inside a handler call holding a message"
                    " before that message is dead-lettered to `<input>.dead` without running again, its reason"
                    " naming the deaths and the last one's cause (`worker died 2 times while processing it (last:"
                    " SIGSEGV)`). After the first death it runs alone, and one death at least must be while it ran"
                    " alone, so no message pays for a batch-mate's crash. `max_tries` cannot count these: the"
                    " worker does not live to. Each replica notes the ids in its handler's hands in"
                    " `<var_dir>/state/crash/`.",
    )
    dead_keep: int | None = Field(
        None, ge=1,
        description="The most dead letters the `keep` channel of `<input>.dead` holds, per nsqd; `pipeline"
                    " monitor` removes the oldest beyond it. null: every letter, until re-driven or purged.",
    )
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
    dedup_window: int = Field(
        200_000, ge=1000, le=10_000_000,
        description="A plain stage reading a replicated topic: the messages each replica remembers (a 64-bit"
                    " digest of the body, ~60 bytes each, checkpointed every second) so the second copy of one"
                    " is finished without running the handler. A copy that comes later than this many messages"
                    " after its twin is applied again (a duplicate downstream, never a loss).",
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
    def gap_wait_ms(self) -> int:
        """How long a keyed stage waits for a missing ``seq``."""
        return self.gap_max_ms if self.gap_max_ms is not None else int(self.msg_timeout * 2000) + 10000

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
        raise_problems("StageSpec", problems)
        return self


class ProducerSpec(Spec):
    """One producer (`pipeline produce NAME`): where it publishes and how fast."""

    topic: TopicName = Field(description="Declared topic the producer publishes to.")
    chunk: int = Field(500, ge=1, le=10000, description="Messages per MPUB.")
    rate: float = Field(0.0, ge=0, description="Messages per second; 0 means as fast as nsqd accepts them.")


class SecretSpec(Spec):
    """Where a secret comes from: an environment variable, or a file only its owner may read (mode 0600).

    Rules: exactly one of `env` and `file`.
    """

    env: EnvName | None = Field(
        None, description="Environment variable holding the secret.")
    file: str | None = Field(
        None, min_length=1,
        description="File holding the secret (relative to the topology file); refused unless its mode is 0600 or"
                    " stricter.")

    @model_validator(mode="after")
    def _check_one(self) -> SecretSpec:
        if (self.env is None) == (self.file is None):
            raise_problems("SecretSpec", [((), "give exactly one of env and file", None)])
        return self


class GatewayTokenSpec(Spec):
    """One bearer token of `pipeline gateway`: which topics it may publish to, and how fast."""

    secret: SecretSpec = Field(description="Where the token comes from (`Authorization: Bearer <token>`).")
    topics: list[TopicName] = Field(min_length=1, description="Declared topics this token may publish to.")
    rate: float = Field(0.0, ge=0, description="Messages per second allowed to this token; 0: no limit.")
    burst: int = Field(0, ge=0, description="Messages above the rate allowed at once (default: one second's worth).")


class GatewaySpec(Spec):
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


class AuthSpec(Spec):
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


class TlsSpec(Spec):
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



def _num(value: float) -> str:
    """Format a number the way the user most likely wrote it: 60.0 as 60, 0.5 as 0.5."""
    return format(value, "g")

