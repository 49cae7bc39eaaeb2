"""KeyedProcessor: records reach a stateful stage once, per key in order, and failures leave state alone."""
from __future__ import annotations

from pathlib import Path

from pipeline.codecs import decode, encode_json
from pipeline.envelope import pack
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
    early = tick("A", 3, 30)
    first = p.process([tick("A", 1, 10), early, tick("A", 2, 20), tick("A", 2, 20)])
    assert sums(first) == [("A", 1, 10), ("A", 2, 30)]
    assert first.defer == [early] and early not in first.finish  # back to nsqd, not lost, not held
    assert len(first.finish) == 3 and p.duplicates == 1
    again = p.process([early, tick("A", 4, 40), tick("A", 3, 30)])  # 3 comes back, and a redelivered copy
    assert sums(again) == [("A", 3, 60), ("A", 4, 100)] and len(again.finish) == 3


def _packed(ticks):
    message = Msg({})
    message.body = pack([decode(t.body) for t in ticks], 100)[0]
    return message


def test_an_envelope_waiting_for_a_gap_is_held_and_finished_once_applied(tmp_path):
    p = keyed(tmp_path)
    early = _packed([tick("A", 2, 20), tick("A", 3, 30)])
    outcome = p.process([early])
    assert outcome.finish == [] and outcome.defer == [] and p.held_messages() == [early]
    later = p.process([tick("A", 1, 10)])
    assert sums(later) == [("A", 1, 10), ("A", 2, 30), ("A", 3, 60)] and early in later.finish


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


def test_a_redelivered_copy_of_a_waiting_record_is_finished_only_with_it(tmp_path):
    # Regression: the copy nsqd redelivers after msg_timeout was finished as a duplicate while the
    # waiting original existed only in memory; a crash then lost the record for good.
    p = keyed(tmp_path)
    waiting = _packed([tick("A", 2, 20)])
    p.process([waiting])
    copy = _packed([tick("A", 2, 20)])
    assert p.process([copy]).finish == []
    assert set(p.held_messages()) == {waiting, copy}
    done = p.process([tick("A", 1, 10)])
    assert sums(done) == [("A", 1, 10), ("A", 2, 30)]
    assert waiting in done.finish and copy in done.finish and p.held_messages() == []
