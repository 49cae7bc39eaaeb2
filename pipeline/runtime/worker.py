"""The worker runtime: one replica of one stage, from subscribe to drain (docs/ARCHITECTURE.md).

The runtime, not the stage, owns acknowledgement (ARCHITECTURE.md, "The stage
contract"). For every batch it:

1. collects up to ``batch.size`` messages or waits ``batch.wait_ms``;
2. decodes them; an undecodable message becomes a dead letter;
3. runs the handler once over the batch; when it raises, runs it again record
   by record so one bad record cannot hold the others back: a record that
   still fails is requeued with backoff, or dead-lettered once it has had
   ``max_tries`` attempts;
4. publishes every output and dead letter (MPUB per topic) and waits for
   nsqd's OK, with a deadline shorter than the message timeout;
5. only then FINs the inputs. A failed publish requeues them at once.

So a crash anywhere may duplicate a record downstream but never loses one.
The :class:`Worker` owns the lifecycle (start, subscribe, drain, stop) and
the plain path; :mod:`.batcher` makes the batches, :mod:`.keyed_path` takes a
keyed stage's batches through its ordered commits, and :mod:`.acks` answers
the messages.

Example::

    from pipeline.config import load_topology
    from pipeline.runtime.worker import Worker

    exit_code = Worker(load_topology("topology.yaml"), "primes").run()
"""
from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from typing import Any

from pipeline.client import nsqd_http
from pipeline.client.fastclient import FastReader
from pipeline.client.publisher import Publisher
from pipeline.config import Topology
from pipeline.config.security import client_options
from pipeline.errors import PublishError
from pipeline.middleware import Middleware, MiddlewareStack
from pipeline.records import jit
from pipeline.runtime.acks import Acks
from pipeline.runtime.batcher import Batcher
from pipeline.runtime.dedup import Deduper
from pipeline.runtime.keyed import Checkpoint
from pipeline.runtime.keyed_path import KeyedPath, new_sequencer
from pipeline.runtime.keyed_processing import KeyedProcessor
from pipeline.runtime.middleware import faultpoints, gctuning
from pipeline.runtime.middleware.gctuning import GcTuning
from pipeline.runtime.middleware.metrics import WorkerMetrics
from pipeline.runtime.processing import BatchProcessor, Dead, ProcessingContext
from pipeline.runtime.quarantine import Quarantine
from pipeline.runtime.results import FailureLog
from pipeline.stage import Handler, StageContext, load_handler

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0


