"""One chaos run: validate, start the environment, hypothesis, method, rollbacks, drain, check, report.

Example::

    from chaos.run import run_scenario
    from chaos.scenario import find_scenario, load_scenario

    result = run_scenario(load_scenario(find_scenario("monkey")), seed=7, records=3000)
    assert result.passed, result.failures

Rollbacks and teardown run in ``finally`` blocks, so a Ctrl-C (KeyboardInterrupt)
or an exception anywhere still heals every fault and stops every process.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.client import nsqd_http
from pipeline.errors import PipelineError

from .checker import Report, check, consumed_at, node_outages
from .environment import SINK_CHANNEL, ChaosEnvironment
from .faults import disarm_fault_points, nsqd_group
from .market_check import check_ticks
from .monkey import Monkey, RecoveryTracker
from .replay import replay_missing
from .scenario import Probe, Scenario
from .sink import Sinks
from .tick_workload import TicksJournalingProducer
from .workload import Journal, JournalingProducer

DRAIN_TIMEOUT = 120.0
# nsqd flags that differ from node to node: the configuration lists each node instead
PER_NODE_FLAGS = ("--node-id", "--tcp-address", "--http-address", "--data-path", "--broadcast-tcp-port")
Log = Callable[[str], None]


@dataclass
class RunResult:
    """What a run found: the report (and after replay), probe and expectation failures, the fault log."""

    scenario: str
    seed: int
    folder: Path
    report: Report | None = None
    after_replay: Report | None = None
    replayed: int = 0
    faults: list[tuple[float, str]] = field(default_factory=list)
    injected: int = 0
    restarts: int = 0
    drained: bool = False
    failures: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    #: The scenario's expectations, measure -> tolerance (e.g. ``{"lost": "<= 0"}``).
    expect: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "seed": self.seed, "folder": str(self.folder), "passed": self.passed,
                "failures": self.failures, "drained": self.drained, "injected": self.injected,
                "worker_restarts": self.restarts, "replayed": self.replayed, "config": self.config,
                "expect": self.expect,
                "report": self.report.to_dict() if self.report else None,
                "after_replay": self.after_replay.to_dict() if self.after_replay else None,
                "fault_log": self.faults}


def run_scenario(scenario: Scenario, *, seed: int = 0, records: int | None = None, duration: float | None = None,
                 folder: Path | None = None, log: Log = lambda line: None) -> RunResult:
    """Run ``scenario`` on a fresh private pipeline; return what the checker found.

    ``records`` and ``duration`` override the scenario's workload size and method duration.
    """
    workload = scenario.workload.model_copy(update={"records": records} if records else {})
    method_s = duration if duration is not None else scenario.method.duration
    folder = Path(folder or Path("var") / "chaos" / f"{scenario.name}-{seed}-{time.strftime('%Y%m%dT%H%M%S')}")
    result = RunResult(scenario.name, seed, folder.absolute())
    env = ChaosEnvironment(folder, scenario.pipeline, kind=workload.kind)
    stop = threading.Event()
    try:
        log(f"starting the pipeline in {folder}")
        try:
            env.start()
        except PipelineError as e:  # e.g. a topology field this checkout lacks: the suite goes on
            result.failures.append(f"the pipeline did not start: {e}")
            return _finish(scenario, result)
        result.config = _config(env, scenario, workload, method_s)
        sinks = Sinks(env.tcp_addresses, env.topics.sinks, SINK_CHANNEL, env.topics.dead_topics,
                      folder / "arrivals.jsonl", keep_records=env.kind == "ticks").start()
        tracker = RecoveryTracker(env, env.stages).start()
        try:
            _probes(env, scenario.steady_state, "before", result, sinks)
            if not result.failures:
                log(f"method: {workload.records} records at {workload.rate:g}/s, faults for {method_s:g} s "
                    f"(seed {seed})")
                monkey = Monkey(env, list(scenario.method.faults), seed, method_s)
                sampler = threading.Thread(target=_sample_during, args=(env, scenario.steady_state, result, stop),
                                           name="probes", daemon=True)
                sampler.start()
                try:
                    _method(env, monkey, workload, seed, folder, stop)
                finally:
                    sampler.join(timeout=5)
                    stop.set()
                    monkey.heal_all()
                    _rollbacks(env, scenario.rollbacks)
                    result.faults, result.injected = monkey.log.entries, monkey.injected
                log("healed; draining")
                result.drained = _drain(env, sinks, scenario.pipeline.msg_timeout)
                _probes(env, scenario.steady_state, "after", result, sinks)
                result.report = _check(env, folder, sinks, monkey, tracker)
                if scenario.replay:
                    result.replayed = replay_missing(folder, env.tcp_addresses, env.topics.input,
                                                     spec=env.topology.topics[env.topics.input])
                    log(f"replayed {result.replayed} missing records; draining")
                    _drain(env, sinks, scenario.pipeline.msg_timeout)
                    result.after_replay = _check(env, folder, sinks, monkey, tracker)
            result.restarts = tracker.restarts
        finally:
            tracker.stop()
            sinks.stop()
    finally:
        stop.set()
        log("stopping the pipeline")
        env.stop()
    return _finish(scenario, result)


def _finish(scenario: Scenario, result: RunResult) -> RunResult:
    """Hold the result against the scenario's expectations and write ``report.json``."""
    result.expect = {key: str(tolerance) for key, tolerance in scenario.expect.items()}
    _expect(scenario, result)
    (result.folder / "report.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def _config(env: ChaosEnvironment, scenario: Scenario, workload, method_s: float) -> dict:
    stage = env.topology.stage(env.stages[0])
    commands = _nsqd_flags(env.supervisor.conf.read_text())
    flags = commands.get(env.nodes[0].name, [])
    return {"nsqd_version": "1.3.0", "nsqd_args": list(env.nodes[0].args),
            "nsqd_flags": [a for a in flags if not a.startswith(PER_NODE_FLAGS)],
            "nsqd_nodes": [f"{n.name} (node id {_flag(commands.get(n.name, []), '--node-id')}) {n.tcp},"
                           f" proxy {n.proxy_tcp}" for n in env.nodes],
            "replication": env.spec.replication, "replicas": stage.replicas,
            "msg_timeout": stage.msg_timeout, "max_in_flight": stage.max_in_flight, "max_tries": stage.max_tries,
            "crash_tries": stage.crash_tries, "handler": stage.handler,
            "publish_timeout": stage.publish_timeout, "records": workload.records, "rate": workload.rate,
            "poison": workload.poison, "duration": method_s, "supervisord": _supervisord_settings(env),
            "workload": workload.kind, "stages": list(env.stages),
            # recovery is mostly a worker's CPU-bound start (imports, numba): the host's load matters
            "host": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} when the run started"}


def _nsqd_flags(conf: str) -> dict[str, list[str]]:
    """The flags of each nsqd program in a rendered supervisord.conf, by node name."""
    found = {}
    for section in conf.split("[program:nsqd-")[1:]:
        name, _, body = section.partition("]")
        command = next((line.partition("=")[2] for line in body.splitlines() if line.startswith("command=")), "")
        found[name] = [a.strip('"') for a in command.split() if a.strip('"').startswith("--")]
    return found


def _flag(flags: list[str], name: str) -> str:
    return next((a.partition("=")[2] for a in flags if a.startswith(name + "=")), "?")


def _supervisord_settings(env: ChaosEnvironment) -> str:
    from pipeline.ops import supervisor_conf as sc
    stage = env.topology.stage(env.stages[0])
    return (f"autorestart=true, startsecs={sc.WORKER_STARTSECS}, startretries={sc.WORKER_STARTRETRIES}, "
            f"worker stopwaitsecs={sc.worker_stopwaitsecs(stage)}, nsqd stopwaitsecs={sc.NSQD_STOPWAITSECS}, "
            f"restarter back-off {sc.RESTARTER_BASE}-{sc.RESTARTER_MAX} s after FATAL")


def _method(env: ChaosEnvironment, monkey: Monkey, workload, seed: int, folder: Path, stop: threading.Event) -> None:
    journal, run_id = folder / "journal.jsonl", uuid.uuid4().hex[:8]
    if env.kind == "ticks":
        producer = TicksJournalingProducer(env.tcp_addresses, env.topics.input, env.topology.topics[env.topics.input],
                                           journal, run_id=run_id, records=workload.records, rate=workload.rate,
                                           symbols=workload.symbols, chunk=workload.chunk, seed=seed)
    else:
        producer = JournalingProducer(env.tcp_addresses, env.topics.input, journal, run_id=run_id,
                                      records=workload.records, rate=workload.rate, chunk=workload.chunk,
                                      poison=workload.poison, seed=seed, spec=env.topology.topics[env.topics.input],
                                      crashes=workload.crashes)
    threads = [threading.Thread(target=producer.run, args=(stop,), name="producer", daemon=True),
               threading.Thread(target=monkey.run, args=(stop,), name="monkey", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        # join with a timeout: the main thread must stay interruptible by Ctrl-C
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.2)
    finally:
        stop.set()  # on Ctrl-C: the monkey heals what it injected, the producer stops
        for thread in threads:
            thread.join(timeout=15)


def _rollbacks(env: ChaosEnvironment, rollbacks: list[str]) -> None:
    """Always run every rollback; the scenario's list only orders them first."""
    actions = {"resume_processes": env.resume_all, "remove_toxics": env.toxiproxy.reset,
               "disarm_fault_points": lambda: disarm_fault_points(env), "start_workers": lambda: _start_workers(env)}
    for name in [*rollbacks, *(a for a in actions if a not in rollbacks)]:
        actions[name]()


def _start_workers(env: ChaosEnvironment) -> None:
    rpc = env.supervisor.rpc()
    for p in env.supervisor.processes():
        if p.state in ("FATAL", "STOPPED", "EXITED", "BACKOFF"):
            try:
                rpc.supervisor.startProcess(p.full_name, False)
            except Exception:
                pass  # already starting (the restarter got there first)


def backlog(env: ChaosEnvironment) -> int:
    """Depth + in-flight + deferred of the stage's and the sinks' channels (and topics' own depth), summed over
    the nsqd nodes; -1 while a node does not answer."""
    total = 0
    channels = env.channels | {SINK_CHANNEL}
    for http in env.http_addresses:
        try:
            stats = nsqd_http.stats(http)
        except nsqd_http.NsqdHTTPError:
            return -1
        for topic in stats.get("topics") or []:
            total += topic.get("depth", 0)
            for channel in topic.get("channels") or []:
                if channel["channel_name"] in channels:
                    total += (channel.get("depth", 0) + channel.get("in_flight_count", 0)
                              + channel.get("deferred_count", 0))
    return total


def _drain(env: ChaosEnvironment, sinks: Sinks, msg_timeout: float) -> bool:
    """Wait until the backlog is 0 and nothing arrived for longer than msg_timeout; False at the deadline."""
    deadline = time.monotonic() + DRAIN_TIMEOUT + 3 * msg_timeout
    while time.monotonic() < deadline:
        if backlog(env) == 0 and sinks.quiet_for() > msg_timeout + 0.5:
            return True
        time.sleep(0.2)
    return False


def _probe_value(env: ChaosEnvironment, probe: Probe) -> float:
    if probe.probe == "workers_running":
        return sum(1 for p in env.supervisor.processes() if p.group in env.stages and p.state == "RUNNING")
    if probe.probe == "nsqd_up":
        return sum(1 for http in env.http_addresses if _pings(http))
    if probe.probe == "worker_rss_mb":
        return max((_rss_mb(p.pid) for p in env.supervisor.processes() if p.group in env.stages and p.pid),
                   default=0)
    return backlog(env)


def _pings(http: str) -> bool:
    try:
        nsqd_http.request(http, "/ping", method="GET", timeout=1.0)
        return True
    except nsqd_http.NsqdHTTPError:
        return False


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _probes(env: ChaosEnvironment, probes: list[Probe], when: str, result: RunResult, sinks: Sinks) -> None:
    """Check the hypothesis; a probe gets up to 30 s to come within tolerance (processes restart)."""
    for probe in probes:
        if probe.when not in (when, "both"):
            continue
        deadline = time.monotonic() + 30.0
        while not probe.tolerance.accepts(value := _probe_value(env, probe)):
            if time.monotonic() > deadline:
                result.failures.append(f"steady state {when}: {probe.probe} = {value:g}, expected {probe.tolerance}")
                break
            time.sleep(0.2)


def _sample_during(env: ChaosEnvironment, probes: list[Probe], result: RunResult, stop: threading.Event) -> None:
    """Sample the ``during`` probes every 0.5 s until the method ends; note the worst value outside tolerance."""
    during = [p for p in probes if p.when == "during"]
    worst: dict[int, float] = {}
    while during and not stop.wait(0.5):
        for i, probe in enumerate(during):
            try:
                value = _probe_value(env, probe)
            except Exception:
                continue  # supervisord or nsqd busy: the next sample will do
            if not probe.tolerance.accepts(value):
                worst[i] = max(worst.get(i, value), value) if probe.tolerance.max is not None else min(
                    worst.get(i, value), value)
    for i, value in worst.items():
        result.failures.append(f"steady state during the method: {during[i].probe} = {value:g}, "
                               f"expected {during[i].tolerance}")


def _check(env: ChaosEnvironment, folder: Path, sinks: Sinks, monkey: Monkey, tracker: RecoveryTracker) -> Report:
    consuming, point_kills = _consuming(env, monkey, tracker)
    recovery = {"kills": [k for k in monkey.ctx.kills if k.name.partition(":")[0] in env.stages
                          and k.signal != "SIGSTOP"],
                "first_running": dict(tracker.first_running), "consuming": consuming,
                "started": dict(tracker.started),
                "disturbances": [*monkey.ctx.disturbances, *tracker.down]}
    journal = Journal.read(folder / "journal.jsonl")
    if env.kind == "ticks":
        topics = env.topics
        report = check_ticks(journal, list(sinks.arrivals), topics.feature_topics, topics.signals, topics.dead_topics,
                             features=dict(env.topology.stage("features").params),
                             signals=dict(env.topology.stage("signals").params), copies=env.spec.replication,
                             **recovery)
    else:
        report = check(journal, list(sinks.arrivals), env.topics.dead, copies=env.spec.replication, **recovery)
    report.point_kills, report.fatal = point_kills, tracker.fatal
    if report.crash_records:
        report.restarts_per_crash = round(tracker.restarts / report.crash_records, 2)
    return report


def _consuming(env: ChaosEnvironment, monkey: Monkey, tracker: RecoveryTracker) -> tuple[dict[int, float], int]:
    """When each worker process began consuming (subscribed to every nsqd that was up), and the fault point kills.

    The workers note their first subscription to each node in the fault points' events file.
    """
    programs = {node.client_tcp: nsqd_group(node.name) for node in env.nodes}
    subscribed: dict[int, dict[str, float]] = {}
    point_kills = 0
    events = Path(str(env.faultpoints_path) + ".events")
    for line in events.read_text().splitlines() if events.exists() else ():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event["event"] == "subscribed":
            node = programs.get(event.get("node"), "")
            times = subscribed.setdefault(event["pid"], {})
            times[node] = min(event["t"], times.get(node, event["t"]))
        else:
            point_kills += 1
    outages = node_outages([k for k in monkey.ctx.kills if k.name.partition(":")[0] in programs.values()],
                           tracker.down_by, monkey.ctx.stops)
    killed = {kill.pid: kill.t for kill in monkey.ctx.kills if kill.signal != "SIGSTOP"}
    consuming = {pid: t for pid, times in subscribed.items()
                 if (t := consumed_at(times, list(programs.values()), outages, killed.get(pid))) is not None}
    return consuming, point_kills


def _expect(scenario: Scenario, result: RunResult) -> None:
    if result.report is None:
        result.failures.append("no report: the method did not run")
        return
    if not result.drained:
        result.failures.append("the pipeline did not drain")
    for key, tolerance in scenario.expect.items():
        report = result.after_replay if key == "lost_after_replay" else result.report
        if report is None:
            result.failures.append(f"{key}: no report after replay (replay: false)")
            continue
        value = getattr(report, "lost" if key == "lost_after_replay" else key)
        if value is None or not tolerance.accepts(value):
            result.failures.append(f"{key} = {value}, expected {tolerance}")


