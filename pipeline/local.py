"""Run a topology's processes on this machine: nsqd, nsqlookupd, nsqadmin and stage replicas.

Each process is started in its own session with its output in ``var/log/``
and its pid in ``var/run/<name>.pid``; ``down`` stops them by those pids:
workers first (they drain), then nsqadmin, nsqd (SIGTERM, so they persist
their queues) and the lookupds. ``up`` is idempotent: a process whose pid
file names a live process is left alone.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import nsqd_http
from .errors import ProcessError
from .processes import nsqadmin_args, nsqd_args, nsqlookupd_args, pid_alive, start_process, stop_pid

WORKER_READY_TIMEOUT = 90.0  # a cold start compiles numba kernels
NSQD_STOP_GRACE = 30.0
WORKER_STOP_GRACE = 20.0


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the topology: what to run and how to tell it is up."""

    name: str
    argv: list[str]
    kind: str  # nsqlookupd, nsqd, nsqadmin or worker
    http: str | None = None
    tcp: str | None = None
    data_dir: Path | None = None


class LocalPipeline:
    """The processes of one topology on this machine, tracked by pid files under its var dir."""

    def __init__(self, topology):
        self.topology = topology
        self.var = topology.var_dir
        self.run_dir = self.var / "run"
        self.log_dir = self.var / "log"

    def specs(self) -> list[ProcessSpec]:
        """Every process of the topology, in start order."""
        nsq = self.topology.nsq
        lookupd_tcp = [l.tcp for l in nsq.lookupd]
        specs = [ProcessSpec(f"nsqlookupd-{i}", nsqlookupd_args(tcp=l.tcp, http=l.http), "nsqlookupd", l.http, l.tcp)
                 for i, l in enumerate(nsq.lookupd)]
        for i, n in enumerate(nsq.nsqd):
            data_dir = self.var / "nsqd" / n.name
            # nsqd derives its node id (part of every message id) from the hostname,
            # so nodes on one host would share it; give each its own.
            argv = nsqd_args(tcp=n.tcp, http=n.http, data_dir=data_dir, lookupd_tcp=lookupd_tcp,
                             extra=[f"--node-id={i}"])
            specs.append(ProcessSpec(f"nsqd-{n.name}", argv, "nsqd", n.http, n.tcp, data_dir))
        if nsq.admin and nsq.lookupd:
            argv = nsqadmin_args(http=nsq.admin, lookupd_http=[l.http for l in nsq.lookupd])
            specs.append(ProcessSpec("nsqadmin", argv, "nsqadmin", nsq.admin))
        for stage, spec in self.topology.stages.items():
            for k in range(spec.replicas):
                argv = [sys.executable, "-m", "pipeline.cli", "worker", stage, "--replica", str(k),
                        "-t", str(self.topology.path)]
                specs.append(ProcessSpec(f"{stage}-{k}", argv, "worker"))
        return specs

    # -- up ------------------------------------------------------------------

    def up(self, log: Callable[[str], None] = print) -> list[tuple[str, int]]:
        """Start whatever is not running, wait until workers consume; return (name, pid) pairs."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        started: list[tuple[str, int]] = []
        for spec in self.specs():
            pid = self.pid_of(spec.name)
            if pid is not None:
                started.append((spec.name, pid))
                continue
            if spec.data_dir is not None:
                spec.data_dir.mkdir(parents=True, exist_ok=True)
            pid = self._start(spec)
            self._pidfile(spec.name).write_text(f"{pid}\n")
            log(f"started {spec.name} (pid {pid})")
            started.append((spec.name, pid))
        self._wait_workers()
        return started

    def _start(self, spec: ProcessSpec) -> int:
        log_path = self.log_dir / f"{spec.name}.log"
        if spec.kind != "worker":
            return start_process(spec.name, spec.argv, http=spec.http, tcp=spec.tcp, log_path=log_path,
                                 data_dir=spec.data_dir).pid
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            return subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=os.getcwd()).pid

    def _wait_workers(self) -> None:
        """Wait until every stage has its replicas subscribed on the first nsqd."""
        http = self.topology.nsqd_http_addresses()[0]
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        for stage, spec in self.topology.stages.items():
            while self._clients(http, spec.input, spec.channel) < spec.replicas:
                self._check_workers_alive(stage, spec.replicas)
                if time.monotonic() > deadline:
                    raise ProcessError(f"stage {stage}: {spec.replicas} replicas not subscribed to "
                                       f"{spec.input}/{spec.channel} after {WORKER_READY_TIMEOUT:g}s "
                                       f"(logs: {self.log_dir})")
                time.sleep(0.1)

    def _check_workers_alive(self, stage: str, replicas: int) -> None:
        for k in range(replicas):
            name = f"{stage}-{k}"
            if self.pid_of(name) is None:
                tail = _last_line(self.log_dir / f"{name}.log")
                raise ProcessError(f"worker {name} exited during start: {tail} (log: {self.log_dir / name}.log)")

    @staticmethod
    def _clients(http: str, topic: str, channel: str) -> int:
        try:
            topics = nsqd_http.stats(http, topic).get("topics") or []
        except nsqd_http.NsqdHTTPError:
            return 0
        return sum(len(c.get("clients") or []) for t in topics if t["topic_name"] == topic
                   for c in t.get("channels") or [] if c["channel_name"] == channel)

    # -- down ----------------------------------------------------------------

    def down(self, log: Callable[[str], None] = print) -> int:
        """Stop every running process, workers first; return how many were stopped."""
        order = {"worker": 0, "nsqadmin": 1, "nsqd": 2, "nsqlookupd": 3}
        stopped = 0
        for spec in sorted(self.specs(), key=lambda s: order[s.kind]):
            pid = self.pid_of(spec.name)
            if pid is None:
                self._pidfile(spec.name).unlink(missing_ok=True)
                continue
            grace = NSQD_STOP_GRACE if spec.kind == "nsqd" else WORKER_STOP_GRACE
            code = stop_pid(pid, grace)
            self._pidfile(spec.name).unlink(missing_ok=True)
            log(f"stopped {spec.name} (pid {pid}{'' if code is None else f', exit {code}'})")
            stopped += 1
        return stopped

    # -- pid files -------------------------------------------------------------

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid_of(self, name: str) -> int | None:
        """The live pid recorded for ``name``, or None."""
        try:
            pid = int(self._pidfile(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"

