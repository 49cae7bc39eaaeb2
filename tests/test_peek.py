"""Looking never takes: `pipeline tail`, `pipeline peek` and the demo's `nsq_tail` leave every message queued.

Issue 19: on a topic without channels, a tail's ephemeral channel received the
whole backlog and lost it on exit. Each command runs here as a user runs it (the
CLI, or the command line the demo prints) on a real nsqd, against three topics
holding 500 messages each: one with no channel (`plain`, no stage reads it), one
whose stage channel holds them (`ordered`, channel `c1`, its stage not running),
and a stage's dead-letter topic with no channel (`numbers.dead`). nsqd's /stats
must show the same undelivered count before and after (tests/undelivered.py),
and every message must still be there when read back at the end.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nsqhttp import wait_until
from pipeline.client import nsqd_http
from pipeline.client import peek as client_peek
from pipeline.client.nsqclient import NsqPublisher
from pipeline.config import KEEP_CHANNEL, load_topology
from pipeline.records.deadletter import DeadLetter
from pipeline.records.codecs import encode_json
from undelivered import channels, read_back, undelivered

WAIT = 30.0
BACKLOG = 500


def write_topology(tmp_path: Path, nsqd) -> Path:
    """A topology over one nsqd: `primes` reads numbers (so numbers.dead is its dead-letter topic),
    `orders` reads `ordered` through channel c1; `plain` and `prime` are read by no stage."""
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": nsqd.tcp, "http": nsqd.http}], "var_dir": str(tmp_path / "var")},
        "topics": {"numbers": {}, "plain": {}, "ordered": {}, "prime": {}},
        "stages": {
            "primes": {"handler": "consumers.primes:classify", "input": "numbers", "channel": "primes",
                       "outputs": ["prime"]},
            "orders": {"handler": "consumers.primes:classify", "input": "ordered", "channel": "c1"},
        },
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Backlog:
    """A topic holding BACKLOG messages, and the channel they are read back on at the end."""

    topic: str
    channel: str  # where the messages are once a command ran (keep, unless the topic had a channel)
    bodies: list[bytes]


def fill(nsqd, kind: str) -> Backlog:
    """Queue BACKLOG messages on the topic of ``kind``: "plain" (no channel), "channel" (c1), "dead" (letters)."""
    if kind == "dead":
        topic, channel = "numbers.dead", KEEP_CHANNEL
        bodies = [DeadLetter(f"bad number {i}", "primes", "numbers", "primes", 5, f"{i:016x}",
                             encode_json({"n": i}), traceback=f"Traceback ...\nValueError: {i}").encode()
                  for i in range(BACKLOG)]
    else:
        topic, channel = ("plain", KEEP_CHANNEL) if kind == "plain" else ("ordered", "c1")
        bodies = [encode_json({"id": f"{kind}-{i}", "i": i}) for i in range(BACKLOG)]
    if kind == "channel":
        nsqd_http.create_channel(nsqd.http, topic, "c1")
    with NsqPublisher(nsqd.tcp) as pub:
        pub.publish(topic, bodies)
    # nsqd moves a topic's messages into its channels a little after the publish: a /stats taken meanwhile
    # counts the ones in the move in neither
    wait_until(lambda: undelivered(nsqd.http, topic) == BACKLOG, 10, message=f"{BACKLOG} messages never settled")
    assert (KEEP_CHANNEL in channels(nsqd.http, topic)) is False
    return Backlog(topic, channel, bodies)


def pipeline(topology: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-t", str(topology)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _interruptible() -> None:
    """Give the command Ctrl-C as a terminal's foreground command gets it: run in the background
    (`make test &`, nohup, some CI runners) the test's processes inherit SIGINT ignored, and Python
    then installs no KeyboardInterrupt handler (as tests/test_chaos_interrupt.py explains)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A command running with its output in files, so a test can poll what it printed so far."""

    def __init__(self, argv: list[str], folder: Path):
        self.out, self.err = folder / "out.txt", folder / "err.txt"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         preexec_fn=_interruptible)

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out.read_text()

    def finish(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def publish_more(nsqd, backlog: Backlog, n: int = 5) -> list[bytes]:
    more = [encode_json({"id": f"new-{i}", "i": BACKLOG + i}) for i in range(n)]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.publish(backlog.topic, more)
    return more


def assert_all_there(nsqd, backlog: Backlog, extra: list[bytes] = ()) -> None:
    """Every message published is still queued in the backlog's channel: read back, each exactly once."""
    expected = [*backlog.bodies, *extra]
    assert undelivered(nsqd.http, backlog.topic) == len(expected)
    assert sorted(read_back(nsqd.tcp, backlog.topic, backlog.channel, len(expected))) == sorted(expected)


