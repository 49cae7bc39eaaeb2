"""Crash quarantine's parts: the black box, the crash journal, and the processors' decisions.

The black box is read back after real process deaths (``os._exit`` and a
segfault in a child process); the journal and the processors are driven
directly. The whole path under supervisord is in test_crash_quarantine.py.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from stages_for_tests import RunningSum

from pipeline.config import load_topology
from pipeline.middleware import MiddlewareStack
from pipeline.records.codecs import decode, encode_json
from pipeline.runtime.blackbox import BlackBox, Death, exit_in_log, supervisor_exit
from pipeline.runtime.keyed import Sequencer
from pipeline.runtime.keyed_processing import KeyedEntry, KeyedProcessor
from pipeline.runtime.processing import BatchProcessor, ProcessingContext
from pipeline.runtime.quarantine import MAX_AGE, Crash, CrashJournal, Quarantine, prune, read_journal
from pipeline.stage import StageContext

ROOT = Path(__file__).resolve().parent.parent


def _die_holding(folder: Path, ids: list[bytes], how: str) -> int:
    """Run a process that opens replica 0's box, holds ``ids`` and dies ``how``; return its pid."""
    script = textwrap.dedent(f"""
        import ctypes, os, types
        from pathlib import Path
        from pipeline.runtime.blackbox import BlackBox
        box, _ = BlackBox.open(Path({str(folder)!r}), "s", 0)
        box.catch_fatal_signals()
        box.hold([types.SimpleNamespace(id=i) for i in {ids!r}])
        if {how!r} == "segv":
            ctypes.string_at(0)
        os._exit(1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (-11 if how == "segv" else 1), stderr
    return proc.pid


IDS = [b"0a1b2c3d4e5f6071", b"0a1b2c3d4e5f6072", b"0a1b2c3d4e5f6073"]


def test_a_box_read_after_os_exit_holds_the_ids_and_pid(tmp_path):
    pid = _die_holding(tmp_path, IDS, "exit")
    box, death = BlackBox.open(tmp_path, "s", 0)
    assert death is not None and death.ids == tuple(IDS) and death.pid == pid
    assert death.fault == "" and death.cause is None  # an exit status is supervisord's to tell
    box.close()
    # A clean close leaves nothing for the next process.
    box, death = BlackBox.open(tmp_path, "s", 0)
    assert death is None
    box.close()


def test_a_segfault_is_named_from_faulthandler_and_its_traceback_kept(tmp_path):
    _die_holding(tmp_path, IDS[:1], "segv")
    box, death = BlackBox.open(tmp_path, "s", 0)
    assert death is not None and death.ids == (IDS[0],)
    assert death.cause == "SIGSEGV" and "Segmentation fault" in death.fault
    box.close()


def test_a_box_held_by_a_live_process_is_not_shared(tmp_path, caplog):
    first, _ = BlackBox.open(tmp_path, "s", 0)
    with caplog.at_level(logging.WARNING):
        second, death = BlackBox.open(tmp_path, "s", 0)
    assert second is None and death is None and "another live process" in caplog.text
    first.close()


def test_the_box_grows_for_a_large_call_and_is_cleared_after_it(tmp_path):
    box, _ = BlackBox.open(tmp_path, "s", 0)
    many = [type("M", (), {"id": b"%016x" % i})() for i in range(2000)]
    box.hold(many)
    data = (tmp_path / "s-0.box").read_bytes()
    assert int.from_bytes(data[16:20], "little") == 2000 and data[32 + 16 * 1999:32 + 16 * 2000] == b"%016x" % 1999
    box.clear()
    assert int.from_bytes((tmp_path / "s-0.box").read_bytes()[16:20], "little") == 0
    box.close()


@pytest.mark.parametrize("garbage", [b"not a black box at all, just text", b"NPB1" + b"\xff" * 40])
def test_a_torn_or_garbage_box_reads_as_empty_with_a_warning(tmp_path, caplog, garbage):
    (tmp_path / "s-0.box").write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        box, death = BlackBox.open(tmp_path, "s", 0)
    assert death is None and "read as empty" in caplog.text
    box.hold([type("M", (), {"id": IDS[0]})()])  # and it works as a box from then on
    box.close()


def test_the_journal_counts_each_death_once_and_keeps_the_last_cause(tmp_path):
    journal = CrashJournal(tmp_path / "s.journal.json")
    journal.record(Death(10, "aaaa", (IDS[0], IDS[1])), "exit status 1", now=1000.0)
    journal.record(Death(10, "aaaa", (IDS[0], IDS[1])), "exit status 1", now=1001.0)  # read twice: once
    journal.record(Death(11, "bbbb", (IDS[0],)), "SIGSEGV", now=1002.0)
    entries = CrashJournal(tmp_path / "s.journal.json").refresh()  # as another replica reads it
    assert (entries[IDS[0]].deaths, entries[IDS[0]].alone, entries[IDS[0]].cause) == (2, 1, "SIGSEGV")
    assert (entries[IDS[1]].deaths, entries[IDS[1]].alone, entries[IDS[1]].cause) == (1, 0, "exit status 1")
    assert entries[IDS[0]].reason() == "worker died 2 times while processing it (last: SIGSEGV)"
    assert Crash(1, None, 0.0).reason() == "worker died once while processing it"


def test_the_journal_is_read_again_only_when_the_file_changed(tmp_path):
    path = tmp_path / "s.journal.json"
    reader = CrashJournal(path)
    assert reader.refresh() == {}
    CrashJournal(path).record(Death(1, "aaaa", (IDS[0],)), None, now=1000.0)
    first = reader.refresh()
    assert list(first) == [IDS[0]] and reader.refresh() is first  # unchanged: the same dict, no read
    CrashJournal(path).record(Death(2, "bbbb", (IDS[1],)), None, now=1000.0)
    assert set(reader.refresh()) == {IDS[0], IDS[1]}


def test_old_entries_are_pruned_and_the_newest_kept(tmp_path):
    entries = {b"%016d" % i: Crash(1, None, float(i)) for i in range(10)}
    assert list(prune(entries, now=9.0, max_entries=3)) == [b"%016d" % i for i in (7, 8, 9)]
    assert list(prune(entries, now=5.0 + MAX_AGE)) == [b"%016d" % i for i in (5, 6, 7, 8, 9)]
    journal = CrashJournal(tmp_path / "s.journal.json")
    journal.record(Death(1, "aaaa", (IDS[0],)), None, now=1000.0)
    journal.record(Death(2, "bbbb", (IDS[1],)), None, now=1000.0 + MAX_AGE + 1)
    assert list(read_journal(tmp_path / "s.journal.json")) == [IDS[1]]


@pytest.mark.parametrize("garbage", [b'{"version": 1, "messages": {"x": {"dea', b"\x00\x01garbage",
                                     b'{"version": 99, "messages": {}}', b'[1, 2]'])
def test_a_torn_or_garbage_journal_reads_as_empty_with_a_warning(tmp_path, caplog, garbage):
    path = tmp_path / "s.journal.json"
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        assert CrashJournal(path).refresh() == {}
    assert "not a crash journal" in caplog.text
    CrashJournal(path).record(Death(1, "aaaa", (IDS[0],)), None)  # and the next death starts it afresh
    assert list(read_journal(path)) == [IDS[0]]


LOG = """\
2026-01-01 10:00:00,000 INFO spawned: 'primes-0' with pid 100
2026-01-01 10:00:01,000 INFO spawned: 'primes-1' with pid 101
2026-01-01 10:00:05,000 WARN exited: primes-1 (exit status 1; not expected)
2026-01-01 10:00:05,000 WARN exited: primes-0 (terminated by SIGSEGV (core dumped); not expected)
2026-01-01 10:00:05,100 INFO spawned: 'primes-0' with pid 102
2026-01-01 10:00:09,000 WARN stopped: primes-0 (terminated by SIGKILL)
"""


def test_the_exit_is_read_from_supervisords_log():
    assert exit_in_log(LOG, "primes-0", 100) == "SIGSEGV"
    assert exit_in_log(LOG, "primes-1", 101) == "exit status 1"
    assert exit_in_log(LOG, "primes-0", 102) == "SIGKILL"
    assert exit_in_log(LOG, "primes-0", 999) is None
    assert supervisor_exit(100, environ={}) is None  # not under supervisord: unknown, not an error


# -- the processors' decisions ----------------------------------------------------------------------

class Msg:
    def __init__(self, n: int, attempts: int = 1, **extra):
        self.id, self.attempts = b"%016d" % n, attempts
        self.body = encode_json({"id": f"r-{n}", "number": n, **extra})


def _quarantine(tmp_path: Path, deaths: dict[bytes, int], batch_deaths: dict[bytes, int] | None = None) -> Quarantine:
    """A quarantine whose journal holds ``deaths`` per id, each alone, and ``batch_deaths`` in a batch of two."""
    folder = tmp_path / "crash"
    journal = CrashJournal(folder / "s.journal.json")
    for message_id, count in deaths.items():
        for i in range(count):
            journal.record(Death(1, f"{message_id!r}-{i}", (message_id,)), "SIGSEGV")
    for message_id, count in (batch_deaths or {}).items():
        for i in range(count):
            journal.record(Death(1, f"{message_id!r}-batch-{i}", (message_id, b"f" * 16)), "SIGSEGV")
    quarantine = Quarantine(folder, "s", 0, crash_tries=2)
    quarantine.open()
    return quarantine


def _plain(tmp_path: Path, handler, quarantine: Quarantine) -> BatchProcessor:
    path = tmp_path / "topology.yaml"
    path.write_text("nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
                    "topics: {ins: {}, outs: {}}\n"
                    "stages: {s: {handler: 'consumers.primes:classify', input: ins, channel: c, outputs: [outs]}}\n")
    topology = load_topology(path)
    context = ProcessingContext("s", topology.stage("s"), topology, handler, MiddlewareStack(),
                                quarantine=quarantine)
    return BatchProcessor(context)


def _box_ids(tmp_path: Path) -> list[bytes]:
    data = (tmp_path / "crash" / "s-0.box").read_bytes()
    count = int.from_bytes(data[16:20], "little")
    return [data[32 + 16 * i:48 + 16 * i] for i in range(count)]


def test_a_spent_message_is_dead_lettered_unrun_and_a_crashed_one_runs_alone(tmp_path):
    calls: list[tuple[list[int], list[bytes]]] = []

    def handler(batch):
        calls.append(([r["number"] for r in batch.records], _box_ids(tmp_path)))
        return {"outs": list(batch.records)}

    quarantine = _quarantine(tmp_path, {b"%016d" % 2: 2, b"%016d" % 3: 1})
    p = _plain(tmp_path, handler, quarantine)
    batch = [Msg(1, attempts=2), Msg(2, attempts=3), Msg(3, attempts=2), Msg(4)]
    outcome = p.process(batch)
    # 2 died twice: dead-lettered with its raw body and never run; 3 died once: it runs alone.
    assert [d.message for d in outcome.dead] == [batch[1]] and outcome.dead[0].body == batch[1].body
    assert outcome.dead[0].reason == "worker died 2 times while processing it (last: SIGSEGV)"
    assert calls == [([1, 4], [b"%016d" % 1, b"%016d" % 4]), ([3], [b"%016d" % 3])]
    assert sorted(m.id for m in outcome.finish) == sorted(m.id for m in batch)
    assert _box_ids(tmp_path) == []  # cleared after each call
    # The same ids on a first delivery are not suspects (the journal is consulted for redeliveries only).
    calls.clear()
    p.process([Msg(2), Msg(5)])
    assert calls == [([2, 5], [b"%016d" % 2, b"%016d" % 5])]
    quarantine.close()


def test_deaths_in_batches_alone_never_dead_letter_a_message(tmp_path):
    # Given a message that died twice, each time in a batch (a batch-mate may have been the poison: its
    # redelivery reached a replica before the journal had it), and one that died once in a batch, once alone
    calls: list[list[int]] = []

    def handler(batch):
        calls.append([r["number"] for r in batch.records])
        return {"outs": list(batch.records)}

    quarantine = _quarantine(tmp_path, {b"%016d" % 2: 1}, {b"%016d" % 1: 2, b"%016d" % 2: 1})
    outcome = _plain(tmp_path, handler, quarantine).process([Msg(1, attempts=3), Msg(2, attempts=3)])
    # Then the first runs alone again, and only the second is dead-lettered
    assert calls == [[1]] and [d.message.id for d in outcome.dead] == [b"%016d" % 2]
    quarantine.close()


def test_a_box_is_cleared_when_the_handler_raises(tmp_path):
    def handler(batch):
        raise ValueError("no")

    quarantine = _quarantine(tmp_path, {})
    p = _plain(tmp_path, handler, quarantine)
    outcome = p.process([Msg(1), Msg(2)])
    assert len(outcome.retry) == 2 and _box_ids(tmp_path) == []
    quarantine.close()


def test_keyed_records_of_crashed_messages_run_alone_in_order_or_are_dead_lettered(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text("nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
                    "topics: {ins: {key: key}, sums: {}}\n"
                    "stages: {s: {handler: 'stages_for_tests:RunningSum', input: ins, channel: c, keyed: true,"
                    " outputs: [sums]}}\n")
    topology = load_topology(path)
    calls: list[list[int]] = []

    class Counting(RunningSum):
        def __call__(self, batch):
            calls.append([r["seq"] for r in batch.records])
            return super().__call__(batch)

    quarantine = _quarantine(tmp_path, {b"%016d" % 2: 1, b"%016d" % 3: 2})
    sequencer = Sequencer(100, 60_000, pack_item=KeyedEntry.pack, unpack_item=KeyedEntry.unpack)
    context = ProcessingContext("s", topology.stage("s"), topology, Counting(StageContext("s", 0, tmp_path)),
                                MiddlewareStack(), quarantine=quarantine)
    p = KeyedProcessor(context, key_field="key", seq_field="seq", sequencer=sequencer)

    def tick(n, seq, v, attempts=2):
        m = Msg(n, attempts)
        m.body = encode_json({"id": f"A-{seq}", "key": "A", "seq": seq, "v": v})
        return m

    batch = [tick(1, 1, 10), tick(2, 2, 20), tick(3, 3, 30), tick(4, 4, 40)]
    outcome = p.process(batch)
    assert calls == [[1], [2], [4]]  # 2 alone, in its place; 3 never runs
    assert [decode(b)["sum"] for b in outcome.outputs["sums"]] == [10, 30, 70]
    assert [(d.message.id, d.reason) for d in outcome.dead] == [
        (b"%016d" % 3, "worker died 2 times while processing it (last: SIGSEGV)")]
    assert orjson.loads(outcome.dead[0].body)["seq"] == 3
    assert outcome.finish == batch
    quarantine.close()


def test_a_folder_it_cannot_write_leaves_the_replica_running_unguarded(tmp_path, caplog):
    (tmp_path / "crash").write_text("a file where the folder should be")
    quarantine = Quarantine(tmp_path / "crash", "s", 0, crash_tries=2)
    with caplog.at_level(logging.ERROR):
        quarantine.open()
    assert "no crash quarantine" in caplog.text and quarantine.crashed([Msg(1, attempts=2)]) == {}
    quarantine.box.hold([Msg(1)])  # a box that keeps nothing
    quarantine.close()


def test_a_worker_reads_its_predecessors_box_into_the_journal(tmp_path, monkeypatch):
    folder = tmp_path / "crash"
    _die_holding(folder, IDS[:2], "segv")
    quarantine = Quarantine(folder, "s", 0, crash_tries=2)
    quarantine.open()
    assert {k: (c.deaths, c.cause) for k, c in quarantine.known.items()} == {
        IDS[0]: (1, "SIGSEGV"), IDS[1]: (1, "SIGSEGV")}
    quarantine.close()
    monkeypatch.delenv("SUPERVISOR_SERVER_URL", raising=False)
    _die_holding(folder, IDS[:1], "exit")
    quarantine.open()  # exit status unknown outside supervisord: the cause stays the last known one's
    assert (quarantine.known[IDS[0]].deaths, quarantine.known[IDS[0]].cause) == (2, None)
    assert quarantine.known[IDS[0]].reason() == "worker died 2 times while processing it"
    quarantine.close()
    assert os.path.exists(folder / "s-0.fault")
