"""KeyedProcessor: records reach a stateful stage once, per key in order, and failures leave state alone."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.records.codecs import decode, encode_json
from pipeline.records.envelope import pack
from pipeline.errors import StageStateError
from pipeline.runtime.keyed import Checkpoint, Sequencer
from pipeline.middleware import MiddlewareStack
from pipeline.runtime.keyed_processing import KeyedEntry, KeyedProcessor
from pipeline.runtime.processing import ProcessingContext
from pipeline.stage import StageContext
from pipeline.config import load_topology
from stages_for_tests import RunningSum


class Msg:
    count = 0

    def __init__(self, record: dict, attempts: int = 1):
        Msg.count += 1
        self.body, self.attempts, self.id = encode_json(record), attempts, b"%016d" % Msg.count


def keyed(tmp_path: Path, gap_max_count: int = 100, sequencer_state=None, handler_state=None) -> KeyedProcessor:
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        "topics: {ins: {key: key}, sums: {}}\n"
        "stages:\n"
        "  s: {handler: 'stages_for_tests:RunningSum', input: ins, channel: c, keyed: true, outputs: [sums]}\n")
    topology = load_topology(path)
    stage = RunningSum(StageContext("s", 0, tmp_path))
    sequencer = Sequencer(gap_max_count, 60_000, pack_item=KeyedEntry.pack, unpack_item=KeyedEntry.unpack)
    if sequencer_state is not None:
        sequencer.restore(sequencer_state)
        stage.restore(handler_state)
    context = ProcessingContext("s", topology.stage("s"), topology, stage, MiddlewareStack())
    return KeyedProcessor(context, key_field="key", seq_field="seq", sequencer=sequencer)


def tick(key, seq, v):
    return Msg({"id": f"{key}-{seq}", "key": key, "seq": seq, "v": v})


def sums(outcome):
    return [(r["key"], r["seq"], r["sum"]) for r in map(decode, outcome.outputs.get("sums", []))]


def test_duplicates_and_swaps_do_not_change_the_state(tmp_path):
    p = keyed(tmp_path)
    batch = [tick("A", 1, 10), tick("A", 3, 30), tick("A", 2, 20), tick("A", 2, 20)]
    first = p.process(batch)
    assert sums(first) == [("A", 1, 10), ("A", 2, 30), ("A", 3, 60)]
    assert first.finish == batch and p.duplicates == 1 and p.parked == 1
    again = p.process([tick("A", 3, 30), tick("A", 4, 40)])  # a redelivered copy of 3, then 4
    assert sums(again) == [("A", 4, 100)] and len(again.finish) == 2


def _packed(ticks):
    message = Msg({})
    message.body = pack([decode(t.body) for t in ticks], 100)[0]
    return message


def test_records_ahead_of_a_gap_are_parked_and_their_messages_finished_at_once(tmp_path):
    # Parked records take no room in the in-flight window: the replica keeps receiving,
    # so the missing record (a crashed replica's, back after msg_timeout) can reach it.
    p = keyed(tmp_path)
    early = _packed([tick("A", 2, 20), tick("A", 3, 30)])
    single = tick("B", 5, 1)
    outcome = p.process([early, single])
    assert outcome.finish == [early, single] and sums(outcome) == [] and p.sequencer.parked_count() == 3
    later = p.process([tick("A", 1, 10)])
    assert sums(later) == [("A", 1, 10), ("A", 2, 30), ("A", 3, 60)] and p.sequencer.parked_count() == 1


def test_parked_records_survive_a_restart_through_the_checkpoint(tmp_path):
    # A finished message's record exists only in the checkpoint: a replica started
    # from it must apply the record when the gap fills, exactly once.
    p = keyed(tmp_path)
    p.process([tick("A", 1, 10)])
    p.process([tick("A", 3, 30), _packed([tick("A", 4, 40)])])
    checkpoint = Checkpoint(tmp_path / "s-0.ckpt")
    checkpoint.save(p.sequencer.state(), p.handler.snapshot())
    restarted = keyed(tmp_path, sequencer_state=checkpoint.load()[0], handler_state=checkpoint.load()[1])
    assert restarted.sequencer.parked_count() == 2
    outcome = restarted.process([tick("A", 3, 30), tick("A", 2, 20)])  # a copy of a parked one, then the gap
    assert sums(outcome) == [("A", 2, 30), ("A", 3, 60), ("A", 4, 100)] and restarted.duplicates == 1


def test_a_parked_record_that_fails_later_is_dead_lettered_with_its_own_message(tmp_path):
    p = keyed(tmp_path)
    unlucky = tick("A", 2, 13)
    p.process([unlucky])
    outcome = p.process([tick("A", 1, 10)])
    assert sums(outcome) == [("A", 1, 10)]
    [dead] = outcome.dead
    assert "ValueError: unlucky 13" in dead.reason
    assert dead.body == unlucky.body and dead.message.id == unlucky.id and dead.index is None
    assert decode(p.dead_letter(dead))["nsq_message_id"] == unlucky.id.decode()


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


def test_a_gap_is_given_up_only_when_the_worker_allows_it(tmp_path):
    p = keyed(tmp_path)
    p.sequencer.gap_max_s = 0.0  # every gap is due at once
    allowed = [False]
    p.may_give_up = lambda: allowed[0]
    assert sums(p.process([tick("A", 2, 20)])) == [] and p.sequencer.parked_count() == 1
    assert sums(p.process([])) == []  # nsqd still holds messages: seq 1 may be among them
    allowed[0] = True
    assert sums(p.process([])) == [("A", 2, 20)] and p.sequencer.gaps == 1


# ---------------------------------------------------------------------------
# The columnar path: in-order envelopes go through the stage's columns function
# ---------------------------------------------------------------------------

def columnar(tmp_path: Path, handler: str = "ColumnarRunningSum", sums_topic: str = "{}") -> KeyedProcessor:
    import stages_for_tests
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        f"topics: {{ins: {{key: key, pack: 100}}, sums: {sums_topic}}}\n"
        "stages:\n"
        f"  s: {{handler: 'stages_for_tests:{handler}', input: ins, channel: c, keyed: true, outputs: [sums]}}\n")
    topology = load_topology(path)
    stage = getattr(stages_for_tests, handler)(StageContext("s", 0, tmp_path))
    sequencer = Sequencer(100, 60_000, pack_item=KeyedEntry.pack, unpack_item=KeyedEntry.unpack)
    context = ProcessingContext("s", topology.stage("s"), topology, stage, MiddlewareStack())
    return KeyedProcessor(context, key_field="key", seq_field="seq", sequencer=sequencer)


def all_sums(outcome):
    from pipeline.records.envelope import records_of
    return [(r["key"], r["seq"], r["sum"]) for body in [b for bodies in outcome.outputs.values() for b in bodies]
            for r in records_of([decode(body)])]


def test_in_order_envelopes_take_the_columnar_path_with_the_record_paths_results(tmp_path):
    batches = [[_packed([tick("A", 1, 1), tick("B", 1, 5), tick("A", 2, 2)]), _packed([tick("B", 2, 6)])],
               [_packed([tick("A", 3, 3), tick("C", 1, 7)])]]
    fast, slow = columnar(tmp_path / "fast"), columnar(tmp_path / "slow", "RunningSum")
    for batch in batches:
        got, want = fast.process(batch), slow.process(batch)
        assert all_sums(got) == all_sums(want) and got.finish == batch and got.dead == []
    assert fast.columns_path == 2 and slow.columns_path == 0
    assert fast.sequencer.applied == slow.sequencer.applied == {"A": 3, "B": 2, "C": 1}
    assert fast.handler_state() == slow.handler_state()


def test_out_of_order_or_duplicate_envelopes_go_the_record_way_and_stay_exact(tmp_path):
    p = columnar(tmp_path)
    p.process([_packed([tick("A", 1, 1)])])
    swapped = p.process([_packed([tick("A", 3, 3), tick("A", 2, 2)])])
    again = p.process([_packed([tick("A", 3, 3), tick("A", 4, 4)])])  # 3 again: a redelivery
    assert p.columns_path == 1  # only the first
    assert all_sums(swapped) == [("A", 2, 3), ("A", 3, 6)] and all_sums(again) == [("A", 4, 10)]
    assert p.duplicates == 1


def test_a_failing_columnar_call_changes_nothing_and_the_record_path_dead_letters_the_record(tmp_path):
    p = columnar(tmp_path)
    p.process([_packed([tick("A", 1, 1)])])
    outcome = p.process([_packed([tick("A", 2, 2), tick("A", 3, 13), tick("A", 4, 4)])])
    # The columnar call added 2 and 13 to A before it raised; the state went back, the record path ran.
    assert p.columns_path == 1 and all_sums(outcome) == [("A", 2, 3), ("A", 4, 7)]
    assert [d.reason for d in outcome.dead] == ["handler raised ValueError: unlucky 13 (keyed stages do not retry)"]
    assert p.sequencer.applied == {"A": 4} and p.handler.sums == {"A": 7}


def test_an_atomic_columnar_stage_is_not_snapshotted_before_each_call(tmp_path):
    batches = [[_packed([tick("A", 1, 1), tick("B", 1, 5)])], [_packed([tick("A", 2, 2)])], [_packed([tick("B", 2, 6)])]]
    fast, slow = columnar(tmp_path / "fast", "AtomicColumnarRunningSum"), columnar(tmp_path / "slow", "RunningSum")
    for batch in batches:
        assert all_sums(fast.process(batch)) == all_sums(slow.process(batch))
    assert fast.columns_path == 3 and fast.handler.snapshots == 0
    assert fast.handler_state() == slow.handler_state() and fast.handler.snapshots == 1  # taken when asked for


def test_an_atomic_columnar_call_that_declines_leaves_the_record_path_to_name_the_bad_record(tmp_path):
    p = columnar(tmp_path, "AtomicColumnarRunningSum")
    outcome = p.process([_packed([tick("A", 1, 1), tick("A", 2, "x"), tick("A", 3, 3)])])
    assert p.columns_path == 0 and all_sums(outcome) == [("A", 1, 1), ("A", 3, 4)]
    assert [d.reason for d in outcome.dead] == ["field 'v' must be an integer"]
    assert p.sequencer.applied == {"A": 3} and p.handler.sums == {"A": 4}


def test_an_atomic_columnar_call_that_fails_after_changing_the_state_is_a_stage_state_error(tmp_path):
    # Given a stage that promised to decline before any change, but raises halfway through a batch
    p = columnar(tmp_path, "AtomicColumnarRunningSum")
    p.process([_packed([tick("A", 1, 1)])])
    # When the call raises after it added 2 to A: nothing can put the state back but the last checkpoint
    with pytest.raises(StageStateError, match="stage s: its columnar call raised"):
        p.process([_packed([tick("A", 2, 2), tick("A", 3, 13)])])
    # Then the sequencer did not take the batch (the worker rewinds the replica and it comes back)
    assert p.sequencer.applied == {"A": 1} and p.columns_path == 1


def test_columnar_outputs_to_a_partitioned_topic_land_where_the_record_path_puts_them(tmp_path):
    sums = "{partitions: 4, key: key, pack: 50}"
    fast, slow = columnar(tmp_path / "fast", sums_topic=sums), columnar(tmp_path / "slow", "RunningSum", sums)
    keys = [f"K{i}" for i in range(12)]
    batch = [_packed([tick(k, 1, i) for i, k in enumerate(keys)])]
    got, want = fast.process(batch), slow.process(batch)
    assert fast.columns_path == 1 and len(got.outputs) > 1
    assert {t: all_sums(type(got)(outputs={t: b})) for t, b in got.outputs.items()} == \
        {t: all_sums(type(want)(outputs={t: b})) for t, b in want.outputs.items()}