# --- pipeline tail --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "channel", "dead"])
def test_tail_says_where_the_queued_messages_are_reads_new_ones_and_takes_none(nsqd, tmp_path, kind):
    topology = write_topology(tmp_path, nsqd)
    backlog = fill(nsqd, kind)
    tail = Background([sys.executable, "-m", "pipeline.cli", "tail", backlog.topic, "-n", "5", "-t", str(topology)],
                      tmp_path)
    # Given a quiet topic: within about a second the tail says it waits, and where the backlog is
    waiting = wait_until(lambda: "waiting for new messages" in tail.stderr() and tail.stderr(), WAIT,
                         message="the tail never said it was waiting")
    if kind == "channel":
        assert (f"waiting for new messages on ordered ({BACKLOG} already queued in channel c1; "
                "`pipeline peek ordered --channel c1` shows them)") in waiting
        assert "created" not in waiting  # the topic has a durable channel: nothing to create
    else:
        assert (f"created the durable channel 'keep' on {backlog.topic} (nsqd {nsqd.http}): its {BACKLOG} "
                "queued message(s) moved there; nothing was removed") in waiting
        assert (f"waiting for new messages on {backlog.topic} ({BACKLOG} already queued in channel keep; "
                f"`pipeline peek {backlog.topic}` shows them)") in waiting
    assert undelivered(nsqd.http, backlog.topic) == BACKLOG  # the tail holds nothing of the backlog
    # When 5 new messages come, the tail prints those 5 and exits
    more = publish_more(nsqd, backlog)
    assert tail.finish() == 0, tail.stderr()
    assert [json.loads(line) for line in tail.stdout().splitlines()] == [json.loads(b) for b in more]
    # Then nothing is gone: the backlog and the new ones are all queued
    assert_all_there(nsqd, backlog, more)


def test_tail_interrupted_on_a_quiet_channel_less_topic_leaves_its_backlog(nsqd, tmp_path):
    topology = write_topology(tmp_path, nsqd)
    backlog = fill(nsqd, "plain")
    tail = Background([sys.executable, "-m", "pipeline.cli", "tail", "plain", "-t", str(topology)], tmp_path)
    wait_until(lambda: "waiting for new messages" in tail.stderr(), WAIT, message="the tail never said it waits")
    tail.proc.send_signal(signal.SIGINT)  # Ctrl-C: how a follow ends
    assert tail.finish() == 0, tail.stderr()
    assert tail.stdout() == ""
    assert_all_there(nsqd, backlog)


# --- pipeline peek --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "channel", "dead"])
def test_peek_shows_the_oldest_queued_records_and_removes_none(nsqd, tmp_path, kind):
    topology = write_topology(tmp_path, nsqd)
    backlog = fill(nsqd, kind)
    args = ["peek", backlog.topic, "-n", "5"] + (["--channel", "c1"] if kind == "channel" else [])
    done = pipeline(topology, *args)
    assert done.returncode == 0, done.stderr
    shown = [json.loads(line) for line in done.stdout.splitlines()]
    assert shown == [json.loads(b) for b in backlog.bodies[:5]]  # oldest first, decoded
    if kind == "channel":
        assert "channel c1 is a stage's: each message shown counts as one delivery attempt" in done.stderr
    else:
        assert done.stderr.count("\n") == 1 and f"created the durable channel 'keep' on {backlog.topic}" in done.stderr
    assert undelivered(nsqd.http, backlog.topic) == BACKLOG
    # a second look shows the same messages: the first put them all back
    again = pipeline(topology, *args)
    assert sorted(again.stdout.splitlines()) == sorted(done.stdout.splitlines())
    assert_all_there(nsqd, backlog)


