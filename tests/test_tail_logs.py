"""``tail_topic`` and ``stage_logs`` on real nsqd and real files, and ``nsq_tail`` as the reference."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nsqhttp import topic_stats, wait_until
from pipeline.records.codecs import encode_json, encode_msgpack
from pipeline.errors import PipelineError, PublishError
from pipeline.ops.install import nsq_binary
from pipeline.observe.logs import stage_logs
from pipeline.client.nsqclient import NsqPublisher
from pipeline.ops.processes import start_nsqd
from pipeline.observe.tail import tail_topic
from pipeline.config import Topology, load_topology

WAIT = 10.0
UNDECODABLE = re.compile(r"# undecodable message [0-9a-f]{16}: (.*)")


def write_topology(tmp_path: Path, nsqds: list, json_topic: str) -> Topology:
    """Write and load a topology over ``nsqds`` with a msgpack topic ``prime`` and the json topic."""
    doc = {
        "nsq": {"nsqd": [{"name": f"n{i}", "tcp": n.tcp, "http": n.http} for i, n in enumerate(nsqds)],
                "var_dir": str(tmp_path / "var")},
        "topics": {json_topic: {"codec": "json"}, "prime": {"codec": "msgpack"}},
        "stages": {
            "primes": {"handler": "consumers.primes:classify", "input": json_topic, "channel": "primes",
                       "outputs": ["prime"], "replicas": 2},
            # a name the glob "primes-*.log" also matches: its logs must not show up as primes'
            "primes-x": {"handler": "consumers.primes:classify", "input": json_topic, "channel": "x"},
        },
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_topology(path)


class Background:
    """Run ``target`` in a daemon thread and keep its result or exception."""

    def __init__(self, target: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self.result = target()
        except BaseException as e:  # handed to the test by join()
            self.error = e

    def join(self, timeout: float = WAIT) -> Any:
        """Wait for the thread; return its result or raise its exception."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout:g} s"
        if self.error is not None:
            raise self.error
        return self.result


def ephemeral_channels(http: str, topic: str, prefix: str = "tail-") -> list[str]:
    """Names of the ephemeral channels of ``topic`` starting with ``prefix`` that have a client."""
    found = topic_stats(http, topic) or {}
    return [c["channel_name"] for c in found.get("channels") or []
            if c["channel_name"].startswith(prefix) and c["channel_name"].endswith("#ephemeral")
            and c.get("clients")]


def any_tail_channel(http: str, topic: str) -> bool:
    """Whether any ``tail-`` channel of ``topic``, with or without clients, is still on nsqd."""
    found = topic_stats(http, topic) or {}
    return any(c["channel_name"].startswith("tail-") for c in found.get("channels") or [])


def start_tail(topology: Topology, topic: str, out: io.StringIO, **kwargs) -> Background:
    """Start ``tail_topic`` in a thread and return once its channel is subscribed on every nsqd."""
    tail = Background(lambda: tail_topic(topology, topic, out=out, **kwargs))
    for http in topology.nsqd_http_addresses():
        wait_until(lambda: tail.error or ephemeral_channels(http, topic), WAIT,
                   message=f"tail channel never subscribed on {http}")
    return tail


# --- tail_topic ---------------------------------------------------------------------------------

def test_tail_prints_count_msgpack_records_in_order_then_its_channel_goes(nsqd, tmp_path):
    topology = write_topology(tmp_path, [nsqd], "numbers")
    out = io.StringIO()
    tail = start_tail(topology, "prime", out, count=5, timeout=20)
    # keys deliberately unsorted: the tail keeps the order they were published in
    records = [{"n": n, "id": f"r{n}", "prime": True, "ts": 1_700_000_000_000_000_000 + n} for n in range(7)]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub("prime", [encode_msgpack(r) for r in records])

    assert tail.join() == 5
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == records[:5]
    assert [list(json.loads(line)) for line in lines] == [["n", "id", "prime", "ts"]] * 5
    assert all(" " not in line for line in lines)  # compact
    wait_until(lambda: not any_tail_channel(nsqd.http, "prime"), WAIT,
               message="the tail's ephemeral channel outlived the tail")