class Worker:
    """Runs one replica of a stage until SIGTERM, then drains and exits 0.

    Parameters:
        topology: the loaded topology.
        stage_name: the stage to run.
        replica: this replica's number (for logs and metrics).
        middleware: extra middleware, run in order.
        handler: the stage function; default: imported from the topology.
    """

    def __init__(self, topology: Topology, stage_name: str, *, replica: int = 0,
                 middleware: Iterable[Middleware] = (), handler: Handler | None = None):
        self.topology = topology
        self.name = stage_name
        self.spec = topology.stage(stage_name)
        self.replica = replica
        self.handler = handler or load_handler(self.spec.handler, StageContext(
            stage_name, replica, topology.var_dir, dict(self.spec.params)))
        self.middleware = MiddlewareStack([*middleware, *faultpoints.from_environment()])
        if (metrics := WorkerMetrics.for_replica(self.spec, stage_name, replica)) is not None:
            self.middleware.add(metrics)
        self.middleware.add(GcTuning())
        self.input_topic = topology.input_topic(stage_name, replica)
        self.stats: Counter[str] = Counter()
        self.failures = FailureLog(stage_name, self.handler)
        self.draining = False
        self.reader: FastReader = None  # type: ignore[assignment]  # None until start(); used only after it
        self.publisher: Publisher = None  # type: ignore[assignment]  # None until start(); used only after it
        self._active: set[asyncio.Future] = set()
        self._done: asyncio.Event = None  # type: ignore[assignment]  # None until start(); used only after it
        self._close_waits: set[str] = set()
        # What the handler holds, so a message that kills its worker runs alone, then is dead-lettered.
        self.quarantine = Quarantine(topology.var_dir / "state" / "crash", stage_name, replica, self.spec.crash_tries)
        context = ProcessingContext(stage_name, self.spec, topology, self.handler, self.middleware, self,
                                    self._on_handler_error, self.quarantine)
        # A keyed stage's batches take the keyed path (handler in order, commits in order); others the plain one.
        self.keyed: KeyedPath | None = None
        if self.spec.keyed:
            source = topology.topics[self.spec.input]
            keyed = KeyedProcessor(context, key_field=source.key,  # type: ignore[arg-type]  # checked: _keyed_rules
                                   seq_field=source.seq, sequencer=new_sequencer(self.spec))
            self.processor: BatchProcessor = keyed
        else:
            self.processor = BatchProcessor(context)
        self.acks = Acks(self, self.processor, self.stats, topology.dead_letter_topic(stage_name), self.middleware)
        if self.spec.keyed:
            checkpoint = Checkpoint(topology.var_dir / "state" / f"{stage_name}-{replica}.ckpt")
            self.keyed = KeyedPath(self, keyed, checkpoint, self.acks, self._spawn)
        # A plain stage on a replicated topic gets both copies of each message: it applies one.
        self.dedup: Deduper | None = None
        if not self.spec.keyed and topology.copies(self.spec.input) > 1:
            self.dedup = Deduper(self.spec.dedup_window, topology.var_dir / "state" / f"{stage_name}-{replica}.seen")
        dispatch = self.keyed.take if self.keyed is not None else self._start_batch
        self.batcher = Batcher(self.spec.batch.size, self.spec.batch.wait_ms, dispatch)

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code (0 after a clean drain)."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        await self.start()
        self.quarantine.catch_fatal_signals()  # this process is the worker: faulthandler names its fatal signal
        if jit.deferred():
            # Until then the kernels' plain-Python twins do the work; numba's heap is then frozen like the rest.
            jit.load_in_background(on_loaded=gctuning.refreeze)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self._done.wait()
        return 0 if self.stats["drain_timeouts"] == 0 else 1

    async def start(self) -> None:
        """Connect the publisher, then subscribe; return once consuming has begun."""
        self._done = asyncio.Event()
        spec = self.spec
        self.quarantine.open()  # first: what a dead predecessor held is journaled before anything is received
        if self.keyed is not None:
            self.keyed.start()
        await asyncio.to_thread(nsqd_http.create_channel_on_nodes, self.topology.nsqd_http_addresses(),
                                self.input_topic, spec.channel)
        secure = client_options(self.topology, self.name)  # auth secret and TLS, when the topology has them
        # a keyed stage keeps each output topic on one nsqd while it is up: one key's records stay in order
        placement = functools.partial(self.topology.placement, sticky=spec.keyed)
        self.publisher = Publisher(self.topology.nsqd_tcp_addresses(), placement=placement, stats=self.stats,
                                   **secure)
        await self.publisher.wait_connected(CONNECT_TIMEOUT)
        self.reader = FastReader(
            topic=self.input_topic, channel=spec.channel, batch_handler=self._on_messages,
            max_in_flight=spec.max_in_flight, max_tries=0,  # 0: we dead-letter; pynsq would FIN and drop
            max_backoff_duration=spec.max_backoff_duration, msg_timeout=spec.msg_timeout,
            output_buffer_timeout=spec.output_buffer_timeout, output_buffer_size=spec.output_buffer_size,
            **self._discovery(), **secure)
        self.middleware.emit_before("after_worker_boot", self)
        log.info("stage %s replica %d consuming %s/%s", self.name, self.replica, self.input_topic, spec.channel)

    def _discovery(self) -> dict:
        lookupds = self.topology.lookupd_http_addresses()
        if lookupds:
            # The nsqd the topology names too: a restarted nsqlookupd learns of an nsqd only
            # at its next ping (up to 30 s), and a worker started meanwhile would wait for it.
            return {"lookupd_http_addresses": lookupds, "nsqd_tcp_addresses": self.topology.nsqd_tcp_addresses(),
                    "lookupd_poll_interval": self.topology.nsq.lookupd_poll_interval}
        return {"nsqd_tcp_addresses": self.topology.nsqd_tcp_addresses()}

    def stop(self) -> None:
        """Begin draining (safe to call more than once, e.g. from a signal handler)."""
        if not self.draining:
            asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """RDY 0, finish the batches in hand, requeue the rest, close cleanly.

        Messages received but not started are requeued at once so other
        replicas get them now rather than after the message timeout.
        """
        if self.draining:
            return
        self.draining = True
        log.info("stage %s replica %d draining", self.name, self.replica)
        self.middleware.emit_before("before_worker_shutdown", self)
        self._stop_subscribing()
        pending = self.batcher.take_all()
        if self.keyed is not None:
            self.keyed.stop_gap_checks()
        self.acks.requeue_now(pending)
        deadline = time.monotonic() + self.spec.publish_timeout + 2.0
        if self.keyed is not None:
            self.keyed.commits.checkpoint_now()  # no waiting for the checkpoint interval now
        await self._wait_for_batches(deadline - 1.0)
        await self._await_close_wait(deadline)
        await self._flush_connections()
        if self._busy():
            self.stats["drain_timeouts"] += 1
        # pynsq reports our own close as a broken frame read on every connection
        logging.getLogger("nsq").setLevel(logging.CRITICAL)
        self.reader.close()
        self.publisher.close()
        if self.keyed is not None:
            self.keyed.close()
        if self.dedup is not None:
            self.dedup.checkpoint(force=True)
        self.quarantine.close()
        log.info("stage %s replica %d stopped: %s", self.name, self.replica, dict(self.stats))
        self._done.set()

    def _busy(self) -> bool:
        """Whether a batch is still in hand: a task runs, or a keyed commit is not done."""
        return bool(self._active) or (self.keyed is not None and not self.keyed.commits.done.is_set())

    async def _wait_for_batches(self, deadline: float) -> None:
        # Tasks may start others (a gap check applies a keyed batch), so wait until none is left.
        done = self.keyed.commits.done if self.keyed is not None else None
        while self._busy() and time.monotonic() < deadline:
            waits = [*self._active, *([asyncio.ensure_future(done.wait())] if done is not None else [])]
            await asyncio.wait(waits, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED)
            if done is not None:
                waits[-1].cancel()

    def _stop_subscribing(self) -> None:
        reader = self.reader
        reader.set_max_in_flight(0)
        for periodic in (reader.redist_periodic, reader.query_periodic):
            if periodic is not None:
                periodic.stop()
        for conn in list(reader.conns.values()):
            conn.on("response", self._on_response)
            try:
                conn.send(b"CLS\n")
            except Exception:
                log.warning("CLS to %s failed; nsqd will requeue its in-flight messages", conn.id)

    def _on_response(self, conn, data, **_: Any) -> None:
        if data == b"CLOSE_WAIT":
            self._close_waits.add(conn.id)

    async def _await_close_wait(self, deadline: float) -> None:
        # Messages nsqd sent before it saw CLS arrive ahead of CLOSE_WAIT and are
        # requeued by _on_messages; after CLOSE_WAIT nothing more comes.
        while time.monotonic() < deadline:
            if all(cid in self._close_waits for cid in self.reader.conns):
                return
            await asyncio.sleep(0.01)

    async def _flush_connections(self) -> None:
        # IOStream.close() drops unwritten data, so wait until every FIN/REQ is on the wire.
        writes = []
        for conn in list(self.reader.conns.values()):
            try:
                writes.append(conn.send(b"NOP\n"))
            except Exception:
                continue
        if writes:
            await asyncio.wait([asyncio.ensure_future(w) for w in writes], timeout=2.0)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Future:
        """Run ``coroutine`` as a task a drain waits for."""
        task = asyncio.ensure_future(coroutine)
        self._active.add(task)
        task.add_done_callback(self._active.discard)
        return task

    # -- receiving ---------------------------------------------------------

    def _on_messages(self, messages: list) -> None:
        """Take the messages of one read from nsqd (FastMessages: asynchronous, answered after their batch)."""
        if self.middleware.implements("after_receive"):  # once per read, not per message
            for message in messages:
                self.middleware.emit_before("after_receive", self, message)
        if self.draining:
            self.acks.requeue_now(messages)
            return
        self.batcher.add(messages)

    def _on_handler_error(self, count: int, error: BaseException) -> None:
        """A handler call raised ``error``, or returned a bad result (a StageOutputError): count and log it."""
        self.stats["handler_errors"] += 1
        self.failures.report(count, error)

    # -- the plain path: handler, publish, then FIN --------------------------

    def _start_batch(self, messages: list) -> None:
        self._spawn(self._process(messages))

    async def _process(self, messages: list) -> None:
        """Run one batch through handler, publish and acknowledgement (stages without keyed state)."""
        self.stats["batches"] += 1
        self.stats["received"] += len(messages)
        if self.dedup is not None:
            messages = self._take_copies(messages)
        try:
            await self._run_batch(messages)
        except Exception:
            # A bug of ours, not of the stage: give the messages back now rather
            # than leave them to the message timeout.
            log.critical("stage %s: batch of %d messages failed in the runtime; requeueing",
                         self.name, len(messages), exc_info=True)
            self.acks.requeue_now(messages)
            if self.dedup is not None:
                self._settle_copies(messages, ())

    def _take_copies(self, messages: list) -> list:
        """A replicated input: finish copies of bodies taken already; return the batch's first copies."""
        leads, seen = self.dedup.admit(messages)  # type: ignore[union-attr]  # called with a deduper only
        if seen:
            self.acks.finish_copies(seen)
        return leads

    def _settle_copies(self, leads: list, finished, dead: Iterable[Dead] = ()) -> None:
        """Answer the copies that waited for ``leads`` as their leads were answered (a whole message
        dead-lettered is not remembered: its letter may be re-driven, with the same bytes)."""
        dedup = self.dedup
        lost = [d.message for d in dead if d.index is None]
        finish, requeue = dedup.settle(leads, finished, lost)  # type: ignore[union-attr]  # with a deduper only
        if finish:
            self.acks.finish_copies(finish)
        if requeue:
            self.acks.requeue_now(requeue)
        dedup.checkpoint()  # type: ignore[union-attr]

    async def _run_batch(self, messages: list) -> None:
        if not messages:
            return
        acks = self.acks
        outcome = self.processor.process(messages)
        for message in outcome.retry:
            acks.requeue_backoff(message)
        outputs = acks.outputs(outcome)
        acks.before_publish(outputs)
        try:
            await self.publisher.publish(outputs, self.spec.publish_timeout)
        except PublishError as e:
            acks.publish_failed(outputs, len(outcome.finish), e)
            acks.requeue_now(outcome.finish)
            if self.dedup is not None:
                self._settle_copies(messages, ())
            return
        acks.published(outputs)
        acks.finish(outcome.finish, outcome.retry)
        if self.dedup is not None:
            self._settle_copies(messages, outcome.finish, outcome.dead)
