"""The chaos harness on several nsqd: one proxy per node, sinks and producer over every node, nsqd targets.

Most of these need no running pipeline: the topology the environment writes,
supervisord's rendering of it, the fault targets (on real `sleep` processes
behind a fake supervisord) and the checker's copies. The last test runs a
tiny scenario on 3 nsqd and SIGKILLs a random one: supervisord must start it
again, and the harness must read and report every node.
"""
from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from nsqhttp import wait_until

from chaos.checker import check
from chaos.environment import ChaosEnvironment
from chaos.faults import FaultContext, RestartNsqdFault, StopNsqdFault
from chaos.run import run_scenario
from chaos.scenario import PipelineSpec, RestartNsqd, StopNsqd, load_scenario, validate_scenario
from chaos.sink import Arrival
from chaos.workload import Journal
from pipeline.config import load_topology
from pipeline.ops.install_toxiproxy import install_toxiproxy
from pipeline.ops.supervisor_conf import render

THREE_NODES = """\
title: three nodes
pipeline: {nsqd: 3, replicas: 1, msg_timeout: 2, publish_timeout: 1}
workload: {records: 300, rate: 300, chunk: 25}
steady_state:
  - {probe: workers_running, tolerance: {min: 1}}
  - {probe: nsqd_up, tolerance: {min: 3}}
  - {probe: backlog, tolerance: {max: 0}, when: after}
method:
  duration: 2
  faults:
    - {fault: nsqd_restart, signal: KILL, target: random, start: 0.5, probability: 1}
expect: {unexpected: {max: 0}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("old, new, expected", [
    ("target: random", "target: n3", "scenario.yaml:11:51: method.faults.0.target: no nsqd n3: pipeline.nsqd is 3"),
    ("target: random", "target: any", "scenario.yaml:11:51: method.faults.0.target: must be one of: random, all, n0"),
    ("nsqd: 3,", "nsqd: 6,", "scenario.yaml:2:18: pipeline.nsqd: must be <= 5"),
    ("nsqd: 3,", "nsqd: 3, replication: 4,", "scenario.yaml:2:11: pipeline: replication: 4 copies need as many nsqd"),
])
def test_nodes_replication_and_targets_are_validated(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert load_scenario(_write(tmp_path, THREE_NODES)).method.faults[0].target == "random"
    scenario, problems = validate_scenario(_write(tmp_path, THREE_NODES.replace(old, new)))
    assert scenario is None
    shown = [str(p).replace(str(tmp_path) + "/", "") for p in problems]
    assert any(s.startswith(expected) for s in shown), shown


def test_one_node_stays_the_default() -> None:
    spec = PipelineSpec()
    assert (spec.nsqd, spec.replication) == (1, 1)
    assert RestartNsqd(fault="nsqd_restart", probability=1).target == "n0"


@pytest.mark.parametrize("kind", ["numbers", "ticks"])
def test_each_node_has_its_name_proxy_and_node_id(tmp_path: Path, kind: str) -> None:
    env = ChaosEnvironment(tmp_path, PipelineSpec(nsqd=3, replicas=2), kind=kind)
    env.topology = load_topology(env._write_topology())
    assert [n.name for n in env.nodes] == ["n0", "n1", "n2"]
    assert env.proxies == ["nsqd-n0", "nsqd-n1", "nsqd-n2"]
    addresses = [a for n in env.nodes for a in (n.tcp, n.http, n.proxy_tcp)]
    assert len(set(addresses)) == 9
    conf = render(env.topology)
    assert [f"--node-id={k}" in conf.split(f"[program:nsqd-n{k}]")[1].split("[")[0] for k in range(3)] == [True] * 3
    # one copy: the topics say nothing of replication (the field is the topology's, when it has it)
    assert all("replication" not in t for t in yaml.safe_load((tmp_path / "topology.yaml").read_text())["topics"]
               .values())


@pytest.mark.parametrize("kind", ["numbers", "ticks"])
def test_replication_is_written_on_every_topic(tmp_path: Path, kind: str) -> None:
    path = ChaosEnvironment(tmp_path, PipelineSpec(nsqd=3, replication=2), kind=kind)._write_topology()
    topics = yaml.safe_load(path.read_text())["topics"]
    assert len(topics) == 3 and {t["replication"] for t in topics.values()} == {2}, topics


class _Supervisor:
    """supervisord's process list, for a fault that only reads it (the test is about choosing targets)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def processes(self) -> list:
        return [SimpleNamespace(name=g, group=g, full_name=f"{g}:{g}", state="RUNNING", pid=pid)
                for g, pid in self.pids.items()]


