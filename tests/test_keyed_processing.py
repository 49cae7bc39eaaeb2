"""KeyedProcessor: records reach a stateful stage once, per key in order, and failures leave state alone."""
from __future__ import annotations

from pathlib import Path

from pipeline.codecs import decode, encode_json
from pipeline.keyed import Sequencer
from pipeline.middleware import MiddlewareStack
from pipeline.processing import KeyedProcessor
from pipeline.stage import StageContext
from pipeline.topology import load_topology
from stages_for_tests import RunningSum


class Msg:
    count = 0

    def __init__(self, record: dict, attempts: int = 1):
        Msg.count += 1
        self.body, self.attempts, self.id = encode_json(record), attempts, b"%016d" % Msg.count


def keyed(tmp_path: Path, gap_max_count: int = 100) -> KeyedProcessor:
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        "topics: {ins: {key: key}, sums: {}}\n"
        "stages:\n"
        "  s: {handler: 'stages_for_tests:RunningSum', input: ins, channel: c, keyed: true, outputs: [sums]}\n")
    topology = load_topology(path)
    stage = RunningSum(StageContext("s", 0, tmp_path))
    return KeyedProcessor(None, "s", topology.stage("s"), topology, stage, MiddlewareStack(), key_field="key",
                          seq_field="seq", sequencer=Sequencer(gap_max_count, 60_000))


def tick(key, seq, v):
    return Msg({"id": f"{key}-{seq}", "key": key, "seq": seq, "v": v})


def sums(outcome):
    return [(r["key"], r["seq"], r["sum"]) for r in map(decode, outcome.outputs.get("sums", []))]


def test_duplicates_and_swaps_do_not_change_the_state(tmp_path):
    p = keyed(tmp_path)
    first = p.process([tick("A", 1, 10), tick("A", 3, 30), tick("A", 2, 20), tick("A", 2, 20)])
    assert sums(first) == [("A", 1, 10), ("A", 2, 30), ("A", 3, 60)]
    assert len(first.finish) == 4 and p.duplicates == 1
    again = p.process([tick("A", 3, 30), tick("A", 4, 40)])  # a redelivered 3, then 4
    assert sums(again) == [("A", 4, 100)]


def test_a_message_waiting_for_a_gap_is_finished_only_once_applied(tmp_path):
    p = keyed(tmp_path)
    early = tick("A", 2, 20)
    outcome = p.process([early])
    assert outcome.finish == [] and p.held_messages() == [early]
    later = p.process([tick("A", 1, 10)])
    assert sums(later) == [("A", 1, 10), ("A", 2, 30)] and early in later.finish


def test_a_failing_record_is_dead_lettered_and_the_state_is_as_if_it_never_came(tmp_path):
    p = keyed(tmp_path)
    outcome = p.process([tick("A", 1, 10), tick("A", 2, 13), tick("A", 3, 5), tick("B", 1, "x")])
    assert sums(outcome) == [("A", 1, 10), ("A", 3, 15)]
    reasons = sorted(d.reason for d in outcome.dead)
    assert "field 'v' must be an integer" in reasons[0]
    assert "ValueError: unlucky 13" in reasons[1] and "keyed stages do not retry" in reasons[1]
    assert len(outcome.finish) == 4


def test_records_without_key_or_seq_are_dead_lettered(tmp_path):
    p = keyed(tmp_path)
    outcome = p.process([Msg({"id": "x", "seq": 1, "v": 1}), Msg({"id": "y", "key": "A", "seq": "1", "v": 1})])
    assert sorted(d.reason.split(" must")[0] for d in outcome.dead) == ["field 'key'", "field 'seq'"]
    assert sums(outcome) == []
