"""Turn benchmark samples into figures: medians and ranges, ratios, target checks, a table and markdown.

Everything here works on the ``results`` document that ``results.json``
holds (see :mod:`benchmarks.run`), so the printed table, the markdown and the
JSON cannot disagree.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

DRAIN_METRICS = ("records_per_s", "seconds", "cpu_s_per_million", "nsqd_cpu_s_per_million", "all_cpu_s_per_million",
                 "peak_rss_mb", "startup_cpu_s", "nsqd_peak_rss_mb", "host_steal_pct")
RESTART_METRICS = ("seconds",)
GATEWAY_METRICS = ("records_per_s", "seconds", "cpu_s_per_million", "peak_rss_mb", "nsqd_cpu_s_per_million")
GATEWAY_TARGET = 20_000
TICKS_METRICS = ("input_rate", "feature_p50_ms", "feature_p99_ms", "feature_p999_ms", "signal_p50_ms",
                 "signal_p99_ms", "signal_p999_ms", "backlog_at_end", "caught_up_s", "peak_rss_mb", "host_steal_pct")
TICKS_HEADER = ("figure", "ticks", "runs", "input ticks/s", "tick->feature ms (features.0) p50 / p99 / p99.9",
                "tick->signal ms p50 / p99 / p99.9", "backlog at end", "kept up", "worker peak RSS MB",
                "host steal %")
#: The issue's latency target: tick -> signal p99 at this rate with 4 partitions.
TICKS_TARGET_MS = 10.0
TICKS_TARGET_RATE = 20_000
#: (numerator, denominator): records/s medians compared in the report.
RATIOS = (("primes2", "nsq_to_nsq"), ("primes2", "textbook2"), ("primes1", "textbook1"), ("batched", "primes2"))
#: (durable figure, its plain twin): the same workload, every nsqd on ``nsq.durability: durable`` or not.
DURABLE_PAIRS = (("durable2", "primes2"),)
#: (replicated figure, its plain twin): the same workload, every topic with ``replication: 2`` on two nsqd or not.
REPLICATED_PAIRS = (("replicated2", "primes2"),)
HEADER = ("contender", "records", "runs", "records/s", "drain s", "CPU s/M rec", "nsqd CPU s/M", "peak RSS MB")
#: The terminal table leaves out "runs" (the legend has it) to stay narrow.
TERMINAL_HEADER = ("contender", "records", "records/s", "drain s", "CPU s/M\nrecords", "nsqd CPU\ns/M records",
                   "peak RSS\nMB")
DRAIN_KINDS = ("textbook", "nsq_to_nsq", "primes", "batched")
_COLUMNS = (("records_per_s", "{:,.0f}"), ("seconds", "{:.2f}"), ("cpu_s_per_million", "{:.1f}"),
            ("nsqd_cpu_s_per_million", "{:.1f}"), ("peak_rss_mb", "{:.0f}"))


def summarize(samples: Sequence[dict], metrics: Sequence[str]) -> dict:
    """Return ``{metric: {"median", "min", "max"}}`` over ``samples`` (empty without samples).

    A sample without a value for a metric (None: e.g. no signal came out of a tiny run) is left out
    of that metric; a metric no sample has is left out.
    """
    if not samples:
        return {}
    summary = {}
    for metric in metrics:
        values = [s[metric] for s in samples if s.get(metric) is not None]
        if not values:
            continue
        summary[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def median(results: dict, name: str, metric: str) -> float | None:
    """The median of ``metric`` for contender ``name``, or None when it has no successful sample."""
    entry = results["contenders"].get(name) or {}
    figure = (entry.get("summary") or {}).get(metric)
    return figure["median"] if figure else None


def ratios(results: dict) -> list[dict]:
    """Records/s of one contender over another's, from the medians of the same run."""
    out = []
    for top, bottom in RATIOS:
        a, b = median(results, top, "records_per_s"), median(results, bottom, "records_per_s")
        if a is not None or b is not None:
            out.append({"numerator": top, "denominator": bottom, "value": a / b if a and b else None})
    return out


