"""Worker metrics: a Prometheus endpoint per replica, fed by a middleware.

A stage with ``metrics_port: P`` serves ``http://<metrics_host>:<P + k>/metrics``
from replica k. Two sources feed it:

- :class:`WorkerMetrics`, a :class:`~pipeline.middleware.Middleware`, times
  handler calls and publishes and observes batch sizes and end-to-end latency
  (now minus the record's ``ts``) as histograms;
- :class:`RuntimeCollector` reads the runtime's own counters
  (``Worker.stats``) and the reader's in-flight count at scrape time, so
  messages in and out, requeues, dead letters and publish errors cost the hot
  path nothing and always agree with what the runtime did.

Process metrics (CPU seconds, RSS, open fds, GC) come from prometheus-client's
standard collectors.

Example::

    metrics = WorkerMetrics.for_replica(topology.stage("primes"), "primes", replica=0)
    Worker(topology, "primes", middleware=[metrics])   # serves once the worker has booted
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from pipeline.middleware import Middleware, WorkerView

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from pipeline.stage import Batch

log = logging.getLogger(__name__)

NS = "pipeline"
# seconds; end-to-end latency spans a queue that may back up for minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
HANDLER_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000, 100000)
# Worker.stats keys exported as counters: key -> (metric name, help)
RUNTIME_COUNTERS = {
    "received": ("messages_in", "Messages received from nsqd, per input topic (an envelope counts once)."),
    "finished": ("messages_finished", "Messages FINished after their outputs were acknowledged."),
    "requeued": ("messages_requeued", "Messages requeued (handler failure, failed publish or drain)."),
    "parked": ("keyed_parked", "Keyed records parked (checkpointed) until the missing seq before them arrived."),
    "duplicates": ("keyed_duplicates", "Keyed records dropped because their seq was already applied."),
    "dead_lettered": ("dead_lettered", "Messages or envelope records published to the dead-letter topic."),
    "publish_errors": ("publish_errors", "Batches whose outputs nsqd refused or did not acknowledge in time."),
    "batches": ("batches", "Batches of messages taken from nsqd by the runtime."),
    "handler_errors": ("handler_errors", "Handler calls that raised or returned a bad result."),
    "gaps": ("keyed_gaps", "Missing seqs a keyed stage gave up waiting for."),
    "copies_finished": ("copies_finished", "Second copies of a replicated input's messages finished unprocessed."),
    "under_replicated": ("copies_missing", "Copies of outputs to replicated topics no node could take (fewer nsqd"
                                           " up than copies): published degraded."),
}


class BulkHistogram:
    """A histogram that takes many observations in one numpy call (end-to-end latency per record).

    prometheus-client's ``Histogram.observe`` takes a lock per value; a batch
    of thousands of records would pay that thousands of times.
    """

    def __init__(self, buckets: Sequence[float]):
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one is +Inf
        self.total = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        """Add every value of ``values`` (seconds)."""
        if values.size == 0:
            return
        # bucket i counts values <= bounds[i] (Prometheus' "le")
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.total += float(values.sum())

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` pairs and the sum, as a Prometheus histogram shows them."""
        with self._lock:
            cumulative, total = np.cumsum(self.counts), self.total
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        return [(le, int(c)) for le, c in zip(les, cumulative, strict=False)], total


def _le(bound: float) -> str:
    return str(float(bound))


class RuntimeCollector(Collector):
    """Exposes a worker's runtime counters, in-flight count and e2e latency at scrape time."""

    def __init__(self, worker: WorkerView, labels: dict[str, str], e2e: BulkHistogram):
        self.worker, self.labels, self.e2e = worker, labels, e2e

    def collect(self) -> Iterable[Any]:
        names, values = list(self.labels), list(self.labels.values())
        stats = _copy(self.worker.stats)
        for key, (name, doc) in RUNTIME_COUNTERS.items():
            if key == "received":  # per topic, like messages_out (a keyed replica reads its partition)
                family = CounterMetricFamily(f"{NS}_{name}", doc, labels=[*names, "topic"])
                family.add_metric([*values, self.worker.input_topic], stats.get(key, 0))
            else:
                family = CounterMetricFamily(f"{NS}_{name}", doc, labels=names)
                family.add_metric(values, stats.get(key, 0))
            yield family
        out = CounterMetricFamily(f"{NS}_messages_out", "Messages published and acknowledged, per topic.",
                                  labels=[*names, "topic"])
        for key, count in sorted(stats.items()):
            if key.startswith("out:"):
                out.add_metric([*values, key[4:]], count)
        yield out
        inflight = GaugeMetricFamily(f"{NS}_in_flight", "Messages received and not yet answered (FIN/REQ).",
                                     labels=names)
        inflight.add_metric(values, self._in_flight())
        yield inflight
        buckets, total = self.e2e.snapshot()
        e2e = HistogramMetricFamily(f"{NS}_e2e_latency_seconds",
                                    "Now minus the record's ts when the handler has processed it.", labels=names)
        e2e.add_metric(values, buckets, total)
        yield e2e

    def _in_flight(self) -> int:
        reader = self.worker.reader
        if reader is None:
            return 0
        try:
            return sum(int(getattr(conn, "in_flight", 0)) for conn in list(reader.conns.values()))
        except RuntimeError:  # the event loop changed the connections while we read them
            return 0