def test_peek_without_keep_on_a_topic_with_a_channel_names_it_and_creates_nothing(nsqd, tmp_path):
    topology = write_topology(tmp_path, nsqd)
    backlog = fill(nsqd, "channel")
    done = pipeline(topology, "peek", "ordered", "-n", "5")
    assert done.returncode == 1
    assert done.stderr == ("pipeline: topic ordered has no channel 'keep'; its durable channels: c1 "
                           "(choose one with --channel)\n")
    assert channels(nsqd.http, "ordered") == {"c1": BACKLOG}  # no keep started (it would copy every message)
    assert_all_there(nsqd, backlog)


def test_peek_on_a_stage_input_without_channels_gives_it_the_stage_channel_not_keep(nsqd, tmp_path):
    # Given the stage's input topic with a backlog and no channel yet (its stage never started)
    topology = write_topology(tmp_path, nsqd)
    bodies = [encode_json({"i": i}) for i in range(BACKLOG)]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.publish("ordered", bodies)
    done = pipeline(topology, "peek", "ordered", "-n", "5")
    # Then the backlog waits in the stage's channel, and the peek names it rather than copy everything into keep
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"created the durable channel 'c1' on ordered (nsqd {nsqd.http}): its {BACKLOG} queued message(s) moved "
        "there; nothing was removed",
        "pipeline: topic ordered has no channel 'keep'; its durable channels: c1 (choose one with --channel)"]
    assert channels(nsqd.http, "ordered") == {"c1": BACKLOG}
    assert_all_there(nsqd, Backlog("ordered", "c1", bodies))


def test_peek_of_more_than_one_connection_holds_reads_each_message_once(nsqd):
    # 6,000 messages: more than nsqd lets one connection hold in flight (2,500)
    bodies = [encode_json({"i": i}) for i in range(6000)]
    with NsqPublisher(nsqd.tcp) as pub:
        pub.publish("big", bodies)
    nsqd_http.create_channel(nsqd.http, "big", KEEP_CHANNEL)
    messages = client_peek.peek(nsqd.tcp, "big", KEEP_CHANNEL, 6000)
    assert sorted(m.body for m in messages) == sorted(bodies)
    assert [m.timestamp for m in messages] == sorted(m.timestamp for m in messages)
    assert undelivered(nsqd.http, "big") == 6000
    assert client_peek.trim(nsqd.tcp, "big", KEEP_CHANNEL, 1000) == 1000
    assert undelivered(nsqd.http, "big") == 5000
    assert len(set(read_back(nsqd.tcp, "big", KEEP_CHANNEL, 5000))) == 5000


# --- the demo's nsq_tail --------------------------------------------------------------------------

def demo_nsq_tail(topology_path: Path, topic: str) -> list[str]:
    """The nsq_tail command line the demo prints for ``topic``, printed on a console 40 columns wide."""
    from rich.console import Console

    from pipeline.cli.demo import DemoResult, next_steps, print_summary
    topology = load_topology(topology_path)
    out = io.StringIO()
    print_summary(topology, DemoResult({"prime": 1, "non_prime": 2}, 1.0), Console(file=out, width=40))
    printed = [line for line in out.getvalue().splitlines() if "nsq_tail" in line]
    assert printed == [line for line in next_steps(topology) if "nsq_tail" in line], "wrapped or missing"
    [line] = [line for line in next_steps(topology, topic) if "nsq_tail" in line]
    return shlex.split(line.split(":", 1)[1])


