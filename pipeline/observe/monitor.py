"""``pipeline monitor``: sample the pipeline into ``var/health.db``, serve NSQ metrics, send the daily report.

Every ``monitor.interval`` seconds it records each nsqd's ``/stats`` (nodes
found through the lookupds), supervisord's processes (state, pid, CPU, RSS),
each replica's ``/metrics`` and the host (CPU, memory, free disk under the var
dir), then prunes what is past the retention and removes the oldest messages
of each ``keep`` channel beyond its topic's bound (``keep``, ``dead_keep``).
With ``monitor.listen`` it serves NSQ's stats as Prometheus metrics; with a
``report`` section a second thread sends the daily health report (see
:mod:`pipeline.observe.mailer`), so a slow or dead SMTP server never delays a
sample.

Time comes from ``clock`` so tests can move it past the report time::

    monitor = Monitor(topology, clock=lambda: time.time() + offset)
    monitor.start()          # sampling and report threads
    ...
    monitor.stop()
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from pipeline.client.nsqclient import NsqSubscriber
from pipeline.client.peek import trim
from pipeline.config import KEEP_CHANNEL, MonitorSpec, split_address
from pipeline.config.credentials import SecretError
from pipeline.config.security import client_security
from pipeline.errors import PublishError
from pipeline.observe.healthdb import HealthDB
from pipeline.observe.nsq_exporter import NsqCollector, NsqdNode, channel_rows, discover_nsqd, fetch_stats
from pipeline.ops.control import Supervisor

log = logging.getLogger(__name__)

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DEAD_CHANNEL = f"monitor-{os.getpid()}#ephemeral"  # one per monitor: two monitors would split the messages
SCRAPE_TIMEOUT = 2.0
#: Messages of one keep channel removed per connection round, and per sample at most.
TRIM_ROUND, TRIM_MAX = 10_000, 100_000
WORKER_COUNTERS = {"pipeline_messages_in": "messages_in", "pipeline_messages_finished": "finished",
                   "pipeline_messages_requeued": "requeued", "pipeline_dead_lettered": "dead_lettered",
                   "pipeline_publish_errors": "publish_errors"}


class Monitor:
    """Samples one topology's pipeline into its health.db.

    Parameters:
        topology: the loaded topology.
        clock: seconds since the epoch (injectable).
        interval: seconds between samples (default: ``monitor.interval`` of the topology).
    """

    def __init__(self, topology, *, clock: Callable[[], float] = time.time, interval: float | None = None,
                 db_path: str | os.PathLike[str] | None = None):
        self.topology = topology
        self.spec = topology.monitor or MonitorSpec()
        self.clock = clock
        self.interval = interval if interval is not None else self.spec.interval
        self.db = HealthDB(db_path or topology.var_dir / "health.db", self.spec.retention_days,
                           self.spec.max_db_mb * 2**20)
        self.supervisor = Supervisor(topology) if topology.path is not None else None
        self._procs: dict[int, psutil.Process] = {}
        self._dead_subs: dict[tuple[str, str], NsqSubscriber] = {}
        self._stats: dict[str, dict | None] = {}  # the last /stats of each nsqd, by http address
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: WSGIServer | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.samples = Counter("pipeline_monitor_samples", "Samples taken.", registry=self.registry)
        self.last_sample = Gauge("pipeline_monitor_last_sample_timestamp_seconds", "When the last sample was taken.",
                                 registry=self.registry)
        self.registry.register(NsqCollector(self.nodes))
        self.reporter = None
        if topology.report is not None:
            from pipeline.observe.mailer import ReportScheduler
            self.reporter = ReportScheduler(topology, self.db, clock=clock, registry=self.registry)

    # -- running -----------------------------------------------------------------

    def start(self, serve: bool = True) -> None:
        """Serve metrics (when ``listen`` is set and ``serve``) and start the sampling and report threads."""
        if self.spec.listen and serve:
            try:
                self.serve(self.spec.listen)
            except OSError as e:  # sampling and the report matter more than the endpoint
                log.error("cannot serve metrics on %s: %s; sampling without them", self.spec.listen, e)
        self._spawn(self._sample_loop, "monitor-sampler")
        if self.reporter is not None:
            self._spawn(self._report_loop, "monitor-report")

    def run(self) -> None:
        """Run until :meth:`stop` (e.g. from a signal handler)."""
        self.start()
        self._stop.wait()
        self.close()

    def stop(self) -> None:
        """Ask the threads to stop."""
        self._stop.set()

    def close(self) -> None:
        """Stop, wait for the threads, close the server, subscriptions and database."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for sub in self._dead_subs.values():
            sub.close()
        self.db.close()

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` (NSQ stats and the monitor's own) on ``listen``; return the port."""
        host, wanted = split_address(listen, port_zero=True)  # port 0 (tests) picks a free one
        server, _ = start_http_server(wanted, addr=host.strip("[]"), registry=self.registry)
        self._server = server
        port: int = server.server_address[1]
        log.info("monitor metrics on http://%s:%d/metrics", host, port)
        return port

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:
                log.exception("sampling failed; trying again in %gs", self.interval)
            self._stop.wait(self.interval)

    def _report_loop(self) -> None:
        reporter = self.reporter
        if reporter is None:  # started only with a report section
            return
        while not self._stop.is_set():
            try:
                reporter.tick()
            except Exception:  # the scheduler logs its own send failures; this is a bug of ours
                log.exception("report scheduler failed")
            self._stop.wait(min(self.interval, 1.0))

    # -- sampling ----------------------------------------------------------------

    def nodes(self) -> list[NsqdNode]:
        """The nsqd nodes to sample."""
        return discover_nsqd(self.topology)

    def sample(self) -> float:
        """Take one sample of everything; return its time."""
        now = self.clock()
        self._sample_nsq(now)
        self._sample_processes(now)
        self._sample_workers(now)
        self._sample_host(now)
        self._sample_dead_letters(now)
        self._trim_kept()
        self.db.prune(now)
        self.samples.inc()
        self.last_sample.set(now)
        return now

    def _sample_nsq(self, now: float) -> None:
        rows, health = [], []
        self._stats = {}
        for node in self.nodes():
            stats = self._stats[node.http] = fetch_stats(node)
            health.append((now, node.name, node.http, (stats or {}).get("health", "unreachable"),
                           (stats or {}).get("start_time")))
            if stats:
                rows += [tuple(vars(r).values()) for r in channel_rows(now, node, stats)]
        self.db.insert("nsqd", health)
        self.db.insert("channel", rows)

    def _sample_processes(self, now: float) -> None:
        if self.supervisor is None or not self.supervisor.running():
            return
        rows = []
        for p in self.supervisor.processes():
            cpu, rss = self._usage(p.pid) if p.pid else (None, None)
            rows.append((now, p.name, p.group, p.state, p.pid, cpu, rss))
        self.db.insert("process", rows)

    def _usage(self, pid: int) -> tuple[float | None, int | None]:
        """CPU percent since the last sample and RSS bytes of ``pid`` (None when it is gone)."""
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return proc.cpu_percent(None), proc.memory_info().rss
        except psutil.Error:
            self._procs.pop(pid, None)
            return None, None

    def _sample_workers(self, now: float) -> None:
        rows = []
        for name, stage in self.topology.stages.items():
            if not stage.metrics_port:
                continue
            host = "127.0.0.1" if stage.metrics_host in ("0.0.0.0", "::") else stage.metrics_host
            for k in range(stage.replicas):
                rows.append((now, name, k, *scrape_worker(f"{host}:{stage.metrics_port + k}")))
        self.db.insert("worker", rows)

    def _sample_host(self, now: float) -> None:
        memory = psutil.virtual_memory()
        var = self.topology.var_dir
        disk = shutil.disk_usage(var if var.exists() else var.parent).free
        self.db.insert("host", [(now, psutil.cpu_percent(None), memory.total - memory.available, memory.total, disk)])

    def _sample_dead_letters(self, now: float) -> None:
        rows = []
        for (tcp, topic), sub in list(self._dead_subs.items()):
            try:
                for message in sub.messages(timeout=0.01):
                    rows.append(_dead_row(now, topic, message.body))
            except Exception as e:
                log.warning("dead letters of %s on %s: %s", topic, tcp, e)
                sub.close()
                del self._dead_subs[(tcp, topic)]
        self.db.insert("dead_letter", rows)
        self._subscribe_dead_topics()

    def _subscribe_dead_topics(self) -> None:
        """Watch each dead-letter topic that already has a channel of its own.

        A topic without channels keeps its messages for the first channel; an
        ephemeral channel of ours would take them away, so it waits.
        """
        for node in self.topology.nsq.nsqd:
            for name in self.topology.stages:
                topic = self.topology.dead_letter_topic(name)
                if (node.tcp, topic) in self._dead_subs or not _has_other_channel(self._stats.get(node.http), topic):
                    continue
                try:
                    self._dead_subs[(node.tcp, topic)] = NsqSubscriber(node.tcp, topic, DEAD_CHANNEL, rdy=100)
                except Exception as e:
                    log.warning("cannot watch %s on %s: %s", topic, node.tcp, e)


    def _trim_kept(self) -> None:
        """Remove the oldest messages of each ``keep`` channel beyond its bound (a topic's ``keep``, ``dead_keep``)."""
        bounds = {topic: bound for topic, bound in self.topology.kept_topics().items() if bound is not None}
        for tcp, http in zip(self.topology.nsqd_tcp_addresses(), self.topology.nsqd_http_addresses(), strict=True):
            for topic, depth in _keep_depths(self._stats.get(http), bounds).items():
                excess, trimmed = min(depth - bounds[topic], TRIM_MAX), 0
                try:
                    security = client_security(self.topology, "tail")  # the identity that may read keep
                    while trimmed < excess:
                        done = trim(tcp, topic, KEEP_CHANNEL, min(excess - trimmed, TRIM_ROUND), security=security)
                        trimmed += done
                        if not done:
                            break
                except (PublishError, SecretError) as e:
                    log.warning("cannot trim %s/%s on nsqd %s: %s", topic, KEEP_CHANNEL, tcp, e)
                if trimmed:
                    log.info("trimmed the %d oldest message(s) of %s/%s on nsqd %s, which keeps %d at most",
                             trimmed, topic, KEEP_CHANNEL, tcp, bounds[topic])


def _keep_depths(stats: dict | None, bounds: dict[str, int]) -> dict[str, int]:
    """The queued depth of the ``keep`` channel of each bounded topic over its bound, from one nsqd's ``/stats``."""
    found = {}
    for t in (stats or {}).get("topics") or []:
        if t["topic_name"] not in bounds:
            continue
        for c in t.get("channels") or []:
            if c["channel_name"] == KEEP_CHANNEL and int(c["depth"]) > bounds[t["topic_name"]]:
                found[t["topic_name"]] = int(c["depth"])
    return found


def _has_other_channel(stats: dict | None, topic: str) -> bool:
    for t in (stats or {}).get("topics") or []:
        if t["topic_name"] == topic:
            return any(not _is_monitor_channel(c["channel_name"]) for c in t.get("channels") or [])
    return False


def _is_monitor_channel(name: str) -> bool:
    return name.startswith("monitor-") and name.endswith("#ephemeral")


def _dead_row(now: float, topic: str, body: bytes) -> tuple:
    try:
        record = json.loads(body)
    except ValueError:
        record = {}
    excerpt = record.get("body") or record.get("body_base64") or ""
    return (now, topic, record.get("stage", ""), record.get("reason", body[:200].decode(errors="replace")),
            str(excerpt)[:500])


def scrape_worker(address: str) -> tuple:
    """(up, messages_in, finished, requeued, dead_lettered, publish_errors, e2e buckets JSON, process start time)
    of one replica.

    The start time (``process_start_time_seconds``) tells a restarted replica, whose counters began again
    from zero, from the same process (see :func:`pipeline.observe.health.counter_total`).
    """
    values = dict.fromkeys(WORKER_COUNTERS.values(), 0.0)
    buckets: list[tuple[str, float]] = []
    started = None
    try:
        text = _LOCAL.open(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT).read().decode()
    except OSError:
        return (0, *values.values(), "[]", None)
    for family in text_string_to_metric_families(text):
        if family.name in WORKER_COUNTERS:
            values[WORKER_COUNTERS[family.name]] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name == "pipeline_e2e_latency_seconds":
            buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
        elif family.name == "process_start_time_seconds" and family.samples:
            started = family.samples[0].value
    return (1, *values.values(), json.dumps(buckets), started)
