"""``pipeline restart [STAGE…]``: a rolling restart, so the replicas load new handler code.

Replica by replica, in replica order: supervisord stops it (SIGTERM: the
worker sets RDY 0, finishes the batch in hand, requeues the rest and exits 0),
starts it again, and the roll waits until supervisord says RUNNING and the
new process is consuming: nsqd's ``/stats`` show one of its connections on
the replica's input channel with RDY > 0. Only then is the next replica
stopped, so a stage of N replicas always has N - 1 consuming. A keyed replica
restarts the same way; it resumes from its checkpoint.

A replica that does not come back (BACKOFF or FATAL, or not consuming within
the timeout) stops the roll there: the replicas after it keep running, on the
old code.
"""
from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
from supervisor.xmlrpc import Faults

from pipeline.errors import ProcessError
from pipeline.ops.control import START_TIMEOUT, Log, ProcessInfo, Supervisor, channel_subscribers, last_log_line
from pipeline.ops.supervisor_conf import worker_stopwaitsecs

#: supervisord states of a process that is not running (``stopProcess`` refuses these).
STOPPED = ("STOPPED", "EXITED", "FATAL")
#: States of a start that failed: the process exited before ``startsecs``, or gave up.
FAILED = ("BACKOFF", "FATAL", "EXITED")
POLL = 0.1


class RestartError(ProcessError):
    """Raised when a rolling restart cannot begin, or a replica does not come back."""


@dataclass(frozen=True)
class Restarted:
    """One replica restarted: its process name, the pid before (0: it was not running) and after."""

    name: str
    old_pid: int
    new_pid: int
    seconds: float
    old_exit: int | None = None

    def __str__(self) -> str:
        old = str(self.old_pid) if self.old_pid else "not running"
        line = f"{self.name}: pid {old} → {self.new_pid}, consuming after {self.seconds:.1f} s"
        if self.old_exit:  # a drain that timed out, or supervisord's SIGKILL after stopwaitsecs
            line += f" (the old process exited {self.old_exit})"
        return line


def restart(topology, stages: Sequence[str] = (), log: Log = print,
            timeout: float = START_TIMEOUT) -> list[Restarted]:
    """Restart the replicas of ``stages`` (every stage when empty) one at a time; return what was restarted.

    ``log`` gets one line per replica as soon as it is consuming again.

    Raises:
        RestartError: an unknown stage or supervisord not running (nothing restarted then), or a replica
            that did not come back within ``timeout`` seconds (the roll stops there).
    """
    names = list(dict.fromkeys(stages)) or list(topology.stages)
    unknown = [name for name in names if name not in topology.stages]
    if unknown:
        raise RestartError(f"no stage {unknown[0]!r} in {topology.path} (stages: {', '.join(topology.stages)}); "
                           "nothing restarted")
    supervisor = Supervisor(topology)
    if not supervisor.running():
        raise RestartError(f"supervisord is not running for {topology.path} (no answer on {supervisor.socket}); "
                           "start the pipeline with `pipeline up`")
    plan = replicas_of(supervisor, names)
    done = []
    for stage, replica, process in plan:
        done.append(Roll(supervisor, stage, replica, timeout).run(process))
        log(str(done[-1]))
    return done


def replicas_of(supervisor: Supervisor, stages: list[str]) -> list[tuple[str, int, ProcessInfo]]:
    """(stage, replica, process) of every replica supervisord runs for ``stages``, in order.

    Raises:
        RestartError: a stage has no processes under supervisord (the topology changed since ``up``).
    """
    processes = supervisor.processes()
    plan = []
    for stage in stages:
        group = sorted((int(p.name.rpartition("-")[2]), p) for p in processes if p.group == stage)
        if not group:
            raise RestartError(f"stage {stage!r} has no processes under supervisord; "
                               "run `pipeline up` to apply the topology; nothing restarted")
        plan += [(stage, replica, process) for replica, process in group]
    return plan


