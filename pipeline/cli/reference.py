"""Commands that run the checkout's reference code: demo, chaos, replay and bench."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.common import load, topology_option
from pipeline.cli.plugins import load_plugin


@click.command()
@click.option("--count", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Publish the numbers 1..COUNT.")
@topology_option
def demo(count: int, topology_path: str) -> None:
    """Start the topology, classify 1..COUNT into prime/non_prime, show the result."""
    numbers, ticks = load_plugin("producers.numbers"), load_plugin("producers.ticks")
    from rich.console import Console

    from pipeline.cli.demo import print_market, print_summary, run_demo, run_market_demo
    topology = load(topology_path)
    out = Console()
    result = run_demo(topology, numbers, count, console=out)
    if "ticks" in topology.topics and "features" in topology.stages:
        print_market(run_market_demo(topology, ticks, out), out)
    print_summary(topology, result, out)


@click.group()
def chaos() -> None:
    """Chaos experiments: faults injected while the checker counts what is lost."""


@chaos.command("list")
def chaos_list() -> None:
    """List the scenarios in chaos/scenarios with their titles (and any validation errors)."""
    scenarios = load_plugin("chaos.scenario")
    paths = scenarios.list_scenarios()
    width = max((len(p.stem) for p in paths), default=0)
    for path in paths:
        scenario, problems = scenarios.validate_scenario(path)
        click.echo(f"{path.stem:{width}} {scenario.title if scenario else problems[0]}")


@chaos.command("run")
@click.argument("scenario_name", metavar="SCENARIO")
@click.option("--seed", type=int, default=None, help="Seed of the fault schedule (default: random, printed).")
@click.option("--records", type=click.IntRange(min=1), default=None, help="Records to publish (scenario's default).")
@click.option("--duration", type=click.FloatRange(min=0.1), default=None,
              help="Seconds of faults (scenario's default).")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the run's topology, logs, journal and report go (default: var/chaos/NAME-SEED-TIME).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result as RELIABILITY.md-style Markdown to this file.")
def chaos_run(scenario_name: str, seed: int | None, records: int | None, duration: float | None,
              folder: Path | None, markdown: Path | None) -> None:
    """Run SCENARIO (a name from `pipeline chaos list` or a file); exit 1 unless it passes."""
    import random

    from rich.console import Console
    scenarios, run, report = load_plugin("chaos.scenario"), load_plugin("chaos.run"), load_plugin("chaos.report")
    # every problem is reported before anything starts
    scenario = scenarios.load_scenario(scenarios.find_scenario(scenario_name))
    seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    result = run.run_scenario(scenario, seed=seed, records=records, duration=duration, folder=folder,
                              log=lambda line: click.echo(f"chaos: {line}", err=True))
    report.print_result(result, Console())
    if markdown is not None:
        report.write_reliability([result], markdown)
    sys.exit(0 if result.passed else 1)


@chaos.command("suite")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of every run's fault schedule.")
@click.option("--soak-records", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Records of the soak (scenarios 1, 5-7 and an nsqd SIGKILL a minute, on 3 nsqd).")
@click.option("--soak-duration", type=click.FloatRange(min=0.1), default=None,
              help="Seconds of faults in the soak (default: the scenario's).")
@click.option("--only-soak", is_flag=True, help="Run the soak alone.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/RELIABILITY.md"),
              show_default=True, help="Where to write the reliability report.")
def chaos_suite(seed: int, soak_records: int, soak_duration: float | None, only_soak: bool, markdown: Path) -> None:
    """Run every scenario in full, then the soak; write the reliability report; exit 1 unless all pass."""
    from rich.console import Console
    scenarios, run, report = load_plugin("chaos.scenario"), load_plugin("chaos.run"), load_plugin("chaos.report")
    loaded = [scenarios.load_scenario(p) for p in scenarios.list_scenarios()]  # all validated before any runs
    results = []
    for scenario in loaded:
        if scenario.name != "soak" and only_soak:
            continue
        records, duration = (soak_records, soak_duration) if scenario.name == "soak" else (None, None)
        result = run.run_scenario(scenario, seed=seed, records=records, duration=duration,
                                  log=lambda line, n=scenario.name: click.echo(f"chaos {n}: {line}", err=True))
        report.print_result(result, Console())
        results.append(result)
        report.write_reliability(results, markdown)
    click.echo(f"wrote {markdown}")
    sys.exit(0 if all(r.passed for r in results) else 1)


@chaos.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
def chaos_check(paths: tuple[str, ...]) -> None:
    """Validate scenario files; print every error as FILE:LINE:COL: field: reason."""
    scenarios = load_plugin("chaos.scenario")
    failed = False
    for path in paths:
        for problem in scenarios.validate_scenario(path)[1]:
            click.echo(str(problem), err=True)
            failed = True
    if failed:
        sys.exit(1)
    click.echo(f"{len(paths)} scenario(s) ok")


@click.command()
@click.option("--missing", is_flag=True, required=True, help="Republish acknowledged records that never arrived.")
@click.option("--run", "run_folder", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="The chaos run's folder (journal.jsonl, arrivals.jsonl).")
@click.option("--topic", default="numbers", show_default=True, help="The input topic to republish to.")
@click.option("--nsqd", "nsqd_tcp", default=None,
              help="nsqd TCP address (default: every nsqd of the run's topology, spread over them).")
def replay(missing: bool, run_folder: Path, topic: str, nsqd_tcp: str | None) -> None:
    """Republish the records a chaos run's journal says nsqd acknowledged but no sink saw."""
    replay_missing = load_plugin("chaos.replay").replay_missing
    path = run_folder / "topology.yaml"
    addresses, spec = [nsqd_tcp] if nsqd_tcp else [], None
    if not addresses or path.exists():  # the topic's declaration (codec, replication) where the run has it
        topology = load(str(path))
        addresses, spec = addresses or [node.tcp for node in topology.nsq.nsqd], topology.topics.get(topic)
    count = replay_missing(run_folder, addresses, topic, spec=spec)
    click.echo(f"replayed {count} missing records to {topic} on {', '.join(addresses)}")


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args: tuple[str, ...]) -> None:
    """Measure throughput side by side with the baselines (`pipeline bench --help` for options)."""
    run = load_plugin("benchmarks.run")
    sys.exit(run.main(list(bench_args), prog="pipeline bench"))