@pytest.mark.parametrize("kind", ["plain", "channel", "dead"])
def test_the_nsq_tail_the_demo_prints_takes_nothing_queued(nsqd, tmp_path, kind):
    topology = write_topology(tmp_path, nsqd)
    backlog = fill(nsqd, kind)
    argv = demo_nsq_tail(topology, backlog.topic)
    assert os.path.basename(argv[0]) == "nsq_tail" and f"--topic={backlog.topic}" in argv and "-n" in argv
    tail = Background(argv, tmp_path)
    wait_until(lambda: any(name.endswith("#ephemeral") for name in channels(nsqd.http, backlog.topic)), WAIT,
               message="nsq_tail never subscribed")
    assert undelivered(nsqd.http, backlog.topic) == BACKLOG
    more = publish_more(nsqd, backlog)
    assert tail.finish() == 0, tail.stderr()
    assert tail.stdout().splitlines() == [b.decode() for b in more]  # only what came after it subscribed
    assert_all_there(nsqd, backlog, more)


def test_the_demo_prints_each_command_on_one_line(nsqd, tmp_path):
    topology = load_topology(write_topology(tmp_path, nsqd))
    from rich.console import Console

    from pipeline.cli.demo import DemoResult, next_steps, print_summary
    out = io.StringIO()
    print_summary(topology, DemoResult({"prime": 1}, 1.0), Console(file=out, width=30))
    lines = out.getvalue().splitlines()
    for step in next_steps(topology):
        assert step in lines
    assert KEEP_CHANNEL in channels(nsqd.http, "prime")  # the topic it tails keeps its messages


# --- pipeline up ----------------------------------------------------------------------------------

def test_kept_topics_are_the_topics_no_stage_reads_with_their_bounds(tmp_path, nsqd):
    doc = yaml.safe_load(write_topology(tmp_path, nsqd).read_text())
    doc["topics"]["plain"] = {"keep": 50}
    doc["topics"]["ticks"] = {"partitions": 2, "key": "symbol", "keep": None}
    doc["stages"]["orders"]["dead_keep"] = 7
    path = tmp_path / "bounded.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert load_topology(path).kept_topics() == {
        "plain": 50, "prime": 100_000, "ticks.0": None, "ticks.1": None,  # terminal: every partition
        "numbers.dead": None, "ordered.dead": 7,  # dead letters: all, unless the stage bounds them
    }


def test_pipeline_up_gives_every_topic_no_stage_reads_its_keep_channel(nsq_bin, tmp_path):
    # Given a topology whose stages are under supervisord, and a terminal topic with a backlog before `up`
    from pipeline.ops.control import Supervisor
    from pipeline.testing.cluster import copy_topology
    source = tmp_path / "src.yaml"
    source.write_text(yaml.safe_dump({
        "nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:4150", "http": "127.0.0.1:4151"}]},
        "topics": {"numbers": {}, "prime": {}, "non_prime": {}},
        "stages": {"primes": {"handler": "consumers.primes:classify", "input": "numbers", "channel": "primes",
                              "outputs": ["prime", "non_prime"]}},
    }))
    topology = load_topology(copy_topology(source, tmp_path / "t", monitor=False))
    supervisor = Supervisor(topology)
    try:
        supervisor.up(log=lambda line: None)
        http, tcp = topology.nsqd_http_addresses()[0], topology.nsqd_tcp_addresses()[0]
        for topic in ("prime", "non_prime", "numbers.dead"):
            assert KEEP_CHANNEL in channels(http, topic), topic
        assert KEEP_CHANNEL not in channels(http, "numbers")  # its stage's channel keeps it
        # When records flow, the terminal topics keep them, and a look at them takes none
        with NsqPublisher(tcp) as pub:
            pub.publish("numbers", [encode_json({"id": f"n{i}", "number": i}) for i in range(1, 101)])
        wait_until(lambda: undelivered(http, "prime") + undelivered(http, "non_prime") == 100, WAIT,
                   message="the terminal topics did not keep all 100 records")
        before = undelivered(http, "prime")
        done = pipeline(topology.path, "peek", "prime", "-n", "3")
        assert done.returncode == 0 and len(done.stdout.splitlines()) == 3, done.stderr
        assert undelivered(http, "prime") == before == 25  # the primes up to 100
    finally:
        supervisor.down(log=lambda line: None)
    assert not supervisor.running()
