"""Scenario 13, short: the ticks pipeline under the monkey, every output equal to the offline reference.

The features and signals stages of topology.yaml run under supervisord on 2
partitions (4 workers) behind Toxiproxy while a random replica is SIGKILLed
every 1-3 s; the journaled ticks give the reference the checker compares with
(the full version, 4 partitions and 20,000 ticks, runs in `make chaos`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from chaos.run import run_scenario
from chaos.scenario import find_scenario, load_scenario
from pipeline.ops.install_toxiproxy import install_toxiproxy

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.fixture(scope="module", autouse=True)
def binaries(nsq_bin: Path) -> None:
    install_toxiproxy(log=lambda line: None)


def _short(name: str):
    scenario = load_scenario(find_scenario(name))
    probes = [p.model_copy(update={"tolerance": p.tolerance.model_copy(update={"min": 4})})
              if p.probe == "workers_running" else p for p in scenario.steady_state]
    short = scenario.model_copy(update={
        "pipeline": scenario.pipeline.model_copy(update={"replicas": 2}),
        "workload": scenario.workload.model_copy(update={"records": 4000, "rate": 800}),
        "method": scenario.method.model_copy(update={"duration": 6}),
        "expect": {**scenario.expect, "kills": scenario.expect["kills"].model_copy(update={"min": 2})},
        "steady_state": probes})
    short._name = scenario.name
    return short


def test_ticks_outputs_equal_the_reference_while_replicas_are_sigkilled(tmp_path: Path) -> None:
    result = run_scenario(_short("13_ticks_monkey"), seed=20261122, folder=tmp_path / "run")
    report = result.report
    assert report is not None, result.failures
    assert (report.lost, report.unexpected, report.mismatched) == (0, 0, 0), (report.lost_ids[:5], result.faults)
    assert report.kills >= 2, result.faults
    assert report.acked == 4000 and report.delivered > 4000  # every feature, and the signals on top
    assert result.config["stages"] == ["features", "signals"]
    assert result.passed, (result.failures, result.faults)
