"""The worker runtime: one replica of one stage, on pynsq and tornado.

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
from typing import Any, Iterable, Sequence


from tornado.ioloop import PeriodicCallback

from pipeline.runtime.middleware import faultpoints

from pipeline.runtime.middleware import gctuning

from pipeline.records import jit

from pipeline.client import nsqd_http
from pipeline.runtime.commits import CommitQueue, KeyedCommit
from pipeline.errors import PublishError
from pipeline.client.fastclient import FastReader
from pipeline.client.fastconn import finish_all
from pipeline.runtime.middleware.gctuning import GcTuning
from pipeline.runtime.middleware.metrics import WorkerMetrics
from pipeline.middleware import Middleware, MiddlewareStack
from pipeline.runtime.keyed import Checkpoint, Sequencer
from pipeline.runtime.processing import BatchProcessor, Dead, KeyedEntry, KeyedProcessor
from pipeline.client.publisher import Publisher
from pipeline.config.security import client_options
from pipeline.stage import Handler, StageContext, load_handler

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
MAX_REQUEUE_DELAY = 3600.0
GAP_CHECK_MS = 100  # how often a keyed stage looks for gaps that waited long enough


class Worker:
    """Runs one replica of a stage until SIGTERM, then drains and exits 0.

    Parameters:
        topology: the loaded topology.
        stage_name: the stage to run.
        replica: this replica's number (for logs and metrics).
        middleware: extra middleware, run in order.
        handler: the stage function; default: imported from the topology.
    """

    def __init__(self, topology, stage_name: str, *, replica: int = 0,
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
        self.dead_topic = topology.dead_letter_topic(stage_name)
        self.input_topic = topology.input_topic(stage_name, replica)
        args = (self, stage_name, self.spec, topology, self.handler, self.middleware)
        self.checkpoint: Checkpoint | None = None
        if self.spec.keyed:
            source = topology.topics[self.spec.input]
            self.checkpoint = Checkpoint(topology.var_dir / "state" / f"{stage_name}-{replica}.ckpt")
            self.processor = KeyedProcessor(*args, on_error=self._on_handler_error, key_field=source.key,
                                            seq_field=source.seq, sequencer=self._new_sequencer())
            self.processor.may_give_up = lambda: self._gaps_may_go
        else:
            self.processor = BatchProcessor(*args, on_error=self._on_handler_error)
        # A keyed stage's batches go through the handler one at a time, in
        # order; their commits (publish OK, then checkpoint, then FIN) follow in
        # the same order, so a checkpoint never holds unpublished effects.
        self._keyed_queue: list = []
        self.commits = CommitQueue(self)
        self._keyed_halted = False  # set after a runtime failure, until the commits rewound the state
        self._gaps_may_go = False  # set while a check found nsqd holding nothing more for the partition
        self._backlog_check: asyncio.Future | None = None
        self._gap_wait_logged = 0.0
        self._gap_timer = None
        self.stats: Counter[str] = Counter()
        self.draining = False
        self.reader: FastReader | None = None
        self.publisher: Publisher | None = None
        self._pending: list = []
        self._timer = None
        self._active: set[asyncio.Future] = set()
        self._done: asyncio.Event | None = None
        self._close_waits: set[str] = set()

    # -- lifecycle ---------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code (0 after a clean drain)."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        await self.start()
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
        if self.checkpoint is not None:
            self._restore_checkpoint()
            self._gap_timer = PeriodicCallback(self._expire_gaps, GAP_CHECK_MS)
            self._gap_timer.start()
        await asyncio.to_thread(nsqd_http.create_channel_on_nodes, self.topology.nsqd_http_addresses(),
                                self.input_topic, spec.channel)
        secure = client_options(self.topology, self.name)  # auth secret and TLS, when the topology has them
        self.publisher = Publisher(self.topology.nsqd_tcp_addresses(), **secure)
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
        self._cancel_timer()
        if self._gap_timer is not None:
            self._gap_timer.stop()
        self._requeue_now(self._take_pending())
        deadline = time.monotonic() + self.spec.publish_timeout + 2.0
        if self.checkpoint is not None:
            self.commits.checkpoint_now()  # no waiting for the checkpoint interval now
        # Tasks may start others (a gap check applies a keyed batch), so wait until none is left.
        while (self._active or not self.commits.done.is_set()) and time.monotonic() < deadline - 1.0:
            waits = [*self._active, asyncio.ensure_future(self.commits.done.wait())]
            await asyncio.wait(waits, timeout=deadline - 1.0 - time.monotonic(), return_when=asyncio.FIRST_COMPLETED)
            waits[-1].cancel()
        await self._await_close_wait(deadline)
        await self._flush_connections()
        if self._active or not self.commits.done.is_set():
            self.stats["drain_timeouts"] += 1
        # pynsq reports our own close as a broken frame read on every connection
        logging.getLogger("nsq").setLevel(logging.CRITICAL)
        self.reader.close()
        self.publisher.close()
        if self.checkpoint is not None:
            self.checkpoint.close()
        log.info("stage %s replica %d stopped: %s", self.name, self.replica, dict(self.stats))
        self._done.set()

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
        # requeued by _on_message; after CLOSE_WAIT nothing more comes.
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

    # -- batching ----------------------------------------------------------

    def _on_messages(self, messages: list) -> None:
        """Take the messages of one read from nsqd (FastMessages: asynchronous, answered after their batch)."""
        if self.middleware.implements("after_receive"):  # once per read, not per message
            for message in messages:
                self.middleware.emit_before("after_receive", self, message)
        if self.draining:
            self._requeue_now(messages)
            return
        pending, size = self._pending, self.spec.batch.size
        pending += messages
        while len(pending) >= size:
            self._cancel_timer()
            self._pending = pending[size:]
            self._flush(pending[:size])
            pending = self._pending
        if pending and self._timer is None:
            if not self.spec.batch.wait_ms:
                self._flush()  # a batch is what this read brought: handled now, its writes leave with the read's
                return
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.spec.batch.wait_ms / 1000.0, self._flush)

    def _take_pending(self) -> list:
        pending, self._pending = self._pending, []
        return pending

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self, messages: list | None = None) -> None:
        """Start processing ``messages``, by default every pending one (the batch timer's call)."""
        if messages is None:
            self._cancel_timer()
            messages = self._take_pending()
        if not messages:
            return
        if self.checkpoint is not None:
            self._keyed_queue += messages
            self._run_keyed()
            return
        self._start(self._process(messages))

    def _start(self, coroutine) -> asyncio.Future:
        task = asyncio.ensure_future(coroutine)
        self._active.add(task)
        task.add_done_callback(self._active.discard)
        return task

    # -- processing --------------------------------------------------------

    async def _process(self, messages: list) -> None:
        """Run one batch through handler, publish and acknowledgement (stages without keyed state)."""
        self.stats["batches"] += 1
        self.stats["received"] += len(messages)
        try:
            await self._run_batch(messages)
        except Exception:
            # A bug of ours, not of the stage: give the messages back now rather
            # than leave them to the message timeout.
            log.critical("stage %s: batch of %d messages failed in the runtime; requeueing",
                         self.name, len(messages), exc_info=True)
            self._requeue_now(messages)

    async def _run_batch(self, messages: list) -> None:
        outcome = self.processor.process(messages)
        for message in outcome.retry:
            self._requeue_backoff(message)
        outputs = self._outputs(outcome)
        self.middleware.emit_before("before_publish", self, outputs)
        try:
            await self.publisher.publish(outputs, self.spec.publish_timeout)
        except PublishError as e:
            self._publish_failed(outputs, len(outcome.finish), e)
            self._requeue_now(outcome.finish)
            return
        self._published(outputs)
        self._finish(outcome.finish)
        self.middleware.emit_after("after_ack", self, outcome.finish, outcome.retry)

    def _outputs(self, outcome) -> dict[str, list[bytes]]:
        outputs = outcome.outputs
        if outcome.dead:
            outputs[self.dead_topic] = [self._dead_letter(dead) for dead in outcome.dead]
        return outputs

    def _publish_failed(self, outputs: dict, count: int, error: BaseException) -> None:
        self.stats["publish_errors"] += 1
        log.warning("stage %s: publish failed, requeueing %d messages: %s", self.name, count, error)
        self.middleware.emit_after("after_publish", self, outputs, exception=error)

    def _published(self, outputs: dict) -> None:
        self.middleware.emit_after("after_publish", self, outputs, exception=None)
        for topic, bodies in outputs.items():
            self.stats[f"out:{topic}"] += len(bodies)

    # -- keyed batches: handler now, commit in order (pipeline.runtime.commits) --------

    def _run_keyed(self) -> None:
        """Take every queued keyed message through the handler, in order (unless halted)."""
        while self._keyed_queue and not self._keyed_halted:
            messages, self._keyed_queue = self._keyed_queue, []
            self._apply_keyed(messages)

    def _apply_keyed(self, messages: list) -> None:
        """Run one keyed batch through the handler, queue its commit and start its publish."""
        self.stats["batches"] += 1
        self.stats["received"] += len(messages)
        try:
            outcome = self.processor.process(messages)
            for message in outcome.retry:
                self._requeue_backoff(message)
            self._report_gaps()
            stats = self.stats
            stats["duplicates"], stats["parked"] = self.processor.duplicates, self.processor.parked
            outputs = self._outputs(outcome)
            # The state after this batch, when a checkpoint may need it before the batches behind it are
            # acknowledged; else only the last batch's state is ever written, taken when that is due.
            keep = not self.processor.columns_atomic or self.commits.checkpoint_wait() <= 0
            state = self._state_now() if keep else None
        except Exception as e:
            # A bug of ours, not of the stage: the state may be half-updated, so
            # nothing more goes through the handler until the commits before
            # this one are done and the state is back at the last checkpoint.
            log.critical("stage %s: batch of %d messages failed in the runtime; rewinding to the last checkpoint",
                         self.name, len(messages), exc_info=True)
            self._keyed_halted = True
            self.commits.add(KeyedCommit(messages, [], {}, None, answer=e, failed=True))
            return
        self.middleware.emit_before("before_publish", self, outputs)
        commit = KeyedCommit(outcome.finish, outcome.retry, outputs, state)
        self.commits.add(commit)  # first: the publish may answer at once (no connection)
        self.publisher.send(outputs, self.spec.publish_timeout, functools.partial(self.commits.answered, commit))

    def _state_now(self) -> tuple[dict, bytes | None]:
        """The sequencer's and the stage's state as of the last batch applied, as a checkpoint holds them."""
        return self.processor.sequencer.state(), self.processor.handler_state()

    # -- keyed state ---------------------------------------------------------

    def _new_sequencer(self) -> Sequencer:
        return Sequencer(self.spec.gap_max_count, self.spec.gap_wait_ms,
                         pack_item=KeyedEntry.pack, unpack_item=KeyedEntry.unpack)

    def _restore_checkpoint(self) -> None:
        """Load the last checkpoint into the sequencer and the stage (as at a restart)."""
        saved = self.checkpoint.load()
        self.processor.sequencer = self._new_sequencer()
        if saved is None:  # the first start: the initial state is what a rewind goes back to
            self.checkpoint.save(self.processor.sequencer.state(), self.processor.handler_state())
            return
        sequencer_state, handler_state = saved
        self.processor.sequencer.restore(sequencer_state)
        if hasattr(self.handler, "restore"):
            self.processor.restore_handler(handler_state)
        log.info("stage %s replica %d restored its checkpoint (%d keys, %d records parked)", self.name,
                 self.replica, len(self.processor.sequencer.applied), self.processor.sequencer.parked_count())

    def _rewind(self) -> None:
        """Requeue every batch not yet committed and go back to the last checkpoint, as after a crash.

        The handler already applied those batches; their redelivered records
        would otherwise be taken for duplicates and their outputs never published.
        """
        for commit in self.commits.drop_all():
            self._requeue_now(commit.finish)
        self._restore_checkpoint()
        self._keyed_halted = False
        self._run_keyed()
        self.commits.advance()

    def _report_gaps(self) -> None:
        gaps = self.processor.sequencer.gaps
        if gaps > self.stats["gaps"]:
            log.warning("stage %s replica %d: gave up %d missing seq(s) after waiting %d ms (%d in all); state now "
                        "differs from a run that had them", self.name, self.replica, gaps - self.stats["gaps"],
                        self.spec.gap_wait_ms, gaps)
            self.stats["gaps"] = gaps

    def _expire_gaps(self) -> None:
        if not self.draining and self._backlog_check is None and self.processor.sequencer.expiry_due():
            self._backlog_check = self._start(self._give_up_gaps_if_drained())

    async def _give_up_gaps_if_drained(self) -> None:
        """Give up the gaps that waited gap_max_ms, unless nsqd still holds messages that may fill them.

        A crashed replica's messages come back after msg_timeout at the end of
        the channel's queue: behind a backlog they can take far longer than
        gap_max_ms, and are still on their way, not lost.
        """
        try:
            backlog = await asyncio.to_thread(self._input_backlog)
            if backlog:
                self._log_waiting_gap(backlog)
                return
            self._gaps_may_go = True
            self._apply_keyed([])
        finally:
            self._gaps_may_go = False
            self._backlog_check = None

    def _input_backlog(self) -> int | None:
        """Messages nsqd holds for this replica's channel (None when an nsqd cannot say)."""
        total = 0
        for http in self.topology.nsqd_http_addresses():
            try:
                total += nsqd_http.channel_backlog(http, self.input_topic, self.spec.channel)
            except nsqd_http.NsqdHTTPError as e:
                log.warning("stage %s replica %d: cannot read the backlog of %s (%s); not giving up a gap",
                            self.name, self.replica, self.input_topic, e)
                return None
        return total

    def _log_waiting_gap(self, backlog: int | None) -> None:
        now = time.monotonic()
        if now - self._gap_wait_logged >= 10.0:
            self._gap_wait_logged = now
            log.info("stage %s replica %d: a gap waited %d ms; still waiting, %s messages queued for %s",
                     self.name, self.replica, self.spec.gap_wait_ms, "unknown" if backlog is None else backlog,
                     self.input_topic)

    def _on_handler_error(self, count: int, error: BaseException) -> None:
        self.stats["handler_errors"] += 1
        log.warning("stage %s: handler raised on %d records: %r", self.name, count, error)

    def _dead_letter(self, dead: Dead) -> bytes:
        self.stats["dead_lettered"] += 1
        message = dead.message
        where = "" if dead.index is None else f" (record {dead.index} of its envelope)"
        log.warning("stage %s: dead-lettering message %s%s after %d attempts: %s", self.name,
                    message.id.decode(errors="replace"), where, message.attempts, dead.reason)
        self.middleware.emit_after("after_dead_letter", self, message, dead.reason)
        return self.processor.dead_letter(dead)

    # -- acknowledgement ---------------------------------------------------

    def _finish(self, messages: Sequence) -> None:
        finish_all(messages)
        self.stats["finished"] += len(messages)

    def _requeue_now(self, messages: Sequence) -> None:
        """Requeue without delay or backoff: the failure was not the message's fault."""
        for message in messages:
            if not message.has_responded():
                message.requeue(backoff=False, time_ms=0)
        self.stats["requeued"] += len(messages)

    def _requeue_backoff(self, message) -> None:
        delay = min(self.spec.requeue_delay * 2 ** (message.attempts - 1), MAX_REQUEUE_DELAY)
        message.requeue(backoff=True, time_ms=int(delay * 1000))
        self.stats["requeued"] += 1
