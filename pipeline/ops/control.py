"""Run a topology under supervisord: up, down, status and scale.

``up`` renders the config beside the topology, starts supervisord (from this
environment) with the two variables the config expects, and waits until every
program is RUNNING, every nsqd answers ``/ping`` and every stage has its
replicas subscribed. Running it again applies topology changes like
``supervisorctl update``: only the groups whose configuration changed are
restarted. ``down`` stops workers first (they drain), then nsqadmin, nsqd
(SIGTERM, so queues are persisted) and the lookupds, then supervisord.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.client import nsqd_http
from pipeline.config import KEEP_CHANNEL, split_address
from pipeline.errors import ProcessError
from pipeline.ops.install import bin_dir
from pipeline.ops.processes import stop_pid
from pipeline.ops.restarter import SupervisorProcessInfo, supervisor_rpc
from pipeline.ops.supervisor_conf import conf_path, render, socket_path

START_TIMEOUT = 90.0  # a cold worker start compiles numba kernels
SUPERVISORD_TIMEOUT = 15.0
Log = Callable[[str], None]


@dataclass(frozen=True)
class ProcessInfo:
    """One supervisord process as ``status`` shows it."""

    name: str
    group: str
    state: str
    pid: int
    uptime: float
    description: str

    @property
    def full_name(self) -> str:
        return f"{self.group}:{self.name}"


class Supervisor:
    """The supervisord that runs one topology, reached over its unix socket."""

    def __init__(self, topology):
        self.topology = topology
        self.conf = conf_path(Path(topology.path))
        self.socket = socket_path(topology)
        self.var = topology.var_dir

    # -- connection ------------------------------------------------------------

    def rpc(self) -> Any:
        """An XML-RPC proxy to supervisord over the unix socket (Any: see :func:`supervisor_rpc`)."""
        return supervisor_rpc(self.socket)

    def running(self) -> bool:
        """True when supervisord answers on the socket."""
        if not self.socket.exists():
            return False
        try:
            return self.rpc().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def processes(self) -> list[ProcessInfo]:
        """Every process supervisord manages (the restarter included)."""
        infos: list[SupervisorProcessInfo] = self.rpc().supervisor.getAllProcessInfo()
        return [ProcessInfo(p["name"], p["group"], p["statename"], p["pid"],
                            max(0, p["now"] - p["start"]) if p["start"] else 0, p["description"])
                for p in infos]

    # -- up ----------------------------------------------------------------------

    def write_conf(self) -> bool:
        """Render the config beside the topology; return True when it changed."""
        text = render(self.topology)
        if self.conf.exists() and self.conf.read_text() == text:
            return False
        tmp = self.conf.with_name(self.conf.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf)
        return True

    def up(self, log: Log = print) -> list[ProcessInfo]:
        """Start (or update) the pipeline and wait until it runs; return its processes.

        Raises:
            ProcessError: a listen address is taken (nothing is started then),
                supervisord does not come up, or a program does not reach RUNNING.
        """
        if self.running():
            self.write_conf()
            self.update(log)
        else:
            preflight_ports(self.topology)
            self.write_conf()
            self._start_supervisord(log)
        self.wait_ready()
        return self.processes()

    def _start_supervisord(self, log: Log) -> None:
        for sub in ("run", "log", *(f"nsqd/{n.name}" for n in self.topology.nsq.nsqd)):
            (self.var / sub).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "NSQ_PIPELINE_BIN": str(bin_dir()), "NSQ_PIPELINE_PYTHON": sys.executable}
        result = subprocess.run([sys.executable, "-m", "pipeline.ops.supervise", "-c", str(self.conf)],
                                env=env, cwd=self.conf.parent, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ProcessError(f"supervisord did not start: {(result.stderr or result.stdout).strip()}")
        deadline = time.monotonic() + SUPERVISORD_TIMEOUT
        while not self.running():
            if time.monotonic() > deadline:
                raise ProcessError(f"supervisord did not answer on {self.socket} "
                                   f"(log: {self.var / 'log' / 'supervisord.log'})")
            time.sleep(0.05)
        log(f"supervisord started with {self.conf}")

    def update(self, log: Log = print) -> list[str]:
        """Apply config changes like ``supervisorctl update``; return the groups touched."""
        rpc = self.rpc()
        added: list[str]
        changed: list[str]
        removed: list[str]
        [[added, changed, removed]] = rpc.supervisor.reloadConfig()
        for group in changed + removed:
            rpc.supervisor.stopProcessGroup(group, True)
            rpc.supervisor.removeProcessGroup(group)
        for group in changed + added:
            rpc.supervisor.addProcessGroup(group)
        for group in added + changed + removed:
            log(f"{'added' if group in added else 'removed' if group in removed else 'restarted'} {group}")
        return added + changed + removed

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every program is RUNNING, nsqd answers and stages are subscribed."""
        deadline = time.monotonic() + timeout
        # nsqd first, and the topics and channels as soon as it answers: workers start meanwhile, and
        # what they publish to a topic no stage reads must find its keep channel there, not a tail's.
        for check in (self._nsqd_healthy, self._topics_created, self._all_running, self._stages_subscribed):
            while (problem := check()) is not None:
                if time.monotonic() > deadline:
                    raise ProcessError(f"pipeline not ready after {timeout:g}s: {problem} (logs: {self.var / 'log'})")
                time.sleep(0.1)

    def _all_running(self) -> str | None:
        waiting = [p for p in self.processes() if p.state != "RUNNING"]
        self._fail_on_exit(waiting)
        return f"{waiting[0].name} is {waiting[0].state}" if waiting else None

    def _fail_on_exit(self, processes: list[ProcessInfo]) -> None:
        """Raise for a process that is FATAL, or exited on start with the CLI's one-line error as its last words.

        A worker whose handler does not load exits with ``pipeline: handler ...: FILE:LINE: ...``; the
        restarter starts a FATAL worker again, so waiting for FATAL could take the whole timeout.
        """
        for process in processes:
            line = last_log_line(self.var / "log" / f"{process.name}.log")
            if process.state == "FATAL" or (process.state in ("BACKOFF", "EXITED") and line.startswith("pipeline: ")):
                raise ProcessError(f"{process.name} is {process.state}: {line}")

    def _nsqd_healthy(self) -> str | None:
        for http in self.topology.nsqd_http_addresses():
            try:
                nsqd_http.request(http, "/ping", method="GET", timeout=1.0)
            except nsqd_http.NsqdHTTPError as e:
                self._all_running()  # an nsqd that went FATAL fails now, with its log line
                return str(e)
        return None

    def _topics_created(self) -> str | None:
        # Declared topics and stage channels exist from the start: nsqadmin lists
        # them, and what is published before a stage subscribes waits in its channel.
        # A topic no stage reads (terminal, dead letters) gets the durable channel keep:
        # an ephemeral channel (nsq_tail, pipeline tail) then reads copies, and never
        # takes the backlog a topic without channels would hand the first one to come.
        topology = self.topology
        channels = {(t, s.channel) for s in topology.stages.values() for t in topology.physical_topics(s.input)}
        channels |= {(t, KEEP_CHANNEL) for t in topology.kept_topics()}
        for http in topology.nsqd_http_addresses():
            try:
                for topic in (t for name in topology.topics for t in topology.physical_topics(name)):
                    nsqd_http.create_topic(http, topic)
                for topic, channel in channels:
                    nsqd_http.create_channel(http, topic, channel)
            except nsqd_http.NsqdHTTPError as e:
                return str(e)
        return None

    def _stages_subscribed(self) -> str | None:
        http = self.topology.nsqd_http_addresses()[0]
        for name, stage in self.topology.stages.items():
            clients = sum(channel_clients(http, topic, stage.channel)
                          for topic in self.topology.physical_topics(stage.input))
            if clients != stage.replicas:
                self._fail_on_exit([p for p in self.processes() if p.group == name and p.state != "RUNNING"])
                return f"stage {name}: {clients} of {stage.replicas} replicas subscribed"
        return None

    # -- down --------------------------------------------------------------------

    def down(self, log: Log = print) -> None:
        """Stop workers (they drain), then nsqadmin, nsqd, lookupds, and supervisord itself."""
        if not self.running():
            log("supervisord is not running")
            return
        rpc = self.rpc()
        # the monitor first: samples of nsqd going down on purpose would read as an outage in the report
        order = ["monitor", *self.topology.stages, "nsqadmin", *(f"nsqd-{n.name}" for n in self.topology.nsq.nsqd),
                 *(f"nsqlookupd-{i}" for i in range(len(self.topology.nsq.lookupd)))]
        groups = {p.group for p in self.processes()}
        for group in [g for g in order if g in groups]:
            rpc.supervisor.stopProcessGroup(group, True)
            log(f"stopped {group}")
        pid: int = rpc.supervisor.getPID()
        rpc.supervisor.shutdown()
        stop_pid(pid, grace=30)  # returns at once when shutdown already ended it
        log("stopped supervisord")


