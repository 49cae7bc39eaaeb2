"""The pipeline CLI: exit codes and one-line errors, run as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nsqhttp import topic_stats
from pipeline.ops.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def pipeline(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["worker", "nosuchstage"], "no stage 'nosuchstage' in topology.yaml (stages: primes, features, signals, "
                                "archive_signals, archive_primes)"),
    (["produce", "numbers", "--count", "0"], "Invalid value for '--count'"),
    (["produce", "numbers"], "Missing option '--count'"),
    (["produce", "numbers", "--count", "5", "--producer", "nope"], "no producer 'nope'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["worker", "primes", "--replica", "-1"], "Invalid value for '--replica'"),
])
def test_bad_arguments_exit_2_with_one_readable_line(args, expected):
    result = pipeline(*args)
    assert result.returncode == 2
    assert expected in one_line(result.stderr)


def test_check_accepts_the_default_topology():
    result = pipeline("check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "topology.yaml: ok"


def test_check_lists_every_error_and_exits_1(tmp_path):
    bad = (ROOT / "topology.yaml").read_text().replace("replicas: 2", "replicas: 0").replace(
        "codec: json}", "codec: xml}", 1)
    (tmp_path / "topology.yaml").write_text(bad)
    result = pipeline("check", "-t", str(tmp_path / "topology.yaml"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("topics.numbers.codec: must be one of: json, msgpack")
    assert lines[1].endswith("stages.primes.replicas: must be >= 1")


def test_a_bad_topology_stops_any_command_with_its_location(tmp_path):
    (tmp_path / "topology.yaml").write_text("nsq: {nsqd: []}\n")
    result = pipeline("worker", "primes", "-t", str(tmp_path / "topology.yaml"))
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"pipeline: {tmp_path / 'topology.yaml'}:1:")


def _topology_for(tmp_path: Path, tcp: str, http: str) -> Path:
    doc = yaml.safe_load((ROOT / "topology.yaml").read_text())
    doc["nsq"] = {"nsqd": [{"name": "n0", "tcp": tcp, "http": http}], "var_dir": str(tmp_path / "var")}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_produce_exits_1_with_one_line_when_nsqd_is_unreachable(tmp_path):
    port = free_port()
    path = _topology_for(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    result = pipeline("produce", "numbers", "--count", "10", "-t", str(path))
    assert result.returncode == 1
    assert f"cannot connect to nsqd at 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_produce_numbers_publishes_every_record(nsqd, tmp_path):
    path = _topology_for(tmp_path, nsqd.tcp, nsqd.http)
    result = pipeline("produce", "numbers", "--start", "5", "--count", "1234", "-t", str(path))
    assert result.returncode == 0, result.stderr
    assert "published 1234 records to numbers" in result.stdout
    assert topic_stats(nsqd.http, "numbers")["message_count"] == 1234


@pytest.mark.parametrize("args, module, what", [
    (["demo"], "producers", "the reference producers"),
    (["produce", "ticks", "--count", "5"], "producers", "the reference producers"),
    (["chaos", "list"], "chaos", "the chaos harness"),
    (["replay", "--missing", "--run", "."], "chaos", "the chaos harness"),
    (["bench"], "benchmarks", "the benchmarks"),
])
def test_commands_of_the_checkouts_code_fail_in_one_line_where_it_is_absent(tmp_path, args, module, what):
    # Given a folder outside the checkout and no PYTHONPATH: only the installed `pipeline` is importable
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    command = " ".join(["pipeline", *(a for a in args if not a.startswith("-") and a not in {"5", "."})])
    assert result.returncode == 1, result.stderr
    assert one_line(result.stderr) == (
        f"pipeline: `{command}` needs {what} (module '{module}'), found in the nsq-pipeline checkout; "
        "run it from there (with `make`, or as `python -m pipeline.cli ...` in its folder)")

