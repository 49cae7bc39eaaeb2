"""Render a docker compose file from a topology: one container per NSQ process and per stage replica.

``pipeline render --compose -t docker/topology.yaml`` writes what
``docker/docker-compose.yml`` holds, so the topology and the deployment never
drift. Every address in the topology names its container: an nsqd at
``nsqd-0:4150`` runs in service ``nsqd-0`` and listens there, and stages find
it through the lookupds as on one machine. So the topology of a compose
deployment uses host names, never ``127.0.0.1``.

- nsqlookupd, nsqd and nsqadmin run the official ``nsqio/nsq:v1.3.0`` image;
  each nsqd keeps its queues in a named volume and gets 60 s to persist
  them on stop, as under supervisord; its flags beyond the addresses are
  those ``pipeline up`` gives it: ``nsq.durability``'s, then the node's ``args``.
- each replica of each stage is its own service, ``<stage>-<k>``, running
  ``pipeline worker STAGE --replica k`` in the pipeline image (docker/Dockerfile),
  with its state dir (keyed checkpoints, archives) in a named volume;
  replica numbers matter (replica k of a keyed stage owns partition k), so
  compose's ``scale`` is not used.
- the monitor runs ``pipeline monitor``.
- the topology file reaches every container as a compose config at
  ``/app/topology.yaml``; its ``var_dir`` is taken relative to that.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from pipeline.config import split_address
from pipeline.errors import ComposeError
from pipeline.ops.supervisor_conf import NSQD_STOPWAITSECS, worker_stopwaitsecs

NSQ_IMAGE = "nsqio/nsq:v1.3.0"
PIPELINE_IMAGE = "nsq-pipeline:latest"
TOPOLOGY_IN_CONTAINER = "/app/topology.yaml"
# A stage's replica k serves Prometheus metrics on its metrics_port + k; the image's HEALTHCHECK
# fetches http://127.0.0.1:$METRICS_PORT/metrics (a stage without metrics_port has no healthcheck).
NSQ_HEALTHCHECK = {"interval": "10s", "timeout": "5s", "retries": 3, "start_period": "10s"}


def render_compose(topology, *, build_context: str = "..", dockerfile: str = "docker/Dockerfile") -> str:
    """Return the compose file of ``topology`` (YAML text).

    Parameters:
        build_context: the repository root, relative to where the compose file lives.
        dockerfile: the pipeline image's Dockerfile, relative to ``build_context``.

    Raises:
        ComposeError: an address is an IP literal or localhost, a node's TCP and HTTP hosts differ,
            or two processes would get the same service name.
    """
    services: dict[str, dict[str, Any]] = {}
    where = f"{topology.path}: nsq" if topology.path is not None else "nsq"
    lookupds = [_host(f"{where}.lookupd.{i}", lk.tcp, lk.http) for i, lk in enumerate(topology.nsq.lookupd)]
    for i, lk in enumerate(topology.nsq.lookupd):
        _add(services, lookupds[i], _lookupd(lk, lookupds[i]))
    nsqds = []
    for i, node in enumerate(topology.nsq.nsqd):
        host = _host(f"{where}.nsqd.{i}", node.tcp, node.http)
        nsqds.append(host)
        _add(services, host, _nsqd(i, node, host, topology, lookupds))
    if topology.nsq.admin and topology.nsq.lookupd:
        host = _host(f"{where}.admin", topology.nsq.admin, topology.nsq.admin)
        _add(services, host, _admin(topology, lookupds))
    pipeline = {"image": PIPELINE_IMAGE, "build": {"context": build_context, "dockerfile": dockerfile},
                "working_dir": "/app", "restart": "unless-stopped",
                "configs": [{"source": "topology", "target": TOPOLOGY_IN_CONTAINER}],
                "depends_on": {host: {"condition": "service_healthy"} for host in nsqds}}
    volumes: dict[str, dict] = {f"{host}-data": {} for host in nsqds}
    for name, stage in topology.stages.items():
        for replica in range(stage.replicas):
            service = f"{name}-{replica}"
            volumes[f"{service}-var"] = {}
            _add(services, service, {
                **copy.deepcopy(pipeline),
                "command": ["worker", name, "--replica", str(replica), "-t", TOPOLOGY_IN_CONTAINER],
                **({"environment": {"METRICS_PORT": str(stage.metrics_port + replica)}} if stage.metrics_port
                   else {"healthcheck": {"disable": True}}),  # the image's HEALTHCHECK needs the metrics endpoint
                "volumes": [f"{service}-var:{_var_dir(topology)}"],
                "stop_grace_period": f"{worker_stopwaitsecs(stage)}s",
            })
    if topology.monitor is not None:
        volumes["monitor-var"] = {}
        # The image's HEALTHCHECK probes a worker's metrics; the monitor serves none of its own there.
        _add(services, "monitor", {**copy.deepcopy(pipeline), "command": ["monitor", "-t", TOPOLOGY_IN_CONTAINER],
                                   "volumes": [f"monitor-var:{_var_dir(topology)}"], "healthcheck": {"disable": True}})
    topology_file = topology.path.name if topology.path is not None else "topology.yaml"
    doc = {"services": services, "volumes": volumes, "configs": {"topology": {"file": f"./{topology_file}"}}}
    header = (f"# Rendered by `pipeline render --compose -t {topology_file}`; do not edit by hand.\n"
              "# Build the pipeline image and start everything: docker compose up -d --build\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def _add(services: dict, name: str, service: dict) -> None:
    if name in services:
        raise ComposeError(f"two processes would be compose service {name!r}; give them distinct host names")
    services[name] = service


def _host(where: str, tcp: str, http: str) -> str:
    """The service name of a process: the host of its addresses, which must be one name."""
    host, _ = split_address(tcp)
    if split_address(http)[0] != host:
        raise ComposeError(f"{where}: tcp {tcp} and http {http} must have the same host (its service name)")
    if host in ("localhost", "0.0.0.0") or host[0].isdigit() or host.startswith("["):
        raise ComposeError(f"{where}: address {tcp} must name its compose service (e.g. nsqd-0:4150), "
                           "not an IP address: every process runs in its own container")
    return host


def _var_dir(topology) -> str:
    var = topology.nsq.var_dir
    return var if var.startswith("/") else f"/app/{var}"


def _ping(http: str) -> dict:
    # the nsqio/nsq image is Alpine: busybox wget is there, curl is not
    return {"test": ["CMD", "wget", "-q", "-O", "-", f"http://{http}/ping"], **NSQ_HEALTHCHECK}


def _lookupd(lk, host: str) -> dict:
    return {"image": NSQ_IMAGE, "restart": "unless-stopped",
            "command": ["/nsqlookupd", f"--tcp-address={lk.tcp}", f"--http-address={lk.http}",
                        f"--broadcast-address={host}"],
            "healthcheck": _ping(lk.http)}


def _nsqd(index: int, node, host: str, topology, lookupds: list[str]) -> dict:
    # node ids: containers have distinct host names, but explicit ids keep message ids
    # distinct whatever the host names hash to (as `pipeline up` does).
    command = ["/nsqd", f"--tcp-address={node.tcp}", f"--http-address={node.http}", "--https-address=",
               "--data-path=/data", f"--broadcast-address={host}", f"--node-id={index}",
               *(f"--lookupd-tcp-address={lk.tcp}" for lk in topology.nsq.lookupd),
               *topology.nsq.nsqd_flags(node)]
    service = {"image": NSQ_IMAGE, "restart": "unless-stopped", "command": command,
               "volumes": [f"{host}-data:/data"], "stop_signal": "SIGTERM",
               "stop_grace_period": f"{NSQD_STOPWAITSECS}s", "healthcheck": _ping(node.http)}
    if lookupds:
        service["depends_on"] = {lk: {"condition": "service_started"} for lk in lookupds}
    return service


def _admin(topology, lookupds: list[str]) -> dict:
    port = split_address(topology.nsq.admin)[1]
    return {"image": NSQ_IMAGE, "restart": "unless-stopped",
            "command": ["/nsqadmin", f"--http-address={topology.nsq.admin}",
                        *(f"--lookupd-http-address={lk.http}" for lk in topology.nsq.lookupd)],
            # published on the docker host's loopback only: nsqadmin has no authentication
            "ports": [f"127.0.0.1:{port}:{port}"],
            "depends_on": {lk: {"condition": "service_started"} for lk in lookupds}}
