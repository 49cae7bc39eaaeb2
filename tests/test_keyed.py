"""Keyed state: per-key seq order, duplicates, gaps, checkpoints."""
from __future__ import annotations

import pytest

from pipeline.runtime.keyed import Checkpoint, Sequencer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ready_seqs(offer):
    return [item for item in offer.ready]


def test_in_order_records_are_ready_at_once_and_duplicates_dropped():
    seq = Sequencer(gap_max_count=10, gap_max_ms=1000)
    assert ready_seqs(seq.offer("A", 1, "a1")) == ["a1"]
    assert ready_seqs(seq.offer("A", 2, "a2")) == ["a2"]
    assert seq.offer("A", 2, "again").duplicate and seq.offer("A", 1, "again").duplicate
    assert ready_seqs(seq.offer("B", 1, "b1")) == ["b1"]  # keys are independent
    assert seq.state() == {"applied": {"A": 2, "B": 1}, "gaps": 0, "parked": {}}


def test_a_swap_is_reordered_and_a_copy_of_a_parked_record_is_a_duplicate():
    seq = Sequencer(gap_max_count=10, gap_max_ms=1000)
    seq.offer("A", 1, "a1")
    assert seq.offer("A", 3, "a3").parked
    assert seq.offer("A", 3, "a3 again").duplicate  # the parked one is in the checkpoint already
    assert seq.parked_count() == 1
    assert ready_seqs(seq.offer("A", 2, "a2")) == ["a2", "a3"]
    assert seq.parked_count() == 0 and seq.gaps == 0


def test_a_gap_is_given_up_after_its_time_or_its_count():
    clock = Clock()
    seq = Sequencer(gap_max_count=3, gap_max_ms=500, clock=clock)
    seq.offer("A", 1, "a1")
    seq.offer("A", 3, "a3")
    clock.now = 0.4
    assert seq.expire() == []
    clock.now = 0.5
    assert seq.expire() == ["a3"] and seq.gaps == 1  # seq 2 never came
    seq.offer("A", 5, "a5")
    seq.offer("A", 6, "a6")
    assert ready_seqs(seq.offer("A", 7, "a7")) == ["a5", "a6", "a7"]  # 3 held: the gap (4) is given up
    assert seq.gaps == 2 and seq.applied["A"] == 7


def test_seq_far_behind_is_refused_not_taken_for_a_duplicate():
    seq = Sequencer(gap_max_count=3, gap_max_ms=1000)
    for n in range(1, 11):
        seq.offer("A", n, n)
    assert seq.offer("A", 8, "x").duplicate
    refused = seq.offer("A", 2, "x").refused
    assert "seq 2 of 'A' is 8 behind the last applied seq 10" in refused


def test_checkpoint_round_trip_and_restore(tmp_path):
    seq = Sequencer(gap_max_count=3, gap_max_ms=1000)
    seq.offer("A", 1, 1)
    seq.offer("A", 2, 2)
    seq.offer("A", 4, "a4")  # parked: part of the checkpoint
    checkpoint = Checkpoint(tmp_path / "state" / "s-0.ckpt")
    assert checkpoint.load() is None
    checkpoint.save(seq.state(), b"handler-bytes")
    state, handler = checkpoint.load()
    assert handler == b"handler-bytes"
    restored = Sequencer(gap_max_count=3, gap_max_ms=1000)
    restored.restore(state)
    assert restored.offer("A", 2, 2).duplicate and restored.offer("A", 4, "again").duplicate
    assert restored.offer("A", 3, 3).ready == [3, "a4"]


def test_parked_items_are_packed_once_for_every_checkpoint():
    packed = []
    seq = Sequencer(gap_max_count=10, gap_max_ms=1000, pack_item=lambda item: packed.append(item) or item.upper(),
                    unpack_item=str.lower)
    seq.offer("A", 3, "a3")
    seq.state()
    assert seq.state()["parked"] == {"A": [[3, "A3"]]} and packed == ["a3"]
    restored = Sequencer(gap_max_count=10, gap_max_ms=1000, unpack_item=str.lower)
    restored.restore(seq.state())
    assert restored.offer("A", 1, "a1").ready == ["a1"] and restored.offer("A", 2, "a2").ready == ["a2", "a3"]


def test_a_checkpoint_of_another_version_is_an_error(tmp_path):
    import msgpack
    path = tmp_path / "x.ckpt"
    path.write_bytes(msgpack.packb({"version": 99}))  # the single-file format of earlier versions
    with pytest.raises(ValueError, match="checkpoint version 99"):
        Checkpoint(path).load()
    path.unlink()
    checkpoint = Checkpoint(path)
    checkpoint.save({"applied": {}}, None)
    checkpoint.slots[1].write_bytes(checkpoint.slots[1].read_bytes().replace(b"\x00\x00\x00\x02", b"\x00\x00\x00\x09", 1))
    with pytest.raises(ValueError, match="checkpoint version 9 is not 2"):
        Checkpoint(path).load()


def test_checkpoints_alternate_between_two_slots_and_a_torn_one_falls_back_to_the_other(tmp_path):
    path = tmp_path / "state" / "s-0.ckpt"
    checkpoint = Checkpoint(path)
    for n in range(1, 6):
        checkpoint.save({"applied": {"A": n}}, b"h%d" % n)
    assert Checkpoint(path).load() == ({"applied": {"A": 5}}, b"h5")
    newest = checkpoint.slots[1]  # saves 1, 3, 5 went to slot 1
    torn = newest.read_bytes()[:-3]  # a crash while the 5th was written
    newest.write_bytes(torn)
    again = Checkpoint(path)
    assert again.load() == ({"applied": {"A": 4}}, b"h4")  # the one before: its inputs came again
    again.save({"applied": {"A": 5}}, b"h5 again")  # into the torn slot, never over the good one
    assert Checkpoint(path).load() == ({"applied": {"A": 5}}, b"h5 again")
    assert checkpoint.slots[0].read_bytes()[:4] == b"NPCK" and Checkpoint(path).slots[0].exists()


def test_a_checkpoint_of_the_single_file_format_is_read_then_replaced_by_the_slots(tmp_path):
    import msgpack
    path = tmp_path / "s-0.ckpt"
    path.write_bytes(msgpack.packb({"version": 1, "sequencer": {"applied": {"A": 7}}, "handler": b"old"}))
    checkpoint = Checkpoint(path)
    assert checkpoint.load() == ({"applied": {"A": 7}}, b"old")
    checkpoint.save({"applied": {"A": 8}}, b"new")
    assert not path.exists() and Checkpoint(path).load() == ({"applied": {"A": 8}}, b"new")


def test_a_gap_restarts_its_wait_when_records_below_it_are_released():
    clock = Clock()
    seq = Sequencer(gap_max_count=100, gap_max_ms=500, clock=clock)
    seq.offer("A", 2, "a2")
    seq.offer("A", 4, "a4")
    clock.now = 0.4
    assert seq.offer("A", 1, "a1").ready == ["a1", "a2"]  # 3 is still missing: a new gap, waited from now
    clock.now = 0.8
    assert not seq.expiry_due() and seq.expire() == []
    clock.now = 0.9
    assert seq.expiry_due() and seq.expire() == ["a4"] and seq.gaps == 1
