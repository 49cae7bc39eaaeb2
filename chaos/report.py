"""Show a chaos run: a readable table (rich), and docs/RELIABILITY.md for the soak."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .run import RunResult

SOAK_RECORDS = 1_000_000
#: What a recovery figure is measured over, for the headline.
OVER = {"recovery_p99": " over every worker kill",
        "recovery_clear_p99": " over the kills with no broker or network fault in force"}
FIELDS = ("acked", "lost", "unexpected", "duplicated", "dead_lettered", "poison_not_dead_lettered", "misclassified",
          "mismatched", "crash_not_dead_lettered", "restarts_per_crash", "kills", "point_kills", "fatal", "recovered",
          "running_p50", "running_p99", "recovery_p50", "recovery_p99", "recovered_clear", "recovery_clear_p50",
          "recovery_clear_p99")


def print_result(result: RunResult, console: Console) -> None:
    """Print the checker's figures (before and after replay), the fault log summary and the verdict."""
    table = Table(title=f"chaos {result.scenario} (seed {result.seed})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if result.after_replay is not None:
        table.add_column("after replay", justify="right")
    for name in FIELDS:
        row = [name, _fmt(getattr(result.report, name, None), name)]
        if result.after_replay is not None:
            row.append(_fmt(getattr(result.after_replay, name), name))
        table.add_row(*row)
    table.add_row("faults injected", str(result.injected))
    table.add_row("worker restarts", str(result.restarts))
    table.add_row("drained", "yes" if result.drained else "NO")
    if result.config.get("nsqd_nodes"):
        table.add_row("nsqd nodes", f"{len(result.config['nsqd_nodes'])} (replication "
                                    f"{result.config.get('replication') or 1})")
    console.print(table)
    for t, text in result.faults[:30]:
        console.print(f"  {t:8.3f}s  {text}")
    if len(result.faults) > 30:
        console.print(f"  ... {len(result.faults) - 30} more in {result.folder / 'report.json'}")
    verdict = "[green]PASS[/green]" if result.passed else "[red]FAIL[/red]: " + "; ".join(result.failures)
    console.print(f"{verdict}  (report: {result.folder / 'report.json'}, replay with --seed {result.seed})")


RATIOS = ("restarts_per_crash",)  # the float figures that are not seconds


def _fmt(value, name: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if name in RATIOS else f"{value:.3f} s"
    return f"{value:,}"


#: The lines around the hand-written part of docs/RELIABILITY.md, which a new report keeps as it was.
HAND_WRITTEN = ("<!-- Hand-written from here to the end marker: `make chaos` keeps it as it is. -->",
                "<!-- End of the hand-written part. -->")


def hand_written(text: str) -> str:
    """The hand-written part of a reliability report, its two marker lines included ("" if it has none)."""
    start, end = text.find(HAND_WRITTEN[0]), text.find(HAND_WRITTEN[1])
    if start < 0 or end < start:
        return ""
    return text[start:end + len(HAND_WRITTEN[1])]


def reliability_markdown(results: list[RunResult], kept: str = "") -> str:
    """docs/RELIABILITY.md from soak results: configuration, counts, faults, recovery.

    ``kept``, the hand-written part of the report this one replaces (:func:`hand_written`), follows
    the summary table, before each run's section.
    """
    lines = ["# Reliability", "",
             f"Written by `make chaos` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the chaos"
             f" harness's reports (`pipeline chaos run`). {_headline(results)}",
             "Recovery is the time from a worker's SIGKILL (or SIGTERM) until its successor is subscribed with"
             " RDY above 0 to every nsqd that is up (one SIGSTOPped, or killed and not yet RUNNING again, is not"
             " waited for); `lost` counts records nsqd acknowledged to the"
             " producer that reached neither an output nor the dead-letter topic. `recovery_clear` is the same"
             " time over the kills with no broker or network fault in force (nsqd or nsqlookupd down, nsqd"
             " stopped, a toxic, the proxy down) until the successor consumed: the workers' own recovery, which"
             " such a fault would hide behind its own duration (a toxic slows or resets every connection the"
             " successor makes)."
             " The successor is the next process of the same name supervisord started, RUNNING or not yet (a"
             " worker consumes before `startsecs` makes it RUNNING). A kill whose successor was itself killed"
             " before it consumed has no time (`recovered` < `kills`), so the percentiles leave out the slowest"
             " restarts; `host` gives the machine's load, which a worker's CPU-bound start (about 0.5 s of CPU:"
             " Python, numpy, the topology; numba's kernels load after it is consuming) depends on.", "",
             *_summary(results), *([kept, ""] if kept else [])]
    for result in results:
        c, r = result.config, result.report
        lines += [f"## {result.scenario} (seed {result.seed}): {'PASS' if result.passed else 'FAIL'}", ""]
        if result.scenario == "soak" and (c.get("records") or 0) < SOAK_RECORDS:
            lines += [f"**Short run:** {c.get('records'):,} records and {c.get('duration'):g} s of faults, not the"
                      f" {SOAK_RECORDS:,} records of the full soak.", ""]
        lines += [
                  "| configuration | value |", "|---|---|",
                  f"| workload | {c.get('workload', 'numbers')}: stages {', '.join(c.get('stages') or ['primes'])} |",
                  f"| nsqd | v{c.get('nsqd_version')}: `{' '.join(c.get('nsqd_flags') or [])}` (other flags at"
                  " their defaults, e.g. `--mem-queue-size=10000 --sync-every=2500 --sync-timeout=2s`) |",
                  *_nodes_row(c),
                  *(f"| {k} | {c.get(k)} |" for k in ("replicas", "msg_timeout", "max_in_flight", "max_tries",
                                                       "crash_tries", "publish_timeout", "records", "rate",
                                                       "duration")),
                  f"| supervisord | {c.get('supervisord')} |",
                  *([f"| host | {c['host']} |"] if c.get("host") else []), "",
                  "| result | value |", "|---|---|"]
        if r is not None:
            lines += [f"| {name} | {_fmt(getattr(r, name), name)} |" for name in FIELDS]
        if result.after_replay is not None:
            lines += [f"| replayed | {result.replayed:,} |", f"| lost after replay | {_fmt(result.after_replay.lost)} |"]
        lines += [f"| faults injected | {result.injected} |", f"| worker restarts | {result.restarts} |",
                  f"| drained | {'yes' if result.drained else 'no'} |", ""]
        if result.failures:
            lines += ["Failures: " + "; ".join(result.failures), ""]
        kinds: dict[str, int] = {}
        for _, text in result.faults:
            words = text.split()
            key = f"{words[0]} {words[1].partition(':')[0]}" if len(words) > 1 else text
            kinds[key] = kinds.get(key, 0) + 1
        lines += ["Faults by kind: " + (", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items())) or "none"), ""]
    return "\n".join(lines)


def _headline(results: list[RunResult]) -> str:
    """What the soak checks, each expectation with the figure measured; every scenario's own otherwise."""
    soak = next((r for r in results if r.scenario == "soak"), None)
    if soak is None or not soak.expect:
        return "Each run is held to its scenario's `expect` (chaos/scenarios/*.yaml)."
    c = soak.config
    checks = []
    for key, tolerance in soak.expect.items():
        report = soak.after_replay if key == "lost_after_replay" else soak.report
        value = getattr(report, "lost" if key == "lost_after_replay" else key, None) if report else None
        checks.append(f"`{key}` {tolerance}{OVER.get(key, '')} (measured {_fmt(value)})")
    return (f"The soak ({c.get('records') or 0:,} records on {len(c.get('nsqd_nodes') or [None])} nsqd,"
            f" replication {c.get('replication') or 1}) checks {', '.join(checks)}; its scenario's description"
            " (chaos/scenarios/soak.yaml) says why each bound is what it is.")


def _nodes_row(config: dict) -> list[str]:
    """The configuration's row of nsqd nodes (none for a report written before runs listed them)."""
    nodes = config.get("nsqd_nodes")
    if not nodes:
        return []
    copies = config.get("replication") or 1
    return [f"| nsqd nodes | {len(nodes)}, every topic with {copies} {'copy' if copies == 1 else 'copies'}:"
            f" {'; '.join(nodes)} |"]


def _summary(results: list[RunResult]) -> list[str]:
    """One line per run: the verdict and the figures the targets are about."""
    if len(results) < 2:
        return []
    names = ("lost", "unexpected", "duplicated", "dead_lettered", "mismatched", "kills", "recovery_p50",
             "recovery_p99", "recovery_clear_p99")
    lines = ["| scenario | verdict | lost after replay | " + " | ".join(names) + " | faults injected |",
             "|---" * (len(names) + 4) + "|"]
    for result in results:
        figures = [_fmt(getattr(result.report, name, None), name) for name in names]
        replayed = "-" if result.after_replay is None else _fmt(result.after_replay.lost)
        lines.append(f"| {result.scenario} | {'PASS' if result.passed else 'FAIL'} | {replayed} | "
                     + " | ".join(figures) + f" | {result.injected} |")
    return [*lines, ""]


def write_reliability(results: list[RunResult], path: Path) -> None:
    """Write :func:`reliability_markdown` to ``path``, keeping the hand-written part of the file it replaces."""
    kept = hand_written(path.read_text()) if path.exists() else ""
    path.write_text(reliability_markdown(results, kept))
