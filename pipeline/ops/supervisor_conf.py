"""Render supervisord's configuration from a topology.

The output depends on the topology alone, never on the machine, so the
``supervisord.conf`` committed beside ``topology.yaml`` can equal ``pipeline
render`` in every checkout: paths are relative to the config file
(``%(here)s``, which supervisord expands to the file's folder), and the two
machine-specific locations come from the environment ``pipeline up`` gives
supervisord:

- ``NSQ_PIPELINE_BIN``: the folder holding nsqd, nsqlookupd and nsqadmin;
- ``NSQ_PIPELINE_PYTHON``: the Python that runs workers and the restarter.

supervisord is reached only through a unix socket with mode 0700 under the
var dir; there is no inet HTTP server.
"""
from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

from pipeline.config import split_address
from pipeline.config.security import nsqd_security_args
from pipeline.ops.processes import nsqadmin_args, nsqd_args, nsqlookupd_args

BIN = "%(ENV_NSQ_PIPELINE_BIN)s"
PYTHON = "%(ENV_NSQ_PIPELINE_PYTHON)s"
HERE = "%(here)s"
LOG_MAXBYTES = "10MB"
LOG_BACKUPS = 5
NSQD_STOPWAITSECS = 60  # nsqd writes its in-memory queues to disk on SIGTERM
WORKER_STARTSECS = 2  # a worker with a broken handler fails well within this (the handler is imported first)
WORKER_STARTRETRIES = 3
RESTARTER_BASE, RESTARTER_MAX = 1, 60  # seconds of back-off before a FATAL worker is started again

PRIORITY = {"restarter": 10, "nsqlookupd": 100, "auth": 150, "nsqd": 200, "nsqadmin": 300, "gateway": 350,
            "worker": 400, "monitor": 500}


def conf_path(topology_path: Path) -> Path:
    """Where the rendered config of ``topology_path`` lives: beside it.

    ``topology.yaml`` → ``supervisord.conf``; ``other.yaml`` → ``other.supervisord.conf``.
    """
    stem = topology_path.stem
    name = "supervisord.conf" if stem == "topology" else f"{stem}.supervisord.conf"
    return topology_path.with_name(name)


def var_path(topology) -> str:
    """The var dir as the config names it: under ``%(here)s`` unless the topology gives an absolute path."""
    var = topology.nsq.var_dir
    return var if PurePosixPath(var).is_absolute() else f"{HERE}/{var}"


def socket_path(topology) -> Path:
    """The supervisord control socket of ``topology``."""
    return topology.var_dir / "run" / "supervisor.sock"


def worker_stopwaitsecs(stage) -> int:
    """Seconds supervisord waits after SIGTERM: above the worker's drain deadline."""
    drain = stage.publish_timeout + 2.0 + 2.0  # batches in hand, CLOSE_WAIT, flush
    return int(math.ceil(drain)) + 10


def render(topology) -> str:
    """Return the supervisord configuration of ``topology``."""
    var = var_path(topology)
    sections = [*_supervisord(var), *_nsq_programs(topology, var), _restarter(var)]
    sections += [_stage(topology, name, stage, var) for name, stage in topology.stages.items()]
    if getattr(topology, "monitor", None) is not None:
        sections.append(_monitor(topology, var))
    sections += _edge_programs(topology, var)
    header = ("; Rendered by `pipeline render` from the topology; do not edit by hand.\n"
              "; `pipeline up` starts supervisord (`python -m pipeline.ops.supervise`: supervisord woken every 0.1 s,\n"
              "; so a dead worker is started again at once) with NSQ_PIPELINE_BIN and NSQ_PIPELINE_PYTHON set.\n")
    return header + "\n".join(_format(title, options) for title, options in sections)