def durability_cost(results: dict, pairs: tuple[tuple[str, str], ...] = DURABLE_PAIRS) -> list[dict]:
    """What ``nsq.durability: durable`` (or, with ``REPLICATED_PAIRS``, ``replication: 2``) costs: records/s and
    CPU per record (workers + every nsqd) beside the plain twin's.

    Each ratio is durable / plain from the medians of the same run; None when either did not run.
    """
    out = []
    for durable, plain in pairs:
        if durable not in results["contenders"]:
            continue
        entry = {"durable": durable, "plain": plain}
        for metric in ("records_per_s", "all_cpu_s_per_million"):
            a, b = median(results, durable, metric), median(results, plain, metric)
            entry[metric] = {"durable": a, "plain": b, "ratio": a / b if a and b else None}
        out.append(entry)
    return out


def durability_lines(results: dict) -> list[str]:
    """One line per durable (and replicated) figure: its records/s and CPU per record beside its plain twin's,
    with the ratios."""
    lines = []
    costs = [("durability", c) for c in results.get("durability_cost", [])]
    costs += [("replication", c) for c in results.get("replication_cost", [])]
    for what, cost in costs:
        speed, cpu = cost["records_per_s"], cost["all_cpu_s_per_million"]

        def pair(figures: dict, fmt: str) -> str:
            shown = [fmt.format(figures[k]) if figures[k] is not None else "not measured" for k in ("durable", "plain")]
            ratio = f"{figures['ratio']:.2f}x" if figures["ratio"] else "not measured"
            return f"{shown[0]} vs {shown[1]} ({ratio})"

        lines.append(f"{what} cost, {cost['durable']} vs {cost['plain']}: records/s {pair(speed, '{:,.0f}')}; "
                     f"CPU of workers + nsqd, s/M records {pair(cpu, '{:.1f}')}")
    return lines


def targets(results: dict) -> list[dict]:
    """Check the issue's targets; each is PASS, MISS, or "not measured" when its contender did not run."""
    ratio = {(r["numerator"], r["denominator"]): r["value"] for r in ratios(results)}
    rss = [s["peak_rss_mb"] for name in ("primes1", "primes2")
           for s in (results["contenders"].get(name) or {}).get("samples", [])]
    checks = [
        ("primes 2 replicas records/s", median(results, "primes2", "records_per_s"), ">=", 120_000, "{:,.0f}"),
        ("primes 2 replicas vs nsq_to_nsq", ratio.get(("primes2", "nsq_to_nsq")), ">=", 3, "{:.2f}x"),
        ("primes 2 replicas vs textbook 2 processes", ratio.get(("primes2", "textbook2")), ">=", 20, "{:.1f}x"),
        ("batched records/s", median(results, "batched", "records_per_s"), ">=", 2_000_000, "{:,.0f}"),
        ("worker peak RSS MB (worst run)", max(rss) if rss else None, "<=", 200, "{:.0f}"),
        ("restart-to-consuming s", median(results, "restart", "seconds"), "<=", 2, "{:.2f}"),
        ("gateway single-message /pub msg/s", median(results, "gateway", "records_per_s"), ">=", GATEWAY_TARGET,
         "{:,.0f}"),
    ]
    return [_check(*check) for check in checks] + [ticks_target(results)]


def ticks_target(results: dict) -> dict:
    """tick -> signal p99 (median over runs) <= 10 ms at 20,000 ticks/s with 4 partitions."""
    entry = results["contenders"].get("ticks") or {}
    name = "ticks tick->signal p99"
    target = f"<= {TICKS_TARGET_MS:g} ms at {TICKS_TARGET_RATE:,} ticks/s with 4 partitions"
    measured = median(results, "ticks", "signal_p99_ms")
    if measured is None or entry.get("rate") != TICKS_TARGET_RATE:
        why = (f"measured at {entry['rate']:,.0f} ticks/s, not {TICKS_TARGET_RATE:,}" if measured is not None
               else "not measured in this run")
        return {"name": name, "target": target, "measured": measured, "status": "not measured", "detail": why}
    diff = measured - TICKS_TARGET_MS
    detail = (f"{measured:.1f} ms, {abs(diff):.1f} ms {'under' if diff <= 0 else 'over'} the target "
              f"({diff / TICKS_TARGET_MS:+.0%})")
    samples = entry.get("samples") or []
    behind = sum(1 for s in samples if not s["kept_up"])
    rate = median(results, "ticks", "input_rate")
    detail += f"; achieved input {rate:,.0f} ticks/s" if rate is not None else ""
    if behind:
        detail += f"; the pipeline did not keep up in {behind} of {len(samples)} runs"
    return {"name": name, "target": target, "measured": measured,
            "status": "PASS" if diff <= 0 else "MISS", "detail": detail}


