"""Chaos scenarios as data: ``chaos/scenarios/*.yaml``, validated completely before anything runs.

A scenario is a Chaos Toolkit style experiment: a steady-state hypothesis
(probes, each with a tolerance, checked before and after), a method (the
workload plus faults on a seeded schedule, each fault a plugin with a
probability), rollbacks that always run, and what the checker must find::

    title: a random worker SIGKILLed every 1-3 s
    pipeline: {replicas: 2, msg_timeout: 4}
    workload: {records: 3000, rate: 1500}
    steady_state:
      - {probe: workers_running, tolerance: {min: 2}}
    method:
      duration: 8
      faults:
        - {fault: kill_worker, signal: KILL, every: [1, 3], probability: 1}
    rollbacks: [resume_processes, remove_toxics, disarm_fault_points, start_workers]
    expect: {lost: {max: 0}, unexpected: {max: 0}}

Errors read like topology errors, ``monkey.yaml:12:7: method.faults.0.probability: must be <= 1``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import PipelineError, TopologyError
from pipeline.config.loader import _REASONS, Positions, _parse, _yaml_error

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


class ScenarioError(TopologyError):
    """Raised when a chaos scenario file cannot be read or breaks its schema (``PATH:LINE:COL: field: reason``)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Tolerance(_Spec):
    """The range a measured value must fall in: at least `min`, at most `max` (one or both)."""

    min: float | None = Field(None, description="Smallest acceptable value.")
    max: float | None = Field(None, description="Largest acceptable value.")

    @model_validator(mode="after")
    def _bounds(self) -> Tolerance:
        if self.min is None and self.max is None:
            raise ValueError("a tolerance needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    def accepts(self, value: float) -> bool:
        """Tell whether ``value`` is within the tolerance."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        parts = [f">= {self.min:g}" if self.min is not None else "", f"<= {self.max:g}" if self.max is not None else ""]
        return " and ".join(p for p in parts if p)


class Probe(_Spec):
    """One steady-state probe: a measurement and the tolerance it must meet before and after the method."""

    probe: Literal["workers_running", "nsqd_up", "backlog", "worker_rss_mb"] = Field(
        description="workers_running: RUNNING replicas of the target stage; nsqd_up: the nsqd nodes answering"
                    " /ping (0 to pipeline.nsqd); backlog: depth + in-flight + deferred on the pipeline's channels,"
                    " summed over the nodes; worker_rss_mb: the largest resident memory of a worker.")
    tolerance: Tolerance = Field(description="The range the probe's value must fall in.")
    when: Literal["before", "after", "both", "during"] = Field(
        "both", description="When the probe is checked: before and/or after the method, or sampled every"
                            " 0.5 s while the faults run (every sample must be within tolerance).")


Interval = Annotated[list[Annotated[float, Field(ge=0.05, le=3600)]], Field(min_length=2, max_length=2)]


class _Fault(_Spec):
    """Fields every fault plugin has."""

    probability: float = Field(ge=0, le=1, description="Chance that the fault fires at each tick of its schedule.")
    every: Interval | None = Field(
        None, description="Seconds between ticks, drawn uniformly from [low, high] by the seeded RNG; absent:"
                          " one tick at the start of the method.")
    duration: float = Field(0, ge=0, le=3600, description="Seconds a lasting fault (stop, toxic, proxy down) is held.")
    start: float = Field(0, ge=0, le=86400, description="Seconds after the method begins before its schedule starts.")

    @model_validator(mode="after")
    def _interval(self) -> _Fault:
        if self.every is not None and self.every[0] > self.every[1]:
            raise ValueError(f"every: low {self.every[0]:g} is above high {self.every[1]:g}")
        return self


class KillWorker(_Fault):
    """Send a signal to a random RUNNING replica of the target stage (found through supervisord)."""

    fault: Literal["kill_worker"]
    signal: Literal["KILL", "TERM", "STOP"] = Field(description="KILL, TERM, or STOP (then CONT after duration).")
    target: Literal["RUNNING", "STARTING"] = Field(
        "RUNNING", description="Which replicas are victims: RUNNING ones, or STARTING ones (killing a process"
                               " before startsecs is a failed start: repeated, supervisord's FATAL path).")


NsqdTarget = Literal["random", "all", "n0", "n1", "n2", "n3", "n4"]
_TARGET = Field("n0", description="Which nsqd: a random RUNNING node, all of them, or one by name (n0 is the first;"
                                  " a name must be below pipeline.nsqd).")


class RestartNsqd(_Fault):
    """Signal nsqd (TERM: a clean restart that persists its queues; KILL: outside NSQ's guarantee, unless the
    topics are replicated); supervisord starts it again on the same data path."""

    fault: Literal["nsqd_restart"]
    signal: Literal["TERM", "KILL"] = "TERM"
    target: NsqdTarget = _TARGET


class StopNsqd(_Fault):
    """SIGSTOP nsqd (the target nodes), SIGCONT it after duration."""

    fault: Literal["nsqd_stop"]
    target: NsqdTarget = _TARGET


class KillLookupd(_Fault):
    """SIGKILL nsqlookupd (supervisord starts it again)."""

    fault: Literal["lookupd_kill"]


class Toxic(_Fault):
    """A Toxiproxy toxic on the worker<->nsqd links for duration seconds: on every node's proxy at once."""

    fault: Literal["toxic"]
    toxic: Literal["latency", "bandwidth", "timeout", "reset_peer", "limit_data", "slow_close", "slicer"]
    attributes: dict[str, int] = Field(default_factory=dict, description="The toxic's attributes (Toxiproxy's names).")
    stream: Literal["upstream", "downstream"] = "downstream"


class ProxyDown(_Fault):
    """Disable the worker<->nsqd proxies (every node's) for duration seconds: connections drop, new ones are
    refused."""

    fault: Literal["proxy_down"]


class FaultPoint(_Fault):
    """Arm a crash point inside the workers (SIGKILL of the worker itself) for duration seconds (0: the method)."""

    fault: Literal["fault_point"]
    point: Literal["after_receive", "after_publish", "publish_callback"]
    chance: float = Field(ge=0, le=1, description="Chance per event (message, batch, answer) that the worker dies.")
    grace: float = Field(2.5, ge=0, le=600,
                         description="Seconds after a worker starts before its points fire (beyond startsecs keeps"
                                     " it out of the FATAL path; 0 drives it there).")


Fault = Annotated[Union[KillWorker, RestartNsqd, StopNsqd, KillLookupd, Toxic, ProxyDown, FaultPoint],
                  Field(discriminator="fault")]
FAULT_NAMES = ("kill_worker", "nsqd_restart", "nsqd_stop", "lookupd_kill", "toxic", "proxy_down", "fault_point")


class Method(_Spec):
    """What happens during the experiment: the workload runs while the faults fire."""

    duration: float = Field(10, gt=0, le=86400, description="Seconds the faults are injected (--duration).")
    faults: list[Fault] = Field(default_factory=list, description="The fault plugins and their schedules.")


class PipelineSpec(_Spec):
    """The pipeline the scenario runs behind Toxiproxy: the primes stage, or the ticks pipeline (workload.kind)."""

    replicas: int = Field(2, ge=1, le=16, description="Replicas of the stage; for the ticks pipeline, the partitions"
                                                      " of ticks and features (one features and one signals replica"
                                                      " per partition).")
    msg_timeout: float = Field(5, ge=1, le=900)
    publish_timeout: float = Field(2, ge=0.1, le=600)
    max_tries: int = Field(5, ge=1, le=65535)
    crash_tries: int = Field(2, ge=1, le=100, description="Worker deaths holding a record before it is dead-lettered.")
    handler: str = Field("consumers.primes:classify", min_length=1,
                         description="The numbers stage's handler: the primes stage, or a variant of it such as"
                                     " chaos.crashing:classify (kills its worker on the workload's crash records).")
    max_in_flight: int = Field(200, ge=1, le=2500)
    batch_size: int = Field(64, ge=1, le=10000)
    nsqd_args: list[str] = Field(default_factory=list, description="Extra nsqd flags, e.g. --mem-queue-size=0.")
    nsqd: int = Field(1, ge=1, le=5, description="nsqd nodes (n0, n1, ...), each behind its own Toxiproxy proxy;"
                                                 " producers spread over them, sinks read every one.")
    replication: int = Field(1, ge=1, le=5, description="Copies of every message (each topic's `replication`);"
                                                        " at most nsqd.")

    @model_validator(mode="after")
    def _copies_fit(self) -> PipelineSpec:
        if self.replication > self.nsqd:
            raise ValueError(f"replication: {self.replication} copies need as many nsqd, not {self.nsqd}")
        return self


class Workload(_Spec):
    """The records the journaling producer publishes while the faults run."""

    kind: Literal["numbers", "ticks"] = Field(
        "numbers", description="numbers: the primes stage; ticks: topology.yaml's features and signals stages on"
                               " seeded synthetic ticks, checked against the offline reference.")
    symbols: int = Field(16, ge=1, le=10_000, description="Symbols of the synthetic ticks (kind: ticks).")
    records: int = Field(3000, ge=1, le=100_000_000, description="Numbers published (--records).")
    rate: float = Field(1500, gt=0, description="Records per second.")
    poison: float = Field(0, ge=0, le=1, description="Share of records that are poison (no valid number).")
    crashes: list[Literal["exit", "segv"]] = Field(
        default_factory=list, max_length=100,
        description="Records that kill their worker under chaos.crashing:classify (exit: os._exit(1); segv: a"
                    " segfault), one each, at seeded places among the records; they must be dead-lettered with"
                    " the cause, after at most crash_tries + 1 worker deaths each.")
    chunk: int = Field(50, ge=1, le=5000, description="Records per MPUB.")

    @model_validator(mode="after")
    def _ticks_have_no_poison(self) -> Workload:
        if self.kind == "ticks" and self.poison:
            raise ValueError("poison: the ticks workload has no poison records (kind: ticks)")
        if self.kind == "ticks" and self.crashes:
            raise ValueError("crashes: the ticks workload has no crash records (kind: ticks)")
        if len(self.crashes) > self.records:
            raise ValueError(f"crashes: {len(self.crashes)} crash records do not fit in {self.records} records")
        return self


Rollback = Literal["resume_processes", "remove_toxics", "disarm_fault_points", "start_workers"]
ROLLBACKS: tuple[str, ...] = ("resume_processes", "remove_toxics", "disarm_fault_points", "start_workers")
ExpectKey = Literal["lost", "unexpected", "duplicated", "dead_lettered", "misclassified", "mismatched",
                    "lost_after_replay",
                    "recovery_p99", "recovery_clear_p99", "poison_not_dead_lettered", "fatal", "point_kills", "kills",
                    "crash_not_dead_lettered", "restarts_per_crash"]


class Scenario(_Spec):
    """One chaos experiment."""

    title: str = Field(min_length=1)
    description: str = ""
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    workload: Workload = Field(default_factory=Workload)
    steady_state: list[Probe] = Field(min_length=1, description="The hypothesis: probes with tolerances.")
    method: Method = Field(default_factory=Method)
    rollbacks: list[Rollback] = Field(default_factory=lambda: list(ROLLBACKS),
                                      description="Actions that always run after the method, even on Ctrl-C.")
    replay: bool = Field(False, description="Republish acked-but-missing ids after the check, then check again.")
    expect: dict[ExpectKey, Tolerance] = Field(description="What the checker must find.")

    @model_validator(mode="after")
    def _replay_numbers_only(self) -> Scenario:
        if self.replay and self.workload.kind != "numbers":
            raise ValueError("replay: only the numbers workload can be replayed")
        return self

    @property
    def name(self) -> str:
        return self._name

    _name: str = ""


def _missing_targets(scenario: Scenario) -> list[tuple[tuple[str, ...], str]]:
    """(location, reason) of every nsqd fault aimed at a node the pipeline does not have."""
    nodes = scenario.pipeline.nsqd
    return [(("method", "faults", str(i), "target"), f"no nsqd {fault.target}: pipeline.nsqd is {nodes}"
             f" (n0..n{nodes - 1})")
            for i, fault in enumerate(scenario.method.faults)
            if isinstance(fault, (RestartNsqd, StopNsqd)) and fault.target[1:].isdigit()
            and int(fault.target[1:]) >= nodes]


# --- loading -------------------------------------------------------------------------------------

def _reason(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "union_tag_invalid":
        return f"unknown fault {ctx.get('tag')!r}; expected one of: {', '.join(FAULT_NAMES)}"
    if kind == "union_tag_not_found":
        return "a fault needs `fault:` naming its plugin"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        return "must be one of: " + ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in _REASONS:
        return _REASONS[kind].format(**ctx)
    return error["msg"][:1].lower() + error["msg"][1:]


def _loc(error: dict[str, Any]) -> tuple[str, ...]:
    # Discriminated unions add the tag to the location: method.faults.0.kill_worker.signal.
    return tuple(str(p) for p in error["loc"] if str(p) not in FAULT_NAMES)


def _to_error(shown: str, positions: Positions, error: dict[str, Any]) -> ScenarioError:
    loc = _loc(error)
    on_key = error["type"] in ("extra_forbidden", "missing") or loc[-1:] == ("[key]",)
    loc = loc[:-1] if loc[-1:] == ("[key]",) else loc
    line, col = positions.locate(loc, at_key=on_key)
    return ScenarioError(shown, line, col, ".".join(loc), _reason(error))


def validate_scenario(path: str | os.PathLike[str]) -> tuple[Scenario | None, list[ScenarioError]]:
    """Read and validate a scenario file; return it, or None and every problem sorted by line."""
    shown = os.fspath(path)
    try:
        data, positions = _parse(Path(shown).read_text(encoding="utf-8"))
    except OSError as e:
        return None, [ScenarioError(shown, 0, 0, "", f"cannot read: {e.strerror or e}")]
    except Exception as e:  # yaml.YAMLError
        err: TopologyError = _yaml_error(shown, e)
        return None, [ScenarioError(shown, err.line, err.col, "", err.reason)]
    if not isinstance(data, dict):
        return None, [ScenarioError(shown, *positions.root, "", "a scenario must be a mapping")]
    problems = [ScenarioError(shown, *positions.locate(loc, at_key=True), ".".join(loc), reason)
                for loc, reason in positions.duplicates]
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        problems += [_to_error(shown, positions, err) for err in e.errors(include_url=False)]
        scenario = None
    if scenario is not None:
        problems += [ScenarioError(shown, *positions.locate(loc), ".".join(loc), reason)
                     for loc, reason in _missing_targets(scenario)]
    if problems:
        return None, sorted(problems, key=lambda p: (p.line, p.col))
    scenario._name = Path(shown).stem
    return scenario, []


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Load a scenario; raise its first problem as :class:`ScenarioError`."""
    scenario, problems = validate_scenario(path)
    if scenario is None:
        raise problems[0]
    return scenario


def find_scenario(name: str) -> Path:
    """Return the file of scenario ``name`` (a path, or a name under ``chaos/scenarios``).

    Raises:
        ScenarioError: no such file; the message lists the known scenarios.
    """
    path = Path(name)
    if path.is_file():
        return path
    candidate = SCENARIO_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(p.stem for p in list_scenarios())
    raise PipelineError(f"no scenario {name!r} (a file, or one of: {known})")


def list_scenarios() -> list[Path]:
    """The scenario files shipped in ``chaos/scenarios``, sorted by name."""
    return sorted(SCENARIO_DIR.glob("*.yaml"))