@pytest.fixture
def three_sleepers(tmp_path: Path):
    """Three `sleep` processes standing in for nsqd n0..n2, and a fault context over them."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    env = SimpleNamespace(nodes=[SimpleNamespace(name=f"n{k}") for k in range(3)], note_pid=lambda *a: None,
                          supervisor=_Supervisor({f"nsqd-n{k}": p.pid for k, p in enumerate(procs)}))
    yield FaultContext(env, random.Random(1)), procs  # type: ignore[arg-type]
    for p in procs:
        p.kill()
        p.wait()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][0]


def _wait_state(*pids: int, state: str) -> None:
    """Wait until every process in ``pids`` is in ``state`` (T: stopped, S: sleeping)."""
    wait_until(lambda: all(_state(pid) == state for pid in pids), 5, message=f"processes {pids} not {state}")


def test_nsqd_faults_hit_their_target(three_sleepers) -> None:
    ctx, procs = three_sleepers
    # one node by name
    line = RestartNsqdFault(RestartNsqd(fault="nsqd_restart", signal="TERM", target="n1", probability=1)).inject(ctx)
    assert line == f"SIGTERM nsqd-n1:nsqd-n1 pid {procs[1].pid}"
    assert procs[1].wait(5) == -signal.SIGTERM
    ctx.env.supervisor.pids.pop("nsqd-n1")  # supervisord would list its successor; here it is gone
    # all of them: stopped together, continued together
    stop = StopNsqdFault(StopNsqd(fault="nsqd_stop", target="all", probability=1, duration=1))
    assert stop.inject(ctx).count("SIGSTOP") == 2
    _wait_state(procs[0].pid, procs[2].pid, state="T")
    stop.heal(ctx)
    _wait_state(procs[0].pid, procs[2].pid, state="S")
    # a random one, by the run's seed
    victims = collections.Counter()
    for _ in range(20):
        fault = StopNsqdFault(StopNsqd(fault="nsqd_stop", target="random", probability=1))
        victims[fault.inject(ctx).split()[1]] += 1
        fault.heal(ctx)
    assert set(victims) == {"nsqd-n0:nsqd-n0", "nsqd-n2:nsqd-n2"}
    assert [k.signal for k in ctx.kills] == ["SIGTERM"]  # a stop is not a kill


def test_copies_are_not_duplicates() -> None:
    journal = Journal(sent={"a": 2, "b": 3}, acked={"a", "b"})
    arrivals = [Arrival("prime", "a", 2, 1, 0.0, True, node="n0"), Arrival("prime", "a", 2, 1, 0.0, True, node="n1"),
                *[Arrival("prime", "b", 3, 1, 0.0, True, node=n) for n in ("n0", "n1", "n2")]]
    assert check(journal, arrivals, "numbers.dead").duplicated == 2
    report = check(journal, arrivals, "numbers.dead", copies=2)
    assert (report.duplicated, report.lost) == (1, 0)  # b came three times: one more than its two copies


@pytest.mark.integration
@pytest.mark.chaos
def test_a_random_nsqd_sigkilled_is_restarted_and_every_node_is_read(nsq_bin: Path, tmp_path: Path) -> None:
    install_toxiproxy(log=lambda line: None)
    scenario = load_scenario(_write(tmp_path, THREE_NODES))
    folder = tmp_path / "run"
    result = run_scenario(scenario, seed=3, folder=folder)
    # The steady state after the method (nsqd_up 3, backlog 0) held, and nothing arrived that was not sent
    assert result.passed and result.drained, (result.failures, result.faults)
    assert result.report.acked == 300 and result.report.lost <= 300
    [(_, text)] = result.faults
    victim = text.split()[1].partition(":")[0]
    assert text.startswith("SIGKILL nsqd-n") and victim in ("nsqd-n0", "nsqd-n1", "nsqd-n2")
    # supervisord started the killed nsqd again (autorestart), on the same data path
    log = (folder / "var" / "log" / "supervisord.log").read_text()
    assert log.count(f"spawned: '{victim}'") == 2, log
    # the producer spread over every node, and the sinks read every one
    nodes = {json.loads(line)["node"] for line in (folder / "arrivals.jsonl").read_text().splitlines()}
    assert nodes == {n.tcp for n in load_topology(folder / "topology.yaml").nsq.nsqd}
    assert len(result.config["nsqd_nodes"]) == 3
