"""The benchmark harness at a tiny scale: it drains every record, writes the documented results, leaks nothing.

A correctness test of ``benchmarks.run``, not a timing test: no figure is
compared with a target.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import orjson
import pytest

from benchmarks import report, run, ticks
from benchmarks.broker import BenchError
from benchmarks.verify import check_records
from consumers.primes import classify
from pipeline.records import envelope
from pipeline.records.partition import Router
from pipeline.stage import Batch

SUMMARY_KEYS = {"median", "min", "max"}
DRAIN_SAMPLE_KEYS = {"records", "messages", "seconds", "records_per_s", "outputs", "output_records",
                     "outputs_before_clock", "cpu_s", "cpu_s_per_million", "startup_cpu_s",
                     "nsqd_cpu_s_per_million", "all_cpu_s_per_million", "peak_rss_mb", "nsqd_peak_rss_mb",
                     "host_steal_pct"}
# 1,000,000, 100,000 and 4,000,000 records at scale 0.002; batched packs them 1000 per message.
EXPECTED_RECORDS = {"primes1": 2000, "textbook1": 200, "batched": 8000, "durable2": 2000, "replicated2": 2000}
EXPECTED_MESSAGES = {"primes1": 2000, "textbook1": 200, "batched": 8, "durable2": 2000, "replicated2": 2000}


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
    """Run the benchmark once for every test here: textbook, primes, batched, durable, one repeat."""
    assert child_pids() == []
    out = tmp_path_factory.mktemp("bench") / "out"
    code = run.main(["--scale", "0.002", "--repeats", "1", "--only", "primes1,textbook1,batched,durable2,replicated2",
                     "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return TinyRun(code, out, results, child_pids())


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_tiny_bench_succeeds_and_stops_everything_it_started(tiny_run):
    assert tiny_run.code == 0, json.dumps(tiny_run.results["contenders"], indent=1)[-3000:]
    assert tiny_run.leftover_children == []


@pytest.mark.integration
def test_every_preloaded_record_is_drained_after_the_clock_starts(tiny_run):
    contenders = tiny_run.results["contenders"]
    assert set(contenders) == {"primes1", "textbook1", "batched", "durable2", "replicated2"}
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
        assert sample["all_cpu_s_per_million"] == pytest.approx(
            sample["cpu_s_per_million"] + sample["nsqd_cpu_s_per_million"], abs=1e-3)
        assert set(entry["summary"]) == set(report.DRAIN_METRICS)
        assert all(set(figure) == SUMMARY_KEYS for figure in entry["summary"].values())


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
    assert "| durable2 | 2,000 | 1/1 |" in markdown
    assert "- durability cost, durable2 vs primes2: records/s " in markdown  # primes2 did not run: no ratio
    assert "batched = (d) primes stage, batched envelopes (pack 1000), 2 replicas (8 input messages" in markdown
    assert "## Tick latency" not in markdown  # ticks did not run
    assert "| batched records/s >= 2,000,000 |" in markdown
    assert tiny_run.results["rules"][0] in markdown
    assert tiny_run.results["command"]["line"] in markdown


@pytest.mark.integration
def test_durable2_drains_on_the_durable_profiles_nsqd_and_its_cost_is_reported(tiny_run):
    from pipeline.config.schema import DURABILITY_FLAGS
    entry = tiny_run.results["contenders"]["durable2"]
    assert (entry["kind"], entry["processes"], entry["durability"]) == ("primes", 2, "durable")
    assert " ".join(DURABILITY_FLAGS["durable"]) in entry["label"]
    [cost] = tiny_run.results["durability_cost"]
    assert (cost["durable"], cost["plain"]) == ("durable2", "primes2")
    assert cost["records_per_s"]["durable"] == entry["summary"]["records_per_s"]["median"]
    assert cost["records_per_s"]["plain"] is None and cost["records_per_s"]["ratio"] is None  # primes2 not run
    assert tiny_run.results["rules"][1].startswith("durable2: primes2's workload")


def test_replicated2_drains_on_two_nsqd_with_two_copies_and_its_cost_is_reported(tiny_run):
    entry = tiny_run.results["contenders"]["replicated2"]
    assert (entry["kind"], entry["processes"], entry["replication"]) == ("primes", 2, 2)
    [sample] = entry["samples"]
    assert sample["outputs"] == 2000  # every record once, though each output is on both nodes
    [cost] = tiny_run.results["replication_cost"]
    assert (cost["durable"], cost["plain"]) == ("replicated2", "primes2")
    assert cost["records_per_s"]["durable"] == entry["summary"]["records_per_s"]["median"]
    assert "- replication cost, replicated2 vs primes2: records/s " in (tiny_run.out / "results.md").read_text()


def test_the_bench_nsqd_takes_the_durable_profiles_flags_instead_of_its_large_memory_queue():
    from benchmarks.broker import nsqd_flags
    from benchmarks.contenders import DRAIN_CONTENDERS
    from pipeline.config.schema import DURABILITY_FLAGS
    assert nsqd_flags(2_000_000) == ["--mem-queue-size=2000000"]
    assert nsqd_flags(2_000_000, "durable") == list(DURABILITY_FLAGS["durable"])
    by_name = {c.name: c for c in DRAIN_CONTENDERS}
    plain, durable = by_name["primes2"], by_name["durable2"]
    assert (durable.kind, durable.processes, durable.base_count, durable.batch, durable.pack) == \
        (plain.kind, plain.processes, plain.base_count, plain.batch, plain.pack)
    assert (plain.durability, durable.durability) == ("default", "durable")


def test_durability_cost_sets_records_per_s_and_cpu_per_record_beside_the_plain_twins():
    def entry(rate: float, cpu: float) -> dict:
        return {"summary": {"records_per_s": {"median": rate}, "all_cpu_s_per_million": {"median": cpu}}}

    results = {"contenders": {"primes2": entry(100_000, 10.0), "durable2": entry(60_000, 18.0)}}
    [cost] = report.durability_cost(results)
    assert cost["records_per_s"] == {"durable": 60_000, "plain": 100_000, "ratio": 0.6}
    assert cost["all_cpu_s_per_million"] == {"durable": 18.0, "plain": 10.0, "ratio": 1.8}
    results["durability_cost"] = [cost]
    assert report.durability_lines(results) == [
        "durability cost, durable2 vs primes2: records/s 60,000 vs 100,000 (0.60x); "
        "CPU of workers + nsqd, s/M records 18.0 vs 10.0 (1.80x)"]
    assert report.durability_cost({"contenders": {"primes2": entry(1, 1)}}) == []  # durable2 not run


TICKS_SAMPLE_KEYS = {"ticks", "rate_target", "published", "input_rate", "publish_s", "features", "signals",
                     "features_expected", "duplicates", "feature_p50_ms", "feature_p99_ms", "feature_p999_ms", "signal_p50_ms",
                     "signal_p99_ms", "signal_p999_ms", "feature_max_ms", "backlog_at_end", "caught_up_s", "kept_up",
                     "cpu_s", "cpu_us_per_tick", "peak_rss_mb", "worker_peak_rss_mb", "nsqd_peak_rss_mb",
                     "host_steal_pct"}


@pytest.fixture(scope="module")
def tiny_ticks(nsq_bin, tmp_path_factory) -> TinyRun:
    """The ticks figure at scale 0.005: 1,000 measured ticks at 20,000/s (after the warm-up), one repeat."""
    assert child_pids() == []
    out = tmp_path_factory.mktemp("bench-ticks") / "out"
    code = run.main(["--scale", "0.005", "--repeats", "1", "--only", "ticks", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return TinyRun(code, out, results, child_pids())


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_tiny_ticks_run_measures_latencies_and_stops_everything(tiny_ticks):
    assert tiny_ticks.code == 0, json.dumps(tiny_ticks.results["contenders"], indent=1)[-3000:]
    assert tiny_ticks.leftover_children == []
    entry = tiny_ticks.results["contenders"]["ticks"]
    assert (entry["kind"], entry["status"], entry["errors"], entry["records"], entry["processes"], entry["rate"]) == \
        ("ticks", "ok", [], 1000, 8, 20_000)
    [sample] = entry["samples"]
    assert set(sample) == TICKS_SAMPLE_KEYS
    assert sample["ticks"] == sample["published"] == 1000
    # one feature per measured tick of the probed partition (features.0 of 4), warm-up excluded
    assert sample["features"] == sample["features_expected"] and 100 < sample["features_expected"] < 500
    assert sample["input_rate"] > 0 and sample["publish_s"] > 0
    assert sample["signals"] > 0  # about 50 with these 1,000 seeded ticks
    for kind in ("feature", "signal"):
        p50, p99, p999 = (sample[f"{kind}_{p}_ms"] for p in ("p50", "p99", "p999"))
        assert 0 < p50 <= p99 <= p999
    assert set(sample["worker_peak_rss_mb"]) == {f"{stage}-{k}" for stage in ("features", "signals") for k in range(4)}
    assert all(mb > 0 for mb in sample["worker_peak_rss_mb"].values())
    assert sample["backlog_at_end"] >= 0 and isinstance(sample["kept_up"], bool)
    assert set(sample["cpu_us_per_tick"]) == {"workers", "features", "signals", "nsqd", "reader", "producer"}
    assert sample["cpu_us_per_tick"]["workers"] > 0 and all(us >= 0 for us in sample["cpu_us_per_tick"].values())
    assert set(entry["summary"]) == set(report.TICKS_METRICS)
    assert all(set(figure) == SUMMARY_KEYS for figure in entry["summary"].values())


@pytest.mark.integration
def test_tiny_ticks_report_has_the_latency_row_and_the_target(tiny_ticks):
    [target] = [t for t in tiny_ticks.results["targets"] if t["name"] == "ticks tick->signal p99"]
    assert target["target"] == "<= 10 ms at 20,000 ticks/s with 4 partitions"
    assert target["status"] in {"PASS", "MISS"} and "ms" in target["detail"]
    markdown = (tiny_ticks.out / "results.md").read_text()
    assert "## Tick latency" in markdown and "| ticks | 1,000 | 1/1 |" in markdown
    assert "| ticks tick->signal p99 <= 10 ms at 20,000 ticks/s with 4 partitions |" in markdown
    assert tiny_ticks.results["settings"]["tick_rate"] == 20_000 and tiny_ticks.results["settings"]["ticks_checkpoint_ms"] == 250


def test_unknown_figure_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--only", "primes1,nope"])
    assert exit_info.value.code == 2
    assert "--only: unknown nope" in capsys.readouterr().err


def test_bad_ticks_checkpoint_interval_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--ticks-checkpoint-ms", "30000"])
    assert exit_info.value.code == 2
    assert "--ticks-checkpoint-ms must be 0..25000" in capsys.readouterr().err


def test_ticks_topology_carries_the_checkpoint_interval_and_the_probe_reads_one_feature_partition(tmp_path):
    broker = SimpleNamespace(tcp="127.0.0.1:1", process=SimpleNamespace(http="127.0.0.1:2"))  # not contacted
    topology = ticks.write_topology(tmp_path / "topology.yaml", broker, checkpoint_ms=250)
    assert {topology.stages[s].checkpoint_interval_ms for s in ("features", "signals")} == {250}
    assert ticks.write_topology(tmp_path / "t2.yaml", broker).stages["features"].checkpoint_interval_ms == \
        ticks.CHECKPOINT_INTERVAL_MS
    # the expected feature count is the measured ticks of features.0's partition, the warm-up left out
    expected = ticks._probed_ticks(topology, 4000)
    router = Router.for_spec("ticks", topology.topics["ticks"])
    seeded = list(ticks._ticks(4000))[ticks.WARMUP:]
    assert len(seeded) == 4000 and expected == sum(router.topic_of(t) == "ticks.0" for t in seeded)
    assert 500 < expected < 1500  # 16 symbols over 4 partitions: about a quarter


def test_packed_and_json_inputs_hold_the_same_records():
    bodies = run.input_bodies([(1, 3000), (1, 2500), (1000, 2500)])
    assert bodies[1, 2500] == bodies[1, 3000][:2500]
    assert len(bodies[1000, 2500]) == 3  # 1000 + 1000 + 500 records
    packed = list(envelope.records_of(envelope.unpackb(b) for b in bodies[1000, 2500]))
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


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_tiny_gateway_run_publishes_every_message_through_the_gateway(nsq_bin, tmp_path):
    assert child_pids() == []
    out = tmp_path / "out"
    code = run.main(["--scale", "0.002", "--repeats", "1", "--only", "gateway", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    entry = results["contenders"]["gateway"]
    assert (code, entry["status"], entry["errors"], entry["records"]) == (0, "ok", [], 400), entry["errors"]
    assert child_pids() == []
    [sample] = entry["samples"]
    assert sample["records"] == 400 and sample["records_per_s"] == pytest.approx(400 / sample["seconds"], rel=1e-3)
    # /proc counts CPU in 10 ms ticks, and 400 requests may cost the gateways less than one: 0 is a reading here.
    assert sample["peak_rss_mb"] > 0 and sample["cpu_s_per_million"] >= 0
    [target] = [t for t in results["targets"] if t["name"] == "gateway single-message /pub msg/s"]
    assert target["status"] in {"PASS", "MISS"} and target["target"] == ">= 20,000"
    markdown = (out / "results.md").read_text()
    assert "gateway: gateway single-message /pub, 2 processes, 8 keep-alive connections:" in markdown
    assert "| gateway single-message /pub msg/s >= 20,000 |" in markdown


def test_steal_percent_is_the_hypervisors_share_of_the_cpu_time_between_two_readings():
    from benchmarks.procstat import machine_cpu_times, steal_percent
    assert steal_percent((10, 1000), (35, 1100)) == 25.0
    assert steal_percent((10, 1000), (10, 1000)) is None  # no time passed: nothing to tell
    steal, total = machine_cpu_times()
    assert 0 <= steal <= total and total > 0