class Roll:
    """Restarting one replica: stop, start, wait until it is RUNNING and consuming."""

    def __init__(self, supervisor: Supervisor, stage: str, replica: int, timeout: float):
        self.supervisor, self.stage, self.replica, self.timeout = supervisor, stage, replica, timeout
        self.rpc = supervisor.rpc()

    def run(self, process: ProcessInfo) -> Restarted:
        """Restart ``process``; return its line.

        Raises:
            RestartError: supervisord refused, or the new process failed or did not consume in time.
        """
        began = time.monotonic()
        name = process.full_name
        old_exit = self._stop(process) if process.state not in STOPPED else None
        try:
            self.rpc.supervisor.startProcess(name, False)
        except xmlrpc.client.Fault as e:
            raise self._failed(process.name, f"supervisord did not start it: {e.faultString}") from e
        new_pid = self._wait_consuming(process, time.monotonic() + self.timeout)
        return Restarted(process.name, process.pid, new_pid, time.monotonic() - began, old_exit)

    def _info(self, name: str) -> dict:
        info: dict = self.rpc.supervisor.getProcessInfo(name)
        return info

    def _stop(self, process: ProcessInfo) -> int | None:
        """Stop ``process`` (it drains) and wait until supervisord has reaped it; return its exit status."""
        name = process.full_name
        try:
            self.rpc.supervisor.stopProcess(name, False)
        except xmlrpc.client.Fault as e:
            if e.faultCode != Faults.NOT_RUNNING:  # NOT_RUNNING: it stopped by itself meanwhile
                raise self._failed(process.name, f"supervisord did not stop it: {e.faultString}") from e
        # supervisord SIGKILLs it after stopwaitsecs; a little more for the reaping
        deadline = time.monotonic() + worker_stopwaitsecs(self.supervisor.topology.stage(self.stage)) + 10
        while (info := self._info(name))["statename"] not in STOPPED:
            if time.monotonic() > deadline:
                raise self._failed(process.name, f"still {info['statename']} after SIGTERM")
            time.sleep(POLL)
        status: int = info["exitstatus"]
        return status

    def _wait_consuming(self, process: ProcessInfo, deadline: float) -> int:
        """Wait until the new process is RUNNING and consuming; return its pid."""
        while True:
            info = self._info(process.full_name)
            state, pid = info["statename"], info["pid"]
            if state in FAILED:
                log_file = self.supervisor.var / "log" / f"{process.name}.log"
                raise self._failed(process.name, f"{state}: {last_log_line(log_file)}")
            if state == "RUNNING" and pid and self.consuming(pid):
                return int(pid)
            if time.monotonic() > deadline:
                what = "not RUNNING" if state != "RUNNING" else "not consuming"
                raise self._failed(process.name, f"{what} after {self.timeout:g} s (state {state})")
            time.sleep(POLL)

    def consuming(self, pid: int) -> bool:
        """True when a connection of process ``pid`` is on the replica's input channel with RDY > 0."""
        topology = self.supervisor.topology
        try:
            local = {address(c.laddr) for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
        except psutil.Error:
            return False
        topic, channel = topology.input_topic(self.stage, self.replica), topology.stage(self.stage).channel
        return any(client.get("remote_address") in local and client.get("ready_count", 0) > 0
                   for http in topology.nsqd_http_addresses()
                   for client in channel_subscribers(http, topic, channel))

    def _failed(self, name: str, why: str) -> RestartError:
        return RestartError(f"{name} did not come back: {why}; the roll stopped there "
                            f"(logs: {self.supervisor.var / 'log'})")


def address(laddr) -> str:
    """A socket's local address as nsqd's ``remote_address`` writes it (``ip:port``, ``[ip6]:port``)."""
    ip, port = laddr.ip, laddr.port
    if ip.startswith("::ffff:"):  # an IPv4 peer on a dual-stack socket
        ip = ip.removeprefix("::ffff:")
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
