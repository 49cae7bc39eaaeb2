"""Run a stage in-process with the runtime's own rules: decode, validate, call, reject, retry, encode.

:class:`StageRunner` is one replica of a stage without NSQ: it encodes records as
messages of the stage's input topic (one record each, or envelopes with ``pack``)
and hands them, in batches, to the worker's own
:class:`~pipeline.runtime.processing.BatchProcessor` (a keyed stage's
:class:`~pipeline.runtime.keyed_processing.KeyedProcessor`, with its sequencer).
So an undecodable message or a rejected record becomes the dead letter the worker
would publish; a batch whose handler raises runs again message by message; a
message that keeps failing comes back with one more attempt, as nsqd redelivers
it, until ``max_tries``; the outputs are encoded as the worker publishes them and
decoded as a consumer reads them. Example::

    from pipeline.testing import run_stage
    from mystages import classify

    run = run_stage(classify, [{"n": 7}, {"n": "x"}], outputs=["even", "odd"])
    assert run.outputs["odd"] == [{"n": 7, "even": False}]
    assert run.dead == [({"n": "x"}, "field 'n' must be an integer")]
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from pipeline.config import Topology, load_topology
from pipeline.errors import DecodeError
from pipeline.middleware import Middleware, MiddlewareStack
from pipeline.records import envelope
from pipeline.records.codecs import decode, encoder
from pipeline.records.deadletter import raw_body
from pipeline.runtime.keyed import Checkpoint
from pipeline.runtime.keyed_path import new_sequencer
from pipeline.runtime.keyed_processing import KeyedProcessor
from pipeline.runtime.processing import BatchProcessor, Outcome, ProcessingContext
from pipeline.stage import Columns, Handler, Record, StageContext, load_handler

#: A stage as the helpers take it: a function, a stage class (built with a :class:`StageContext`),
#: a built stage, or a handler path (``"mystages:classify"``).
StageLike = Callable[..., Any] | str


class Message:
    """An NSQ message as the runtime reads one: its body, 16-byte id and delivery attempts."""

    __slots__ = ("attempts", "body", "id")

    def __init__(self, body: bytes, id: bytes, attempts: int = 1):
        self.body, self.id, self.attempts = body, id, attempts


class DeadRecord(NamedTuple):
    """A dead letter: the record it carries (the raw body when it is undecodable) and the reason."""

    record: Record | bytes
    reason: str


@dataclass
class StageRun:
    """What a stage did with the records fed to it.

    Parameters:
        outputs: output name -> the records published to its topic, as a consumer decodes them.
        topics: physical topic -> its records (a partitioned output's partitions apart).
        dead: the dead letters, in the order the worker publishes them.
        retried: the records of every message requeued because the handler raised (once per requeue).
        errors: what the handler raised, in order.
        batches: handler batches processed (redeliveries included).
        columnar: batches the stage's columnar function took (see :mod:`pipeline.stage`).
        duplicates, parked: a keyed stage's records dropped as repeats, and parked ahead of a gap so far.
    """

    outputs: dict[str, list[Record]] = field(default_factory=dict)
    topics: dict[str, list[Record]] = field(default_factory=dict)
    dead: list[DeadRecord] = field(default_factory=list)
    retried: list[Record | bytes] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    batches: int = 0
    columnar: int = 0
    duplicates: int = 0
    parked: int = 0


def stage_topology(name: str, *, input: str = "input", outputs: Sequence[str] | Mapping[str, str] = (),
                   codec: str = "json", pack: int = 1, key: str | None = None, seq: str = "seq",
                   topics: Mapping[str, Mapping[str, Any]] | None = None, max_tries: int = 5) -> Topology:
    """A one-stage topology for a stage run in-process: its input, its outputs, nothing else.

    Parameters:
        key: the input's key field: the stage is keyed (records applied per key in ``seq`` order, once).
        topics: topic name -> options over the defaults (``{"prime": {"pack": 100}}``), as in topology.yaml.

    Raises:
        ValueError: the options break the topology's rules (a bad name, a pack out of bounds, ...).
    """
    source: dict[str, Any] = {"codec": codec, "pack": pack, **({"key": key, "seq": seq} if key else {})}
    declared: dict[str, dict[str, Any]] = {input: source}
    out = dict(outputs) if isinstance(outputs, Mapping) else list(outputs)
    for topic in (out.values() if isinstance(out, dict) else out):
        declared.setdefault(topic, {})
    for topic, options in (topics or {}).items():
        declared[topic] = {**declared.get(topic, {}), **options}
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:4150", "http": "127.0.0.1:4151"}]},
           "topics": declared,
           "stages": {name: {"handler": "pipeline.testing:stage", "input": input, "channel": name, "outputs": out,
                             "keyed": key is not None, "max_tries": max_tries}}}
    try:
        return Topology.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"stage {name!r} cannot run with these options: {problems}") from None


def build_stage(stage: StageLike, context: StageContext) -> Handler:
    """The handler of ``stage``: a class built with ``context``, a handler path imported, else ``stage`` itself.

    Raises:
        ValueError: params were given for a stage already built (they go to a class).
        HandlerLoadError: a handler path cannot be imported, or the class refuses its params.
    """
    if isinstance(stage, str):
        return load_handler(stage, context)
    if isinstance(stage, type):
        built: Handler = stage(context)
        return built
    if context.params:
        raise ValueError(f"params {dict(context.params)} go to a stage class; {stage!r} is already built")
    return stage


class StageRunner:
    """One replica of a stage in-process: feed it records, read what it published and dead-lettered.

    Build it from a stage and the options of :func:`stage_topology`, or with
    :meth:`of_topology` from a stage of a topology.yaml. :meth:`feed` may be called
    several times: :attr:`result` accumulates, and a stage class's instance
    (:attr:`handler`) keeps its state, as a worker's does between batches.

    Parameters:
        options: :func:`stage_topology`'s (without ``topology``).
        columns: let the stage's columnar function take the batches it can (False: the record path only).
        redeliver: give a requeued message back at once with one more attempt, as nsqd would
            (False: only record it in :attr:`StageRun.retried`).
        var_dir: the ``var_dir`` a stage class is given, for files it keeps.
    """

    def __init__(self, stage: StageLike, *, name: str = "stage", params: Mapping[str, Any] | None = None,
                 topology: Topology | None = None, columns: bool = True, redeliver: bool = True,
                 middleware: Iterable[Middleware] = (), var_dir: Path = Path("var"), **options: Any):
        if topology is not None and options:
            raise ValueError(f"{', '.join(sorted(options))}: the topology declares the stage's topics already")
        self.topology = topology if topology is not None else stage_topology(name, **options)
        self.name, self.spec = name, self.topology.stage(name)
        self.handler = build_stage(stage, StageContext(name, 0, var_dir, dict(params or {})))
        self.redeliver, self.result = redeliver, StageRun()
        context = ProcessingContext(name, self.spec, self.topology, self.handler, MiddlewareStack(list(middleware)),
                                    on_error=lambda count, error: self.result.errors.append(error))
        self.processor: BatchProcessor
        if self.spec.keyed:  # as the worker builds its processor
            source = self.topology.topics[self.spec.input]
            self.processor = KeyedProcessor(context, key_field=source.key or "", seq_field=source.seq,
                                            sequencer=new_sequencer(self.spec))
        else:
            self.processor = BatchProcessor(context)
        self._use_columns(columns)
        self._names: dict[str, list[str]] = {}  # physical topic -> the output names publishing to it
        for out, topic in self.spec.output_topics.items():
            self.result.outputs[out] = []
            for physical in self.topology.physical_topics(topic):
                self._names.setdefault(physical, []).append(out)
        self._ids = itertools.count(1)

    @classmethod
    def of_topology(cls, topology: Topology | str | Path, name: str, *, params: Mapping[str, Any] | None = None,
                    **options: Any) -> StageRunner:
        """The runner of stage ``name`` as ``topology`` (a Topology or its file) declares it: its handler,
        params (``params`` replaces them), input codec and pack, outputs, keys and ``max_tries``."""
        loaded = topology if isinstance(topology, Topology) else load_topology(topology)
        spec = loaded.stage(name)
        return cls(spec.handler, name=name, params=spec.params if params is None else params, topology=loaded,
                   **options)

    def _use_columns(self, columns: bool) -> None:
        found = self.processor.columns_handler
        if found is None:
            return
        if not columns:
            self.processor.columns_handler = None
            if isinstance(self.processor, KeyedProcessor):
                self.processor.columns_atomic = False
            return

        def counted(batch: Columns) -> Any:
            emitted = found(batch)
            self.result.columnar += emitted is not None
            return emitted

        self.processor.columns_handler = counted

    def feed(self, records: Iterable[Record | bytes], batch_size: int | None = None) -> StageRun:
        """Encode ``records`` as messages of the input topic and process them in batches; return :attr:`result`.

        A ``bytes`` item is a message body as it is (to feed a malformed message);
        records between two such items are packed into envelopes when the input
        has ``pack`` above 1. ``batch_size``: messages per batch (default: the stage's ``batch.size``).
        """
        messages = self.messages(records)
        size = batch_size or self.spec.batch.size
        for start in range(0, len(messages), size):
            self.process(messages[start:start + size])
        return self.result

    def messages(self, records: Iterable[Record | bytes]) -> list[Message]:
        """``records`` as the input topic carries them: encoded with its codec, or packed with its ``pack``."""
        topic = self.spec.input
        pack, encode = self.topology.pack_for(topic), encoder(self.topology.codec_for(topic))
        bodies: list[bytes] = []
        run: list[Record] = []
        for item in [*records, b""]:  # the empty body only flushes the last run
            if isinstance(item, (bytes, bytearray)):
                bodies += envelope.pack(run, pack) if pack > 1 else map(encode, run)
                bodies.append(bytes(item))
                run = []
            else:
                run.append(item)
        return [Message(body, b"%016d" % next(self._ids)) for body in bodies[:-1]]

    def process(self, messages: list[Message]) -> None:
        """Process one batch of messages, then each requeued one again until it is finished or dead."""
        while messages:
            outcome = self.processor.process(messages)
            self._collect(outcome)
            for message in outcome.retry:
                self.result.retried += body_records(message.body)
            messages = [Message(m.body, m.id, m.attempts + 1) for m in outcome.retry] if self.redeliver else []

    def _collect(self, outcome: Outcome) -> None:
        result = self.result
        result.batches += 1
        for topic, bodies in outcome.outputs.items():
            records = list(envelope.records_of(map(decode, bodies)))
            result.topics.setdefault(topic, []).extend(records)
            for out in self._names.get(topic, ()):
                result.outputs[out].extend(records)
        for dead in outcome.dead:  # through the dead letter the worker would publish
            body = raw_body(self.processor.dead_letter(dead))
            result.dead.append(DeadRecord(_decoded(body), dead.reason))
        if isinstance(self.processor, KeyedProcessor):
            result.duplicates, result.parked = self.processor.duplicates, self.processor.sequencer.parked_count()

    def state(self) -> bytes | None:
        """The stage's snapshot as of now (None for a stage without ``snapshot``)."""
        snapshot = getattr(self.handler, "snapshot", None)
        return snapshot() if snapshot is not None else None

    def save(self, path: Path) -> None:
        """Write a keyed replica's checkpoint to ``path`` (the sequencer and the stage's state), as a worker does."""
        processor = self._keyed()
        checkpoint = Checkpoint(path)
        try:
            checkpoint.save(processor.sequencer.state(), processor.handler_state())
        finally:
            checkpoint.close()

    def restore(self, path: Path) -> None:
        """Load the checkpoint at ``path`` as a restarted worker does: a new sequencer, the stage's state restored.

        Raises:
            FileNotFoundError: there is no checkpoint at ``path``.
        """
        processor = self._keyed()
        saved = Checkpoint(path).load()
        if saved is None:
            raise FileNotFoundError(f"no checkpoint at {path}")
        processor.sequencer = new_sequencer(self.spec)
        processor.sequencer.restore(saved[0])
        if hasattr(processor.handler, "restore"):
            processor.restore_handler(saved[1])

    def _keyed(self) -> KeyedProcessor:
        if not isinstance(self.processor, KeyedProcessor):
            raise ValueError(f"stage {self.name} is not keyed: only a keyed stage has a checkpoint")
        return self.processor


def make_runner(stage: StageLike, *, outputs: Sequence[str] | Mapping[str, str] | None = None,
                topology: Topology | str | Path | None = None, **options: Any) -> StageRunner:
    """A :class:`StageRunner` of ``stage`` with the options of :func:`run_stage`.

    Raises:
        ValueError: neither ``outputs`` nor ``topology`` is given, or the options are invalid.
    """
    if topology is not None:
        if outputs is not None or not isinstance(stage, str):
            raise ValueError("with topology=, give the stage's name; its outputs come from the topology")
        return StageRunner.of_topology(topology, stage, **options)
    if outputs is None:
        raise ValueError("give outputs=[...], the topics the stage may emit to, or topology=")
    return StageRunner(stage, outputs=outputs, **options)


def run_stage(stage: StageLike, records: Iterable[Record | bytes], *, batch_size: int | None = None,
              **options: Any) -> StageRun:
    """Run ``stage`` over ``records`` in-process with the runtime's own rules; return what it did.

    Parameters:
        stage: a function, a stage class (built with ``params``), a built stage or a handler path;
            with ``topology``, the name of one of its stages.
        records: records (dicts), or ``bytes`` for message bodies fed as they are.
        batch_size: messages per handler batch (default: the stage's ``batch.size``, 256 unless declared).
        options:
            ``outputs``: the topics the stage may emit to, or a mapping from its output names to
            topics (required without ``topology``);
            ``topology``: a topology (or its file) declaring the stage, whose outputs, codecs, pack,
            keys and ``max_tries`` then apply;
            ``params``: a stage class's params (with ``topology``: instead of the declared ones);
            ``input``, ``codec``, ``pack``, ``key`` (a keyed stage), ``seq``, ``topics``, ``max_tries``:
            see :func:`stage_topology`;
            ``name``, ``columns``, ``redeliver``, ``middleware``, ``var_dir``: see :class:`StageRunner`.

    Raises:
        ValueError: neither ``outputs`` nor ``topology`` is given, or the options are invalid.
    """
    return make_runner(stage, **options).feed(records, batch_size)


def body_records(body: bytes) -> list[Record | bytes]:
    """The records a message body carries (an envelope's records); the body itself when it is undecodable."""
    decoded = _decoded(body)
    if isinstance(decoded, dict) and envelope.is_envelope(decoded):
        try:
            return list(envelope.unpack(decoded, body))
        except DecodeError:
            return [body]
    return [decoded]


def _decoded(body: bytes) -> Record | bytes:
    try:
        return decode(body)
    except DecodeError:
        return body