def ms(value: float | None) -> str:
    """A latency in ms, or "—" when there is none (no signal in a tiny run)."""
    return "—" if value is None else f"{value:.1f}"


def ticks_rows(results: dict, sep: str = " ") -> list[tuple[str, ...]]:
    """The ticks figure's row, in :data:`TICKS_HEADER` order (none when it did not run)."""
    rows = []
    for name, entry in results["contenders"].items():
        if entry["kind"] != "ticks":
            continue
        summary, samples = entry["summary"], entry["samples"]
        runs = f"{len(samples)}/{entry['repeats']}"

        def trio(kind: str) -> str:
            return " / ".join(_figure(summary, f"{kind}_{p}_ms", "{:.1f}", sep) for p in ("p50", "p99", "p999"))

        behind = sum(1 for s in samples if not s["kept_up"])
        kept = "—" if not samples else ("yes" if not behind else
                                        f"NO in {behind}/{len(samples)} runs: latency grows with the backlog")
        peaks: dict[str, float] = {}
        for s in samples:
            for worker, mb in s["worker_peak_rss_mb"].items():
                stage = worker.rpartition("-")[0]
                peaks[stage] = max(peaks.get(stage, 0.0), mb)
        rss = ", ".join(f"{stage} {mb:.0f}" for stage, mb in peaks.items()) or "—"
        rows.append((name, f"{entry['records']:,}", runs, _figure(summary, "input_rate", "{:,.0f}", sep),
                     trio("feature"), trio("signal"), _figure(summary, "backlog_at_end", "{:,.0f}", sep), kept, rss,
                     _figure(summary, "host_steal_pct", "{:.0f}", sep)))
    return rows


def _check(name: str, measured: float | None, op: str, target: float, fmt: str) -> dict:
    """One target check, with the signed relative difference from the target."""
    if measured is None:
        return {"name": name, "target": f"{op} {fmt.format(target)}", "measured": None, "status": "not measured",
                "detail": "not measured in this run"}
    ok = measured >= target if op == ">=" else measured <= target
    diff = (measured - target) / target
    detail = f"{fmt.format(measured)} ({diff:+.0%} against the target)"
    return {"name": name, "target": f"{op} {fmt.format(target)}", "measured": measured,
            "status": "PASS" if ok else "MISS", "detail": detail}


def _figure(summary: dict, metric: str, fmt: str, sep: str = " ") -> str:
    """``median (min–max)``, or the median alone when every sample agrees; ``sep`` goes before the range."""
    figure = summary.get(metric)
    if not figure:
        return "—"
    text, low, high = (fmt.format(figure[key]) for key in ("median", "min", "max"))
    return text if low == high else f"{text}{sep}({low}–{high})"


def drain_rows(results: dict, sep: str = " ") -> list[tuple[str, ...]]:
    """One row per drain contender, in :data:`HEADER` order; ``sep`` goes between a median and its range."""
    rows = []
    for name, entry in results["contenders"].items():
        if entry["kind"] not in DRAIN_KINDS:
            continue
        runs = f"{len(entry['samples'])}/{entry['repeats']}"
        summary = entry["summary"]
        rows.append((name, f"{entry['records']:,}", runs,
                     *(_figure(summary, metric, fmt, sep) for metric, fmt in _COLUMNS)))
    return rows


def legend(results: dict) -> list[str]:
    """What each drain contender's short name stands for (and, when packed, how many messages it drains)."""
    lines = []
    for name, entry in results["contenders"].items():
        if entry["kind"] in DRAIN_KINDS:
            packed = (f"{entry['messages']:,} input messages of up to {entry['pack']:,} records; "
                      if entry.get("pack", 1) > 1 else "")
            lines.append(f"{name} = {entry['label']} ({packed}{len(entry['samples'])}/{entry['repeats']} runs)")
    return lines