def channel_clients(http: str, topic: str, channel: str) -> int:
    """Clients subscribed to ``topic/channel`` on one nsqd (0 when it does not exist yet)."""
    return len(channel_subscribers(http, topic, channel))


def channel_subscribers(http: str, topic: str, channel: str) -> list[dict[str, Any]]:
    """nsqd's ``/stats`` of each client on ``topic/channel`` ([] when it does not exist yet or nsqd is down)."""
    try:
        topics = nsqd_http.stats(http, topic).get("topics") or []
    except nsqd_http.NsqdHTTPError:
        return []
    return [client for t in topics if t["topic_name"] == topic
            for c in t.get("channels") or [] if c["channel_name"] == channel for client in c.get("clients") or []]


def preflight_ports(topology) -> None:
    """Fail before anything starts when one of the topology's listen addresses is taken.

    Raises:
        ProcessError: naming the address and which process wanted it.
    """
    nsq = topology.nsq
    wanted = [(n.tcp, f"nsqd {n.name} tcp") for n in nsq.nsqd] + [(n.http, f"nsqd {n.name} http") for n in nsq.nsqd]
    wanted += [(lookupd.tcp, "nsqlookupd tcp") for lookupd in nsq.lookupd]
    wanted += [(lookupd.http, "nsqlookupd http") for lookupd in nsq.lookupd]
    if nsq.admin:
        wanted.append((nsq.admin, "nsqadmin http"))
    if getattr(topology, "monitor", None) is not None and topology.monitor.listen:
        wanted.append((topology.monitor.listen, "monitor metrics"))
    for address, what in wanted:
        host, port = split_address(address)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                raise ProcessError(f"cannot start: {address} ({what}) is not free: {e.strerror}; "
                                   "nothing was started") from e


def last_log_line(path: Path) -> str:
    """The last line of a log file, for error messages (read from its last 8 KiB)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"