def _format(title: str, options: dict[str, object]) -> str:
    lines = [f"[{title}]"]
    lines += [f"{key}={value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def _command(argv: list[str]) -> str:
    # supervisord splits the command with shlex after expanding %(...)s, so
    # quoting keeps a path with spaces in one piece.
    return " ".join(f'"{a}"' if "%(here)s" in a or "%(ENV_" in a else a for a in map(str, argv))


def _logs(var: str, name: str) -> dict[str, object]:
    return {"redirect_stderr": "true", "stdout_logfile": f"{var}/log/{name}.log",
            "stdout_logfile_maxbytes": LOG_MAXBYTES, "stdout_logfile_backups": LOG_BACKUPS}


def _supervisord(var: str) -> list[tuple[str, dict]]:
    return [
        ("unix_http_server", {"file": f"{var}/run/supervisor.sock", "chmod": "0700"}),
        ("supervisord", {"logfile": f"{var}/log/supervisord.log", "logfile_maxbytes": LOG_MAXBYTES,
                         "logfile_backups": LOG_BACKUPS, "pidfile": f"{var}/run/supervisord.pid",
                         "childlogdir": f"{var}/log", "identifier": "nsq-pipeline", "umask": "022"}),
        ("rpcinterface:supervisor", {"supervisor.rpcinterface_factory":
                                     "supervisor.rpcinterface:make_main_rpcinterface"}),
        ("supervisorctl", {"serverurl": f"unix://{var}/run/supervisor.sock"}),
    ]


def _daemon(name: str, argv: list[str], kind: str, var: str, stopwaitsecs: int = 10) -> tuple[str, dict]:
    options = {"command": _command(argv), "priority": PRIORITY[kind], "autostart": "true",
               "autorestart": "true", "startsecs": 1, "stopsignal": "TERM", "stopwaitsecs": stopwaitsecs,
               **_logs(var, name)}
    return f"program:{name}", options


def _nsq_programs(topology, var: str) -> list[tuple[str, dict]]:
    nsq = topology.nsq
    programs = [_daemon(f"nsqlookupd-{i}",
                        nsqlookupd_args(tcp=lookupd.tcp, http=lookupd.http, binary=f"{BIN}/nsqlookupd"),
                        "nsqlookupd", var) for i, lookupd in enumerate(nsq.lookupd)]
    lookupd_tcp = [lookupd.tcp for lookupd in nsq.lookupd]
    for i, n in enumerate(nsq.nsqd):
        # nsqd derives its node id (part of every message id) from the hostname,
        # so nodes on one host would share one; each gets its own.
        extra = [f"--node-id={i}", *_broadcast_port(n), *nsqd_security_args(topology), *nsq.nsqd_flags(n)]
        broadcast = split_address(n.proxy_tcp)[0] if n.proxy_tcp else "127.0.0.1"
        argv = nsqd_args(tcp=n.tcp, http=n.http, data_dir=f"{var}/nsqd/{n.name}", lookupd_tcp=lookupd_tcp,
                         broadcast=broadcast, extra=extra, binary=f"{BIN}/nsqd")
        programs.append(_daemon(f"nsqd-{n.name}", argv, "nsqd", var, NSQD_STOPWAITSECS))
    if nsq.admin and nsq.lookupd:
        argv = nsqadmin_args(http=nsq.admin, lookupd_http=[lookupd.http for lookupd in nsq.lookupd],
                             binary=f"{BIN}/nsqadmin")
        if nsq.admin_users:  # privileged actions only for these users, as the proxy in front names them
            argv += [f"--acl-http-header={nsq.admin_acl_header}", *(f"--admin-user={u}" for u in nsq.admin_users)]
        programs.append(_daemon("nsqadmin", argv, "nsqadmin", var))
    return programs


def _broadcast_port(nsqd) -> list[str]:
    """With ``proxy_tcp``, lookupd hands out the proxy's port (and host) instead of nsqd's own."""
    return [f"--broadcast-tcp-port={split_address(nsqd.proxy_tcp)[1]}"] if nsqd.proxy_tcp else []


def _restarter(var: str) -> tuple[str, dict]:
    argv = [PYTHON, "-m", "pipeline.ops.restarter", "--socket", f"{var}/run/supervisor.sock",
            "--events", f"{var}/log/events.jsonl", "--base", str(RESTARTER_BASE), "--max", str(RESTARTER_MAX)]
    # buffer_size: events queue while the listener starts; the default 10 drops
    # them silently when many replicas start at once. stdout carries the protocol.
    options = {"command": _command(argv), "events": "PROCESS_STATE", "buffer_size": 1024,
               "priority": PRIORITY["restarter"], "autostart": "true", "autorestart": "true",
               "stopsignal": "TERM", "stopwaitsecs": 5,
               "stdout_logfile": "NONE", "stderr_logfile": f"{var}/log/restarter.log",
               "stderr_logfile_maxbytes": LOG_MAXBYTES, "stderr_logfile_backups": LOG_BACKUPS}
    return "eventlistener:restarter", options


def _topology_file(topology) -> str:
    return f"{HERE}/{Path(topology.path).name}" if topology.path else "topology.yaml"


def _edge_programs(topology, var: str) -> list[tuple[str, dict]]:
    """The auth server and the gateway, when the topology has them (secrets come from supervisord's environment)."""
    programs = []
    for kind, command, on in (("auth", "auth-server", topology.auth), ("gateway", "gateway", topology.gateway)):
        if on is not None:
            argv = [PYTHON, "-m", "pipeline.cli", command, "-t", _topology_file(topology)]
            name, options = _daemon(kind, argv, kind, var)
            options = {**options, "directory": HERE, "environment": 'PYTHONUNBUFFERED="1"'}
            if kind == "gateway" and on.processes > 1:  # they share the port (SO_REUSEPORT)
                options.update(numprocs=on.processes, process_name="%(program_name)s-%(process_num)d",
                               **_logs(var, "%(program_name)s-%(process_num)d"))
            programs.append((name, options))
    return programs


def _stage(topology, name: str, stage, var: str) -> tuple[str, dict]:
    topology_file = _topology_file(topology)
    argv = [PYTHON, "-m", "pipeline.cli", "worker", name, "--replica", "%(process_num)d", "-t", topology_file]
    options = {
        "command": _command(argv),
        "process_name": "%(program_name)s-%(process_num)d",
        "numprocs": stage.replicas,
        "directory": HERE,  # stage handlers import from the topology's folder
        "priority": PRIORITY["worker"],
        "autostart": "true",
        "autorestart": "true",
        # A worker that dies within startsecs counts as a failed start; after
        # startretries it is FATAL and the restarter starts it again with back-off.
        "startsecs": WORKER_STARTSECS,
        "startretries": WORKER_STARTRETRIES,
        "stopsignal": "TERM",
        "stopwaitsecs": worker_stopwaitsecs(stage),
        "stopasgroup": "true",
        "killasgroup": "true",
        "environment": 'PYTHONUNBUFFERED="1"',
        **_logs(var, "%(program_name)s-%(process_num)d"),
    }
    return f"program:{name}", options



def _monitor(topology, var: str) -> tuple[str, dict]:
    """`pipeline monitor`: samples into health.db, serves NSQ metrics, sends the daily report."""
    topology_file = f"{HERE}/{Path(topology.path).name}" if topology.path else "topology.yaml"
    argv = [PYTHON, "-m", "pipeline.cli", "monitor", "-t", topology_file]
    name, options = _daemon("monitor", argv, "monitor", var, stopwaitsecs=15)
    return name, {**options, "directory": HERE, "environment": 'PYTHONUNBUFFERED="1"'}
