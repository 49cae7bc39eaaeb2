"""The chaos run's table and the reliability report say what the checker found, and the verdict."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from chaos.checker import Report
from chaos.report import print_result, reliability_markdown
from chaos.run import RunResult


def _result(**report) -> RunResult:
    result = RunResult("soak", 7, Path("/tmp/run"), report=Report(acked=20000, kills=9, recovered=8,
                                                                  recovery_p99=3.4, **report),
                       faults=[(1.2, "SIGKILL primes:primes-0 pid 10"), (3.0, "SIGKILL primes:primes-1 pid 11"),
                               (4.0, "toxic latency {'latency': 300} on nsqd-n0 downstream")],
                       injected=3, drained=True, config={"records": 20000, "duration": 20.0, "msg_timeout": 10.0,
                                                         "nsqd_flags": ["--mem-queue-size=0"]})
    return result


def test_table_shows_figures_fault_log_and_verdict() -> None:
    console = Console(record=True, width=200)
    result = _result(lost=2)
    result.failures.append("lost = 2, expected <= 0")
    print_result(result, console)
    text = console.export_text()
    assert "acked" in text and "20,000" in text
    assert "recovery_p99" in text and "3.400 s" in text
    assert "SIGKILL primes:primes-1 pid 11" in text
    assert "FAIL: lost = 2, expected <= 0" in text and "--seed 7" in text


def test_reliability_markdown_flags_a_short_soak() -> None:
    text = reliability_markdown([_result()])
    assert "## soak (seed 7): PASS" in text
    assert "**Short run:** 20,000 records and 20 s of faults, not the 1,000,000 records" in text
    assert "`--mem-queue-size=0`" in text
    assert "| recovery_p99 | 3.400 s |" in text
    assert "Faults by kind: SIGKILL primes ×2, toxic latency ×1" in text


def test_reliability_markdown_summarises_every_run_and_names_the_ticks_workload() -> None:
    ticks = RunResult("13_ticks_monkey", 1, Path("/tmp/t"), report=Report(acked=20000, kills=10, mismatched=0),
                      injected=10, drained=True,
                      config={"workload": "ticks", "stages": ["features", "signals"], "records": 20000})
    text = reliability_markdown([ticks, _result()])
    assert "| 13_ticks_monkey | PASS | - | 0 | 0 | 0 | 0 | 0 | 10 | - | - | - | 10 |" in text
    assert "| soak | PASS |" in text
    assert "| workload | ticks: stages features, signals |" in text
    assert "| mismatched | 0 |" in text


def test_reliability_markdown_shows_the_loss_left_after_a_replay() -> None:
    killed = RunResult("10_nsqd_kill", 1, Path("/tmp/k"), report=Report(acked=1600, lost=50),
                       after_replay=Report(acked=1600, lost=0), replayed=50, injected=1, drained=True,
                       config={"records": 1600})
    text = reliability_markdown([killed, _result()])
    assert "| scenario | verdict | lost after replay | lost |" in text
    assert "| 10_nsqd_kill | PASS | 0 | 50 | 0 |" in text
    assert "| replayed | 50 |\n| lost after replay | 0 |" in text


def test_the_configuration_lists_every_nsqd_node() -> None:
    nodes = [f"n{k} (node id {k}) 127.0.0.1:{4150 + k}, proxy 127.0.0.1:{5150 + k}" for k in range(3)]
    result = RunResult("14_nsqd_sigkill_replicated", 1, Path("/tmp/r"), report=Report(acked=3000), injected=2,
                       drained=True, config={"records": 3000, "nsqd_nodes": nodes, "replication": 2})
    text = reliability_markdown([result])
    assert f"| nsqd nodes | 3, every topic with 2 copies: {'; '.join(nodes)} |" in text
    console = Console(record=True, width=200)
    print_result(result, console)
    shown = console.export_text()
    assert "nsqd nodes" in shown and "3 (replication 2)" in shown


def test_a_new_report_keeps_the_hand_written_part_of_the_one_it_replaces(tmp_path) -> None:
    from chaos.report import HAND_WRITTEN, write_reliability
    path = tmp_path / "RELIABILITY.md"
    write_reliability([_result(lost=7)], path)
    assert "| lost | 7 |" in path.read_text() and HAND_WRITTEN[0] not in path.read_text()
    prose = f"{HAND_WRITTEN[0]}\n## What a killed nsqd keeps\n\nWritten by hand.\n{HAND_WRITTEN[1]}"
    generated = path.read_text().split("## soak (seed 7)")
    path.write_text(f"{generated[0]}{prose}\n\n## soak (seed 7){generated[1]}")
    write_reliability([_result(lost=0)], path)
    text = path.read_text()
    assert text.count(prose) == 1 and "| lost | 0 |" in text and "| lost | 7 |" not in text
    assert text.index(prose) < text.index("## soak (seed 7)")  # before each run's section


def test_restarts_per_crash_is_a_ratio_not_seconds() -> None:
    result = RunResult("15_poison_crash", 1, Path("/tmp/c"), report=Report(acked=2000, dead_lettered=2,
                                                                            restarts_per_crash=2.0), drained=True)
    text = reliability_markdown([result])
    assert "| restarts_per_crash | 2.00 |" in text and "| crash_not_dead_lettered | 0 |" in text


def test_the_headline_states_what_the_soak_checks_with_the_figures_measured() -> None:
    result = _result(recovery_clear_p99=1.9)
    result.config.update(nsqd_nodes=["n0", "n1", "n2"], replication=2)
    result.expect = {"lost": "<= 0", "recovery_p99": "<= 5", "recovery_clear_p99": "<= 3"}
    text = reliability_markdown([result])
    assert ("The soak (20,000 records on 3 nsqd, replication 2) checks `lost` <= 0 (measured 0), `recovery_p99`"
            " <= 5 over every worker kill (measured 3.400 s), `recovery_clear_p99` <= 3 over the kills with no"
            " broker or network fault in force (measured 1.900 s);") in text
    assert "Targets:" not in text
    # without a soak, each run is held to its own scenario
    assert "Each run is held to its scenario's `expect`" in reliability_markdown([RunResult("01_monkey", 1, Path("/t"))])