def other_lines(results: dict) -> list[str]:
    """The restart figure, failures, and the figures not available yet, one line each."""
    lines = []
    for name, entry in results["contenders"].items():
        if entry["kind"] == "restart":
            runs = f"{len(entry['samples'])}/{entry['repeats']} runs"
            lines.append(f"{name}: {entry['label']}: {_figure(entry['summary'], 'seconds', '{:.2f}')} s ({runs})")
        elif entry["kind"] == "ticks":
            lines.append(f"{name} = {entry['label']} ({len(entry['samples'])}/{entry['repeats']} runs)")
        elif entry["kind"] == "gateway":
            s = entry["summary"]
            lines.append(f"{name}: {entry['label']}: {_figure(s, 'records_per_s', '{:,.0f}')} msg/s, gateway CPU "
                         f"{_figure(s, 'cpu_s_per_million', '{:.1f}')} s/M messages, peak RSS "
                         f"{_figure(s, 'peak_rss_mb', '{:.0f}')} MB ({len(entry['samples'])}/{entry['repeats']} runs)")
        elif entry["status"] == "not available yet":
            lines.append(f"{name}: {entry['label']}: not available yet")
        for error in entry.get("errors", []):
            lines.append(f"{name}: FAILED: {error}")
    return lines


def print_report(results: dict, console: Console) -> None:
    """Print the table, the other figures, the ratios and the target checks."""
    table = Table(title=f"Drain throughput, scale {results['settings']['scale']:g}: median (min–max)",
                  box=box.SIMPLE_HEAD)
    for i, column in enumerate(TERMINAL_HEADER):
        table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
    drains = drain_rows(results, sep="\n")
    for row in drains:
        table.add_row(row[0], row[1], *row[3:])
    if drains or not ticks_rows(results):
        console.print(table)
    rows = ticks_rows(results, sep="\n")
    if rows:
        ticks_table = Table(title="Tick latency: median (min–max) over runs", box=box.SIMPLE_HEAD)
        for i, column in enumerate(TICKS_HEADER):
            ticks_table.add_column(column.replace(" ms ", " ms\n"), justify="left" if i == 0 else "right",
                                   overflow="fold")
        for row in rows:
            ticks_table.add_row(*row)
        console.print(ticks_table)
    for line in legend(results):
        console.print(line, style="dim", highlight=False)
    for line in other_lines(results):
        console.print(line, highlight=False)
    for r in results["ratios"]:
        value = f"{r['value']:.2f}x" if r["value"] else "not measured"
        console.print(f"ratio records/s {r['numerator']} / {r['denominator']}: {value}", highlight=False)
    for line in durability_lines(results):
        console.print(line, highlight=False)
    for t in results["targets"]:
        style = {"PASS": "green", "MISS": "red"}.get(t["status"], "yellow")
        console.print(f"[{style}]{t['status']}[/{style}] {t['name']} {t['target']}: {t['detail']}", highlight=False)


def markdown(results: dict) -> str:
    """The whole report as markdown: table, other figures, ratios, targets, rules, machine and command."""
    lines = [f"# Benchmark results (scale {results['settings']['scale']:g})", "",
             "Figures are the median of the runs, with the range (min–max) in parentheses.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in drain_rows(results)]
    rows = ticks_rows(results)
    if rows:
        lines += ["", "## Tick latency", "", "| " + " | ".join(TICKS_HEADER) + " |", "|" + "---|" * len(TICKS_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *(f"- {line}" for line in legend(results) + other_lines(results)), "", "## Ratios", ""]
    for r in results["ratios"]:
        value = f"{r['value']:.2f}x" if r["value"] else "not measured"
        lines.append(f"- records/s {r['numerator']} / {r['denominator']}: {value}")
    lines += [f"- {line}" for line in durability_lines(results)]
    lines += ["", "## Targets", "", "| target | status | measured |", "|---|---|---|"]
    lines += [f"| {t['name']} {t['target']} | {t['status']} | {t['detail']} |" for t in results["targets"]]
    lines += ["", "## How it was measured", "", *(f"- {rule}" for rule in results["rules"])]
    machine = results["machine"]
    lines += ["", "## Machine", "", *(f"- {key}: {value}" for key, value in machine.items())]
    lines += ["", "## Command", "", "```sh", results["command"]["line"], "```", ""]
    return "\n".join(lines)