def test_tail_reports_undecodable_bodies_and_goes_on(nsqd, tmp_path, topic):
    topology = write_topology(tmp_path, [nsqd], topic)
    out = io.StringIO()
    tail = start_tail(topology, topic, out, count=3, timeout=20)
    first, second, third = {"id": "a", "n": 1}, {"id": "b", "blob": b"\x00\xffraw"}, {"id": "c", "n": 3}
    bodies = [encode_json(first), b"not a record", encode_msgpack(second), b"\x81\xc1", encode_json(third)]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(topic, bodies)

    assert tail.join() == 3  # undecodable messages are shown, not counted
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert json.loads(lines[0]) == first
    assert UNDECODABLE.fullmatch(lines[1]).group(1).startswith("not a JSON object or msgpack map")
    # bytes in a msgpack record print as their base64 string
    assert json.loads(lines[2]) == {"id": "b", "blob": base64.b64encode(b"\x00\xffraw").decode()}
    assert UNDECODABLE.fullmatch(lines[3]).group(1).startswith("invalid msgpack")
    assert json.loads(lines[4]) == third


def test_tail_stops_at_its_deadline_on_a_quiet_topic(nsqd, tmp_path, topic):
    topology = write_topology(tmp_path, [nsqd], topic)
    started = time.monotonic()
    assert tail_topic(topology, topic, count=None, out=io.StringIO(), timeout=0.5) == 0
    assert 0.5 <= time.monotonic() - started < 5
    wait_until(lambda: not any_tail_channel(nsqd.http, topic), WAIT, message="tail channel left behind")


class InterruptingOut(io.StringIO):
    """An output that raises KeyboardInterrupt on the first line, as Ctrl-C during a follow would."""

    def write(self, text: str) -> int:
        raise KeyboardInterrupt


def test_tail_returns_cleanly_on_ctrl_c_and_leaves_no_channel(nsqd, tmp_path, topic):
    topology = write_topology(tmp_path, [nsqd], topic)
    tail = start_tail(topology, topic, InterruptingOut(), count=None, timeout=20)
    with NsqPublisher(nsqd.tcp) as pub:
        pub.mpub(topic, [encode_json({"id": "x"})])
    assert tail.join() == 0
    wait_until(lambda: not any_tail_channel(nsqd.http, topic), WAIT, message="tail channel left behind")


def test_tail_reads_every_nsqd_and_a_quiet_one_does_not_block_the_other(nsqd, nsq_bin, tmp_path, topic):
    other = start_nsqd(tmp_path / "nsqd-b", extra=["--node-id=1"])
    try:
        topology = write_topology(tmp_path, [nsqd, other], topic)
        out = io.StringIO()
        tail = start_tail(topology, topic, out, count=40, timeout=20)
        # Given 30 records on the first nsqd only: they all show while the second stays quiet
        with NsqPublisher(nsqd.tcp) as pub:
            pub.mpub(topic, [encode_json({"id": f"a{i}"}) for i in range(30)])
        wait_until(lambda: out.getvalue().count("\n") == 30, WAIT, message="records of the first nsqd")
        # When 10 more arrive on the second, the tail reaches its count
        with NsqPublisher(other.tcp) as pub:
            pub.mpub(topic, [encode_json({"id": f"b{i}"}) for i in range(10)])
        assert tail.join() == 40
        ids = [json.loads(line)["id"] for line in out.getvalue().splitlines()]
        assert ids == [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)]
    finally:
        other.stop()


def test_tail_fails_when_an_nsqd_hangs_up_instead_of_spinning(nsqd, nsq_bin, tmp_path, topic):
    other = start_nsqd(tmp_path / "nsqd-b", extra=["--node-id=1"])
    try:
        topology = write_topology(tmp_path, [nsqd, other], topic)
        tail = start_tail(topology, topic, io.StringIO(), count=None, timeout=30)
    finally:
        other.stop()
    with pytest.raises(PublishError, match=rf"nsqd at {re.escape(other.tcp)} closed the connection"):
        tail.join()


