"""The benchmark harness at a tiny scale: it drains every record, writes the documented results, leaks nothing.

A correctness test of ``benchmarks.run``, not a timing test: no figure is
compared with a target.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import report, run

SUMMARY_KEYS = {"median", "min", "max"}
DRAIN_SAMPLE_KEYS = {"records", "seconds", "records_per_s", "outputs", "outputs_before_clock", "cpu_s",
                     "cpu_s_per_million", "startup_cpu_s", "nsqd_cpu_s_per_million", "peak_rss_mb",
                     "nsqd_peak_rss_mb"}
EXPECTED_RECORDS = {"primes1": 2000, "textbook1": 200}  # 1,000,000 and 100,000 at scale 0.002


@dataclass
class TinyRun:
    """One benchmark run at scale 0.002: its exit code, what it wrote, and our children left after it."""

    code: int
    out: Path
    results: dict
    leftover_children: list[int]


def child_pids() -> list[int]:
    """Processes whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == os.getpid():
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def tiny_run(nsq_bin, tmp_path_factory) -> TinyRun:
    """Run the benchmark once for every test here: textbook and primes, one repeat, plus a pending figure."""
    assert child_pids() == []
    out = tmp_path_factory.mktemp("bench") / "out"
    code = run.main(["--scale", "0.002", "--repeats", "1", "--only", "primes1,textbook1,batched", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return TinyRun(code, out, results, child_pids())


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_tiny_bench_succeeds_and_stops_everything_it_started(tiny_run):
    assert tiny_run.code == 0, json.dumps(tiny_run.results["contenders"], indent=1)[-3000:]
    assert tiny_run.leftover_children == []


@pytest.mark.integration
def test_every_preloaded_record_is_drained_after_the_clock_starts(tiny_run):
    contenders = tiny_run.results["contenders"]
    assert set(contenders) == {"primes1", "textbook1", "batched"}
    for name, records in EXPECTED_RECORDS.items():
        entry = contenders[name]
        assert (entry["status"], entry["errors"], entry["records"]) == ("ok", [], records)
        [sample] = entry["samples"]
        assert set(sample) == DRAIN_SAMPLE_KEYS
        assert sample["records"] == records and sample["outputs"] >= records
        assert sample["outputs_before_clock"] == 0  # the paused channel held everything back
        assert sample["seconds"] > 0 and sample["peak_rss_mb"] > 0
        assert set(entry["summary"]) == set(report.DRAIN_METRICS)
        assert all(set(figure) == SUMMARY_KEYS for figure in entry["summary"].values())
    assert contenders["batched"]["status"] == "not available yet"


@pytest.mark.integration
def test_results_hold_ratios_targets_machine_and_command(tiny_run):
    results = tiny_run.results
    [ratio] = results["ratios"]
    assert (ratio["numerator"], ratio["denominator"]) == ("primes1", "textbook1") and ratio["value"] > 0
    statuses = {t["name"]: t["status"] for t in results["targets"]}
    assert statuses["primes 2 replicas records/s"] == "not measured"
    assert statuses["worker peak RSS MB (worst run)"] in {"PASS", "MISS"}
    assert {"nproc", "cpu_model", "python", "nsqd", "date"} <= set(results["machine"])
    assert "v1.3.0" in results["machine"]["nsqd"]
    assert results["settings"]["scale"] == 0.002 and results["rules"]


@pytest.mark.integration
def test_markdown_repeats_the_table_rules_and_command(tiny_run):
    markdown = (tiny_run.out / "results.md").read_text()
    assert "| primes1 | 2,000 | 1/1 |" in markdown
    assert "batched: (d) primes stage with batched envelopes: not available yet" in markdown
    assert tiny_run.results["rules"][0] in markdown
    assert tiny_run.results["command"]["line"] in markdown


def test_unknown_figure_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--only", "primes1,nope"])
    assert exit_info.value.code == 2
    assert "--only: unknown nope" in capsys.readouterr().err
