"""Chaos scenarios are validated completely before anything runs, with file:line:col errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chaos.faults import PLUGINS
from chaos.scenario import FAULT_NAMES, ScenarioError, list_scenarios, load_scenario, validate_scenario

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
title: t
steady_state:
  - {probe: workers_running, tolerance: {min: 2}}
method:
  duration: 3
  faults:
    - {fault: kill_worker, signal: KILL, every: [1, 3], probability: 0.5}
expect: {lost: {max: 0}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_every_shipped_scenario_is_valid() -> None:
    names = [p.stem for p in list_scenarios()]
    assert len(names) >= 13
    for path in list_scenarios():
        scenario, problems = validate_scenario(path)
        assert problems == [], problems
        assert scenario.name == path.stem


def test_every_fault_name_has_a_plugin() -> None:
    assert set(FAULT_NAMES) == set(PLUGINS)


def test_a_good_scenario_loads(tmp_path: Path) -> None:
    scenario = load_scenario(_write(tmp_path, GOOD))
    fault = scenario.method.faults[0]
    assert (fault.fault, fault.signal, fault.every, fault.probability) == ("kill_worker", "KILL", [1, 3], 0.5)
    assert scenario.expect["lost"].accepts(0) and not scenario.expect["lost"].accepts(1)


@pytest.mark.parametrize("old, new, expected", [
    ("{fault: kill_worker, signal: KILL,", "{fault: explode, signal: KILL,",
     "scenario.yaml:7:7: method.faults.0: unknown fault 'explode'; expected one of: kill_worker, nsqd_restart"),
    ("probability: 0.5}", "probability: 1.5}", "scenario.yaml:7:70: method.faults.0.probability: must be <= 1"),
    ("probability: 0.5}", "probability: -1}", "scenario.yaml:7:70: method.faults.0.probability: must be >= 0"),
    ("every: [1, 3], probability: 0.5}", "every: [1, 3]}",
     "scenario.yaml:7:7: method.faults.0.probability: required field is missing"),
    ("{probe: workers_running, tolerance: {min: 2}}", "{probe: workers_running}",
     "scenario.yaml:3:5: steady_state.0.tolerance: required field is missing"),
    ("tolerance: {min: 2}", "tolerance: {}", "scenario.yaml:3:41: steady_state.0.tolerance: a tolerance needs min,"),
    ("signal: KILL", "signal: HUP", "scenario.yaml:7:36: method.faults.0.signal: must be one of: KILL, TERM, STOP"),
    ("every: [1, 3]", "every: [3, 1]", "scenario.yaml:7:7: method.faults.0: every: low 3 is above high 1"),
    ("expect: {lost: {max: 0}}", "expect: {lots: {max: 0}}", "scenario.yaml:8:10: expect.lots: must be one of:"),
    ("title: t", "title: t\ntitle: u", "scenario.yaml:2:1: title: duplicate key 'title'"),
])
def test_bad_scenarios_fail_with_file_line_col(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new))
    scenario, problems = validate_scenario(path)
    assert scenario is None
    shown = [str(p).replace(str(tmp_path) + "/", "") for p in problems]
    assert any(s.startswith(expected) for s in shown), shown
    with pytest.raises(ScenarioError):
        load_scenario(path)


def test_cli_refuses_a_bad_scenario_before_starting_anything(tmp_path: Path) -> None:
    # Given a scenario with an unknown fault, and a run folder that does not exist yet
    path = _write(tmp_path, GOOD.replace("fault: kill_worker", "fault: explode"))
    folder = tmp_path / "run"
    # When running it
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "chaos", "run", str(path), "--folder", str(folder)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    # Then it fails with one line naming file, line and field, and nothing was started
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"pipeline: {path}:7:7: method.faults.0: unknown fault 'explode'; expected one of: kill_worker, "
        "nsqd_restart, nsqd_stop, lookupd_kill, toxic, proxy_down, fault_point"]
    assert not folder.exists()


def test_chaos_list_names_every_scenario() -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "chaos", "list"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert listed == [p.stem for p in list_scenarios()]


@pytest.mark.parametrize("extra, expected", [
    ("workload: {kind: ticks, poison: 0.1}", "scenario.yaml:9:11: workload: poison: the ticks workload has no poison"),
    ("workload: {kind: trades}", "scenario.yaml:9:18: workload.kind: must be one of: numbers, ticks"),
    ("workload: {kind: ticks}\nreplay: true", "scenario.yaml:1:1: replay: only the numbers workload can be replayed"),
])
def test_the_ticks_workload_is_validated(tmp_path: Path, extra: str, expected: str) -> None:
    scenario, problems = validate_scenario(_write(tmp_path, GOOD + extra + "\n"))
    assert scenario is None
    shown = [str(p).replace(str(tmp_path) + "/", "") for p in problems]
    assert any(s.startswith(expected) for s in shown), shown