def test_nsq_tail_prints_json_bodies_as_published(nsqd, topic):
    proc = subprocess.Popen([nsq_binary("nsq_tail"), f"--nsqd-tcp-address={nsqd.tcp}", f"--topic={topic}", "-n", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or ephemeral_channels(nsqd.http, topic, prefix="tail"), WAIT,
                   message="nsq_tail never subscribed")
        bodies = [encode_json({"id": f"j{i}", "n": i}) for i in range(3)]
        with NsqPublisher(nsqd.tcp) as pub:
            pub.mpub(topic, bodies)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()  # by its pid, bounded: only when it did not exit by itself
            proc.wait(timeout=WAIT)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert stdout.splitlines() == bodies


# --- stage_logs ---------------------------------------------------------------------------------

@pytest.fixture
def log_topology(tmp_path) -> tuple[Topology, Path]:
    """A topology (no nsqd needed) and its empty worker log directory."""
    node = type("Node", (), {"tcp": "127.0.0.1:4150", "http": "127.0.0.1:4151"})
    topology = write_topology(tmp_path, [node], "numbers")
    directory = topology.var_dir / "log"
    directory.mkdir(parents=True)
    return topology, directory


def test_logs_show_the_last_lines_of_each_replica_with_prefixes(log_topology):
    topology, directory = log_topology
    (directory / "primes-0.log").write_text("a1\na2\na3\na4\n")
    (directory / "primes-1.log").write_text("b1\nb2\nb3 unterminated")
    (directory / "primes-0.log.1").write_text("old backup\n")
    (directory / "primes-x-0.log").write_text("another stage\n")
    out = io.StringIO()
    stage_logs(topology, "primes", lines=2, out=out)
    assert out.getvalue() == "primes-0 | a3\nprimes-0 | a4\nprimes-1 | b2\nprimes-1 | b3 unterminated\n"


def test_logs_without_files_say_where_they_will_be(log_topology):
    topology, directory = log_topology
    out = io.StringIO()
    stage_logs(topology, "primes", out=out)
    assert out.getvalue() == (f"no logs of stage 'primes' yet; they will appear in {directory}/primes-<replica>.log\n")


def test_unknown_stage_is_one_line_listing_the_stages(log_topology):
    topology, _ = log_topology
    with pytest.raises(PipelineError) as caught:
        stage_logs(topology, "nope", out=io.StringIO())
    assert type(caught.value) is PipelineError
    assert str(caught.value) == "no stage 'nope' (stages: primes, primes-x)"


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_follow_picks_up_appends_rotation_and_new_replicas(log_topology):
    topology, directory = log_topology
    zero, one = directory / "primes-0.log", directory / "primes-1.log"
    zero.write_text("z1\nz2\n")
    one.write_text("o1\n")
    out, stop = io.StringIO(), threading.Event()
    deadline = time.monotonic() + 30  # a broken follow still ends
    follow = Background(lambda: stage_logs(topology, "primes", lines=1, follow=True, out=out, poll=0.01,
                                           until=lambda: stop.is_set() or time.monotonic() > deadline))

    def shown() -> list[str]:
        return out.getvalue().splitlines()

    wait_until(lambda: shown() == ["primes-0 | z2", "primes-1 | o1"], WAIT, message="initial lines")
    # Given a line written in two pieces, it shows once, whole
    append(one, "o2 ha")
    append(one, "lf\n")
    wait_until(lambda: "primes-1 | o2 half" in shown(), WAIT, message="appended line")
    # When supervisord rotates primes-0.log right after a last write to the old file
    append(zero, "z3 before rotation\n")
    zero.rename(directory / "primes-0.log.1")
    zero.write_text("z4 after rotation\n")
    # And a third replica starts
    (directory / "primes-2.log").write_text("t1\n")
    expected = ["primes-0 | z2", "primes-1 | o1", "primes-1 | o2 half", "primes-0 | z3 before rotation",
                "primes-0 | z4 after rotation", "primes-2 | t1"]
    wait_until(lambda: sorted(shown()) == sorted(expected), WAIT, message="rotated and new files")
    stop.set()
    follow.join()
    assert sorted(shown()) == sorted(expected)  # nothing twice
    assert shown().index("primes-0 | z3 before rotation") < shown().index("primes-0 | z4 after rotation")


def test_follow_reads_a_file_truncated_in_place_from_its_start(log_topology):
    topology, directory = log_topology
    zero = directory / "primes-0.log"
    zero.write_text("long line before truncation\n")
    out, stop = io.StringIO(), threading.Event()
    deadline = time.monotonic() + 30
    follow = Background(lambda: stage_logs(topology, "primes", lines=5, follow=True, out=out, poll=0.01,
                                           until=lambda: stop.is_set() or time.monotonic() > deadline))
    wait_until(lambda: out.getvalue(), WAIT, message="initial lines")
    zero.write_text("new\n")  # same inode, shorter: copytruncate-style rotation
    wait_until(lambda: "primes-0 | new\n" in out.getvalue(), WAIT, message="line after truncation")
    stop.set()
    follow.join()
    assert out.getvalue() == "primes-0 | long line before truncation\nprimes-0 | new\n"
