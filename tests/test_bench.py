"""The benchmark harness at a tiny scale: it drains every record, writes the documented results, leaks nothing.

A correctness test of ``benchmarks.run``, not a timing test: no figure is
compared with a target.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
import orjson
import pytest

from benchmarks import report, run
from benchmarks.broker import BenchError
from benchmarks.verify import check_records
from consumers.primes import classify
from pipeline import envelope
from pipeline.stage import Batch

SUMMARY_KEYS = {"median", "min", "max"}
DRAIN_SAMPLE_KEYS = {"records", "messages", "seconds", "records_per_s", "outputs", "output_records",
                     "outputs_before_clock", "cpu_s", "cpu_s_per_million", "startup_cpu_s",
                     "nsqd_cpu_s_per_million", "peak_rss_mb", "nsqd_peak_rss_mb"}
# 1,000,000, 100,000 and 4,000,000 records at scale 0.002; batched packs them 1000 per message.
EXPECTED_RECORDS = {"primes1": 2000, "textbook1": 200, "batched": 8000}
EXPECTED_MESSAGES = {"primes1": 2000, "textbook1": 200, "batched": 8}


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
    """Run the benchmark once for every test here: textbook, primes, batched, one repeat, plus a pending figure."""
    assert child_pids() == []
    out = tmp_path_factory.mktemp("bench") / "out"
    code = run.main(["--scale", "0.002", "--repeats", "1", "--only", "primes1,textbook1,batched,ticks",
                     "--out", str(out)])
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
    assert set(contenders) == {"primes1", "textbook1", "batched", "ticks"}
    for name, records in EXPECTED_RECORDS.items():
        entry = contenders[name]
        messages = EXPECTED_MESSAGES[name]
        assert (entry["status"], entry["errors"], entry["records"], entry["messages"]) == ("ok", [], records, messages)
        [sample] = entry["samples"]
        assert set(sample) == DRAIN_SAMPLE_KEYS
        assert (sample["records"], sample["messages"]) == (records, messages)
        assert sample["output_records"] >= records
        assert sample["outputs_before_clock"] == 0  # the paused channel held everything back
        assert sample["seconds"] > 0 and sample["peak_rss_mb"] > 0
        assert sample["records_per_s"] == pytest.approx(records / sample["seconds"], rel=1e-3)
        assert set(entry["summary"]) == set(report.DRAIN_METRICS)
        assert all(set(figure) == SUMMARY_KEYS for figure in entry["summary"].values())
    assert contenders["ticks"]["status"] == "not available yet"


@pytest.mark.integration
def test_batched_drains_envelopes_and_every_record_comes_out_once(tiny_run):
    entry = tiny_run.results["contenders"]["batched"]
    assert (entry["kind"], entry["processes"], entry["pack"]) == ("batched", 2, 1000)
    [sample] = entry["samples"]
    # Read back through the verify channels after the clock: each of 1..8000 once, rightly routed.
    assert sample["output_records"] == 8000
    # Outputs are envelopes too: far fewer messages than records, at least one per output topic.
    assert 2 <= sample["outputs"] < 100


@pytest.mark.integration
def test_results_hold_ratios_targets_machine_and_command(tiny_run):
    results = tiny_run.results
    ratios = {(r["numerator"], r["denominator"]): r["value"] for r in results["ratios"]}
    assert set(ratios) == {("primes1", "textbook1"), ("batched", "primes2")}
    assert ratios[("primes1", "textbook1")] > 0 and ratios[("batched", "primes2")] is None  # primes2 not run
    statuses = {t["name"]: t["status"] for t in results["targets"]}
    assert statuses["primes 2 replicas records/s"] == "not measured"
    assert statuses["batched records/s"] in {"PASS", "MISS"}
    assert statuses["worker peak RSS MB (worst run)"] in {"PASS", "MISS"}
    assert {"nproc", "cpu_model", "python", "nsqd", "date"} <= set(results["machine"])
    assert "v1.3.0" in results["machine"]["nsqd"]
    assert results["settings"]["scale"] == 0.002 and results["rules"]


@pytest.mark.integration
def test_markdown_repeats_the_table_rules_and_command(tiny_run):
    markdown = (tiny_run.out / "results.md").read_text()
    assert "| primes1 | 2,000 | 1/1 |" in markdown
    assert "| batched | 8,000 | 1/1 |" in markdown
    assert "batched = (d) primes stage, batched envelopes (pack 1000), 2 replicas (8 input messages" in markdown
    assert "ticks: (e) ticks latency: not available yet" in markdown
    assert "| batched records/s >= 2,000,000 |" in markdown
    assert tiny_run.results["rules"][0] in markdown
    assert tiny_run.results["command"]["line"] in markdown


def test_unknown_figure_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--only", "primes1,nope"])
    assert exit_info.value.code == 2
    assert "--only: unknown nope" in capsys.readouterr().err


def test_packed_and_json_inputs_hold_the_same_records():
    bodies = run.input_bodies([(1, 3000), (1, 2500), (1000, 2500)])
    assert bodies[1, 2500] == bodies[1, 3000][:2500]
    assert len(bodies[1000, 2500]) == 3  # 1000 + 1000 + 500 records
    packed = list(envelope.records_of(msgpack.unpackb(b) for b in bodies[1000, 2500]))
    assert packed == [orjson.loads(b) for b in bodies[1, 2500]]
    assert [r["number"] for r in packed] == list(range(1, 2501))


def _classified(count: int) -> dict[str, list[dict]]:
    records = [{"id": f"t-{n}", "number": n} for n in range(1, count + 1)]
    return classify(Batch(records))


def test_record_check_accepts_exactly_the_classified_numbers():
    out = _classified(2500)
    assert check_records({topic: envelope.pack(records, 1000) for topic, records in out.items()}, 2500) == 2500


@pytest.mark.parametrize("damage", ["drop", "repeat", "misroute", "flag"])
def test_record_check_refuses_missing_repeated_or_misrouted_records(damage):
    out = _classified(2500)
    if damage == "drop":
        out["non_prime"].pop()
    elif damage == "repeat":
        out["prime"].append(out["prime"][0])
    elif damage == "misroute":
        out["prime"].append({**out["non_prime"].pop(), "prime": True})  # flagged to match its topic
    else:
        out["prime"][3] = {**out["prime"][3], "prime": False}
    with pytest.raises(BenchError, match="verify"):
        check_records({topic: envelope.pack(records, 1000) for topic, records in out.items()}, 2500)