def _copy(stats: Mapping[str, int]) -> dict[str, int]:
    """Copy a Counter the event loop may be changing in another thread."""
    for _ in range(5):
        try:
            return dict(stats)
        except RuntimeError:
            continue
    return {}


class WorkerMetrics(Middleware):
    """Middleware that records a replica's metrics and serves them over HTTP once the worker boots.

    Parameters:
        stage: the stage's name (label ``stage``).
        replica: the replica's number (label ``replica``).
        port: the port to listen on; 0 lets the system choose (see :attr:`port` after boot).
        host: the address to listen on.
    """

    def __init__(self, stage: str, replica: int, port: int | None, host: str = "127.0.0.1"):
        self.labels = {"stage": stage, "replica": str(replica)}
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        names, values = list(self.labels), list(self.labels.values())
        self._handler = Histogram(f"{NS}_handler_seconds", "Seconds per handler call.", names,
                                  buckets=HANDLER_BUCKETS, registry=self.registry).labels(*values)
        self._batch_size = Histogram(f"{NS}_batch_size", "Records per handler call.", names,
                                     buckets=SIZE_BUCKETS, registry=self.registry).labels(*values)
        self._publish = Histogram(f"{NS}_publish_seconds", "Seconds from publish to nsqd's OK (or failure).",
                                  names, buckets=HANDLER_BUCKETS, registry=self.registry).labels(*values)
        self.e2e = BulkHistogram(LATENCY_BUCKETS)
        self._handler_started = 0.0
        self._publishing: dict[int, float] = {}
        self._server: WSGIServer | None = None

    @classmethod
    def for_replica(cls, spec, stage: str, replica: int) -> WorkerMetrics | None:
        """The metrics of replica ``replica`` of a stage, or None when its ``metrics_port`` is off."""
        if not spec.metrics_port:
            return None
        return cls(stage, replica, spec.metrics_port + replica, spec.metrics_host)

    # -- hooks -----------------------------------------------------------------

    def after_worker_boot(self, worker: WorkerView) -> None:
        self.registry.register(RuntimeCollector(worker, self.labels, self.e2e))
        if self.requested_port is not None:
            self.serve()

    def before_process_batch(self, worker: WorkerView, batch: Batch) -> None:
        # Handler calls are synchronous, so before/after pairs never interleave.
        self._handler_started = time.perf_counter()

    def after_process_batch(self, worker: WorkerView, batch: Batch, *, result, exception) -> None:
        self._handler.observe(time.perf_counter() - self._handler_started)
        self._batch_size.observe(len(batch))
        if exception is None:
            columns = getattr(batch, "columns", None)  # the columnar path: never build records for metrics
            if columns is not None:
                stamps = columns.get("ts")
                self.e2e.observe_many(_seconds_since([] if stamps is None else stamps, time.time_ns()))
            else:
                self.e2e.observe_many(e2e_seconds(batch.records, time.time_ns()))

    def before_publish(self, worker: WorkerView, outputs: Mapping[str, Sequence[bytes]]) -> None:
        # Publishes of different batches overlap; each batch has its own outputs dict.
        self._publishing[id(outputs)] = time.perf_counter()

    def after_publish(self, worker: WorkerView, outputs: Mapping[str, Sequence[bytes]], *, exception) -> None:
        started = self._publishing.pop(id(outputs), None)
        if started is not None:
            self._publish.observe(time.perf_counter() - started)

    # -- serving ---------------------------------------------------------------

    def serve(self) -> None:
        """Start the HTTP endpoint in a daemon thread (a taken port is logged, not fatal)."""
        try:
            self._server, _ = start_http_server(self.requested_port or 0, addr=self.host, registry=self.registry)
        except OSError as e:
            log.error("metrics of stage %s replica %s: cannot listen on %s:%s: %s", self.labels["stage"],
                      self.labels["replica"], self.host, self.requested_port, e)
            return
        self.port = self._server.server_address[1]
        log.info("metrics of stage %s replica %s on http://%s:%d/metrics", self.labels["stage"],
                 self.labels["replica"], self.host, self.port)

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def e2e_seconds(records: Sequence[Any], now_ns: int) -> np.ndarray:
    """Seconds from each record's ``ts`` (ns since epoch) to ``now_ns``; records without one are skipped."""
    return _seconds_since([r.get("ts") for r in records if isinstance(r, dict)], now_ns)


def _seconds_since(stamps: Sequence[Any] | np.ndarray, now_ns: int) -> np.ndarray:
    """Seconds from each positive integer stamp (ns) to ``now_ns``; other values are skipped.

    A typed column (an int64 array: an envelope of 128 records or more) is
    taken whole, in numpy; a list is filtered value by value.
    """
    if type(stamps) is np.ndarray:
        if stamps.dtype.kind not in "iu":
            return np.empty(0)
        typed = stamps[stamps > 0].astype(np.int64, copy=False)
        return np.maximum((now_ns - typed) / 1e9, 0.0)
    stamps = [t for t in stamps if type(t) is int and t > 0]
    if not stamps:
        return np.empty(0)
    return np.maximum((now_ns - np.asarray(stamps, dtype=np.int64)) / 1e9, 0.0)
