"""The pipeline under real supervisord: up, down, status, scale, restarts, tail."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from harness import CHECK_CHANNEL, collect, ids_seen
from nsqhttp import channel_stats, get_json, topic_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.ops.control import Supervisor
from pipeline.ops.processes import free_port, pid_alive, stop_pid
from pipeline.config import load_topology
from producers.numbers import produce_numbers

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def pipeline(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


class Deployment:
    """A topology in a short temporary folder (unix socket paths are limited to 108 bytes)."""

    def __init__(self, handler: str = "consumers.primes:classify", replicas: int = 2, msg_timeout: float = 10,
                 topics: dict | None = None, stages: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="np-"))
        port = lambda: f"127.0.0.1:{free_port()}"  # noqa: E731
        doc = {
            "nsq": {"nsqd": [{"name": "n0", "tcp": port(), "http": port()}],
                    "lookupd": [{"tcp": port(), "http": port()}], "admin": port(), "var_dir": "var"},
            "topics": {"numbers": {"codec": "json"}, "prime": {"codec": "msgpack"}, "non_prime": {"codec": "json"}},
            "stages": {"primes": {"handler": handler, "input": "numbers", "channel": "primes",
                                  "outputs": ["prime", "non_prime"], "replicas": replicas,
                                  "msg_timeout": msg_timeout, "publish_timeout": min(5, msg_timeout / 2)}},
            "producers": {"numbers": {"topic": "numbers"}},
        }
        doc["topics"].update(topics or {})
        doc["stages"].update(stages or {})
        self.path = self.dir / "topology.yaml"
        self.path.write_text("# test topology\n" + yaml.safe_dump(doc, sort_keys=False))
        self.topology = load_topology(self.path)
        self.tcp, self.http = self.topology.nsqd_tcp_addresses()[0], self.topology.nsqd_http_addresses()[0]

    def up(self) -> subprocess.CompletedProcess:
        result = pipeline("up", "-t", str(self.path))
        assert result.returncode == 0, result.stderr
        return result

    def checked_outputs(self) -> list[str]:
        outputs = ["prime", "non_prime", "numbers.dead"]
        for topic in outputs:
            nsqd_http.create_channel(self.http, topic, CHECK_CHANNEL)
        return outputs

    def supervisor(self) -> Supervisor:
        return Supervisor(load_topology(self.path))

    def worker_pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.supervisor().processes() if p.group == "primes" and p.pid}

    def close(self) -> None:
        pidfile = self.dir / "var" / "run" / "supervisord.pid"
        if self.supervisor().running():
            pipeline("down", "-t", str(self.path))
        if pidfile.exists():
            pid = int(pidfile.read_text())
            if pid_alive(pid):
                stop_pid(pid, grace=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def deployment(nsq_bin):
    made: list[Deployment] = []

    def make(**kwargs) -> Deployment:
        made.append(Deployment(**kwargs))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _publish_in_background(d: Deployment, count: int, rate: float) -> threading.Thread:
    thread = threading.Thread(target=produce_numbers, args=(d.tcp, "numbers", 1, count),
                              kwargs={"rate": rate, "run_id": "s"}, daemon=True)
    thread.start()
    return thread


def _all_delivered(d: Deployment, outputs: list[str], count: int, timeout: float = 120) -> list[str]:
    got = collect(d.tcp, outputs, lambda g: len(set(ids_seen(g, outputs[:2]))) >= count, timeout)
    ids = ids_seen(got, outputs[:2])
    assert set(ids) == {f"s-{n}" for n in range(1, count + 1)}
    assert not got.get("numbers.dead")
    return ids


def test_up_is_idempotent_status_reports_and_nsqadmin_lists_topics(deployment):
    d = deployment()
    first = d.up()
    assert "nsqadmin:" in first.stdout and "primes-1" in first.stdout
    pid = int((d.dir / "var" / "run" / "supervisord.pid").read_text())
    d.up()  # again: the same supervisord, nothing restarted
    assert int((d.dir / "var" / "run" / "supervisord.pid").read_text()) == pid
    assert (d.dir / "supervisord.conf").read_text() == pipeline("render", "-t", str(d.path)).stdout

    status = pipeline("status", "--json", "-t", str(d.path))
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] is True
    assert {p["name"] for p in report["processes"]} >= {"primes-0", "primes-1", "nsqd-n0", "nsqadmin"}
    primes = [c for c in report["channels"] if c["topic"] == "numbers" and c["channel"] == "primes"]
    assert primes and primes[0]["clients"] == 2

    topics = get_json(d.topology.nsq.admin, "/api/topics")["topics"]
    assert set(topics) >= {"numbers", "prime", "non_prime"}
    numbers = get_json(d.topology.nsq.admin, "/api/topics/numbers")
    assert [c["channel_name"] for c in numbers["channels"]] == ["primes"]

    d.supervisor().rpc().supervisor.stopProcess("primes:primes-1", True)
    stopped = pipeline("status", "-t", str(d.path))
    assert stopped.returncode == 1 and "STOPPED" in stopped.stdout


def test_sigkilled_replica_is_running_again_within_3s_and_nothing_is_lost(deployment):
    d = deployment(msg_timeout=3)
    d.up()
    outputs = d.checked_outputs()
    producer = _publish_in_background(d, 50_000, rate=10_000)
    wait_until(lambda: (topic_stats(d.http, "non_prime") or {}).get("message_count", 0) >= 5_000, 30)

    victim = d.worker_pids()["primes-0"]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: d.worker_pids().get("primes-0") not in (None, victim)
               and any(p.name == "primes-0" and p.state == "RUNNING" for p in d.supervisor().processes()), 3,
               message="primes-0 not RUNNING again within 3 s of SIGKILL")
    print(f"primes-0 RUNNING again {time.monotonic() - killed_at:.2f}s after SIGKILL")
    producer.join(60)
    _all_delivered(d, outputs, 50_000)


def test_a_worker_crashing_on_start_is_retried_until_it_runs(deployment):
    d = deployment(handler="crashy_stage:classify", replicas=1)
    d.up()
    flag, starts = d.dir / "crash", d.dir / "starts"
    flag.touch()  # from now on every start of the worker fails while importing its handler
    os.kill(d.worker_pids()["primes-0"], signal.SIGKILL)

    start_count = lambda: len(starts.read_text().splitlines()) if starts.exists() else 0  # noqa: E731
    wait_until(lambda: start_count() >= 10, 90, message="the crashing worker was not retried 10 times")
    events = [json.loads(line) for line in (d.dir / "var" / "log" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "FATAL" for e in events), "the crash loop should have gone through FATAL"
    flag.unlink()
    wait_until(lambda: any(p.name == "primes-0" and p.state == "RUNNING" for p in d.supervisor().processes())
               and (channel_stats(d.http, "numbers", "primes") or {}).get("clients"), 90,
               message="worker did not run once the cause was removed")


def test_up_with_a_handler_that_does_not_load_fails_soon_naming_its_file_and_line(deployment):
    d = deployment(handler="broken_stage:classify", replicas=1)
    (d.dir / "broken_stage.py").write_text("def classify(batch)\n    return {}\n")  # beside the topology
    started = time.monotonic()
    result = pipeline("up", "-t", str(d.path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"pipeline: handler 'broken_stage:classify': {d.dir / 'broken_stage.py'}:1: SyntaxError: expected ':'")
    assert time.monotonic() - started < 60  # not the 90 s readiness timeout


def test_down_in_the_middle_then_up_delivers_every_id(deployment):
    d = deployment()
    d.up()
    outputs = d.checked_outputs()
    produce_numbers(d.tcp, "numbers", 1, 50_000, run_id="s")  # every record acknowledged by nsqd
    wait_until(lambda: (topic_stats(d.http, "non_prime") or {}).get("message_count", 0) >= 2_000, 30)

    down = pipeline("down", "-t", str(d.path))
    assert down.returncode == 0, down.stderr
    assert not d.supervisor().running()
    d.up()
    _all_delivered(d, outputs, 50_000)


def test_scale_up_and_down_live_loses_nothing(deployment):
    d = deployment()
    d.up()
    outputs = d.checked_outputs()
    producer = _publish_in_background(d, 40_000, rate=8_000)

    assert pipeline("scale", "primes", "4", "-t", str(d.path)).returncode == 0
    assert len(channel_stats(d.http, "numbers", "primes")["clients"]) == 4
    assert "replicas: 4" in d.path.read_text() and d.path.read_text().startswith("# test topology")
    assert pipeline("scale", "primes", "1", "-t", str(d.path)).returncode == 0
    assert len(channel_stats(d.http, "numbers", "primes")["clients"]) == 1
    producer.join(60)
    ids = _all_delivered(d, outputs, 40_000)
    print(f"duplicates after two scale changes: {sum(c - 1 for c in Counter(ids).values())}")


def test_tail_decodes_a_msgpack_topic_and_nsq_tail_reads_a_json_topic(deployment):
    d = deployment(replicas=1)
    d.up()
    tail = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "prime", "-n", "5", "-t", str(d.path)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(c["channel_name"].endswith("#ephemeral")
                           for c in (topic_stats(d.http, "prime") or {}).get("channels", [])), 30)
    produce_numbers(d.tcp, "numbers", 1, 100, run_id="s")
    out, err = tail.communicate(timeout=60)
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5 and all(r["prime"] is True and r["id"].startswith("s-") for r in records), err


@pytest.mark.parametrize("args, expected", [
    (["scale", "nosuchstage", "2"], "no stage 'nosuchstage'"),
    (["scale", "primes", "0"], "Invalid value for 'REPLICAS'"),
    (["scale", "primes", "-1"], "Invalid value for 'REPLICAS': -1 is not in the range 1<=x<=64"),
])
def test_bad_scale_arguments_exit_non_zero_with_one_line(deployment, args, expected):
    d = deployment()
    result = pipeline(*args, "-t", str(d.path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert expected in line
    assert "replicas: 2" in d.path.read_text()


def test_up_with_a_port_taken_starts_nothing(deployment):
    d = deployment()
    host, port = d.topology.nsq.nsqd[0].http.split(":")
    with socket.socket() as blocker:
        blocker.bind((host, int(port)))
        blocker.listen()
        result = pipeline("up", "-t", str(d.path))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert f"{host}:{port} (nsqd n0 http) is not free" in line
    assert not (d.dir / "var" / "run" / "supervisord.pid").exists()


RESTART_HANDLER = '''"""A primes stage whose version the restart tests change on disk."""
from consumers.primes import classify as _classify

MARK = {mark!r}


def classify(batch):
    return {{topic: [dict(r, handler=MARK) if MARK else r for r in records]
            for topic, records in _classify(batch).items()}}
'''


def _write_handler(d: Deployment, mark: str | None, broken: bool = False) -> None:
    text = RESTART_HANDLER.format(mark=mark) + ("raise ImportError('broken on purpose')\n" if broken else "")
    (d.dir / "restart_stage.py").write_text(text)


def _ids_delivered_or_dead(got: dict[str, list[dict]]) -> set[str]:
    dead = [json.loads(r["body"])["id"] for r in got.get("numbers.dead", [])]
    return set(ids_seen(got, ["prime", "non_prime"])) | set(dead)


def test_restart_rolls_every_replica_onto_new_code_while_numbers_flow_and_loses_nothing(deployment):
    # Given: two replicas of a handler in the topology's folder, 50,000 numbers being published
    d = deployment(handler="restart_stage:classify", replicas=2)
    _write_handler(d, mark=None)
    d.up()
    outputs = d.checked_outputs()
    old = d.worker_pids()
    bad = pipeline("restart", "nosuchstage", "primes", "-t", str(d.path))
    assert bad.returncode == 2 and "no stage 'nosuchstage'" in bad.stderr.strip()
    assert len(bad.stderr.strip().splitlines()) == 1 and d.worker_pids() == old
    producer = _publish_in_background(d, 50_000, rate=5_000)
    wait_until(lambda: (topic_stats(d.http, "non_prime") or {}).get("message_count", 0) >= 2_000, 30)

    # When: the handler changes on disk and the stage is restarted mid-flow
    _write_handler(d, mark="v2")
    result = pipeline("restart", "primes", "-t", str(d.path))

    # Then: every replica has a new pid, one line each, and every record published after carries the mark
    assert result.returncode == 0, result.stderr
    new = d.worker_pids()
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["primes-0", "primes-1"], result.stdout
    for name, line in zip(["primes-0", "primes-1"], lines, strict=True):
        assert new[name] != old[name] and f"pid {old[name]} → {new[name]}," in line
    producer.join(60)
    produce_numbers(d.tcp, "numbers", 1, 1_000, run_id="after")
    expected = {f"s-{n}" for n in range(1, 50_001)} | {f"after-{n}" for n in range(1, 1_001)}
    got = collect(d.tcp, outputs, lambda g: _ids_delivered_or_dead(g) >= expected, 120)
    assert not expected - _ids_delivered_or_dead(got)
    records = [r for topic in ("prime", "non_prime") for r in got[topic]]
    assert all(r.get("handler") == "v2" for r in records if r["id"].startswith("after-"))
    marked = sum(r.get("handler") == "v2" for r in records if r["id"].startswith("s-"))
    assert 0 < marked < 50_000, "the restart should have happened while the 50,000 flowed"
    print(result.stdout + f"{marked} of the 50,000 classified by the new code, dead letters: "
          f"{len(got.get('numbers.dead', []))}")


def test_restart_stops_the_roll_at_a_replica_that_does_not_come_back(deployment):
    d = deployment(handler="restart_stage:classify", replicas=2)
    _write_handler(d, mark=None)
    d.up()
    old = d.worker_pids()
    _write_handler(d, mark="v2", broken=True)
    result = pipeline("restart", "-t", str(d.path))
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "primes-0 did not come back: BACKOFF" in line and "the roll stopped there" in line
    assert d.worker_pids().get("primes-1") == old["primes-1"]  # never stopped


def test_restart_without_supervisord_exits_1_with_one_line(deployment):
    d = deployment()
    result = pipeline("restart", "-t", str(d.path))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert f"supervisord is not running for {d.path}" in line


def test_restart_rolls_a_keyed_stage_partition_by_partition(deployment):
    d = deployment(replicas=1, topics={"ins": {"codec": "msgpack", "key": "key", "partitions": 2},
                                       "sums": {"codec": "msgpack"}},
                   stages={"sums": {"handler": "stages_for_tests:RunningSum", "input": "ins", "channel": "sums",
                                    "outputs": ["sums"], "keyed": True, "replicas": 2}})
    d.up()
    old = {p.name: p.pid for p in d.supervisor().processes() if p.group == "sums"}
    result = pipeline("restart", "sums", "-t", str(d.path))
    assert result.returncode == 0, result.stderr
    new = {p.name: p.pid for p in d.supervisor().processes() if p.group == "sums"}
    assert sorted(old) == ["sums-0", "sums-1"] and all(new[n] != old[n] for n in old)
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["sums-0", "sums-1"]
    for k in range(2):  # replica k is back on its own partition
        assert len(channel_stats(d.http, f"ins.{k}", "sums")["clients"]) == 1
