"""A handler's result is checked, and its failures carry their tracebacks.

A handler that returns None (a forgotten ``return``), a list, an output the
stage does not declare, or something else for an output fails its batch
exactly as a raise does: retried, then dead-lettered with the reason; never
finished with nothing published. The processors here are the runtime's own,
with stand-in messages (the worker tests run the same on real nsqd).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from consumers.primes import classify
from pipeline.config import load_topology
from pipeline.errors import StageOutputError, StageStateError
from pipeline.middleware import Middleware, MiddlewareStack
from pipeline.records.codecs import decode, encode_json
from pipeline.records.deadletter import DeadLetter, raw_body
from pipeline.records.envelope import pack
from pipeline.runtime.keyed import Sequencer
from pipeline.runtime.keyed_processing import KeyedEntry, KeyedProcessor
from pipeline.runtime.processing import BatchProcessor, ProcessingContext
from pipeline.runtime.results import FailureLog, check_result, code_site, handler_frames
from pipeline.stage import Columns, StageContext
from stages_for_tests import AtomicColumnarRunningSum, ColumnarRunningSum, RunningSum
from test_processing import Msg, out_records

NONE_REASON = "handler returned None; return {} to emit nothing"


class Seen(Middleware):
    """Keeps what after_process_batch was told."""

    def __init__(self):
        self.after: list[tuple[object, object]] = []

    def after_process_batch(self, worker, batch, *, result, exception):
        self.after.append((result, exception))


def plain_stage(tmp_path: Path, handler, *, max_tries: int = 3, in_pack: int = 1):
    """A BatchProcessor for stage ``primes`` (outputs prime, non_prime), and the errors it reported."""
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        f"topics: {{numbers: {{pack: {in_pack}}}, prime: {{pack: {in_pack}}}, non_prime: {{}}}}\n"
        "stages:\n"
        f"  primes: {{handler: 'consumers.primes:classify', input: numbers, channel: c, max_tries: {max_tries},\n"
        "           outputs: [prime, non_prime]}\n")
    topology = load_topology(path)
    errors: list[tuple[int, BaseException]] = []
    seen = Seen()
    context = ProcessingContext("primes", topology.stage("primes"), topology, handler, MiddlewareStack([seen]),
                                on_error=lambda count, error: errors.append((count, error)))
    return BatchProcessor(context), errors, seen


def numbers(*ns: int, attempts: int = 1) -> list[Msg]:
    return [Msg(encode_json({"id": f"r-{n}", "number": n}), attempts=attempts, id=b"%016d" % n) for n in ns]


def forgets_return(batch):
    classify(batch)


# -- the record path of a plain stage ------------------------------------------------------------------


def test_a_handler_returning_none_is_retried_then_dead_lettered_never_finished_empty(tmp_path):
    p, errors, seen = plain_stage(tmp_path, forgets_return)
    early = numbers(*range(1, 51))

    first = p.process(early)

    # Like a raise: the batch is rerun record by record, and each record is retried with backoff.
    assert first.retry == early and first.finish == [] and first.outputs == {} and first.dead == []
    assert len(errors) == 1 + 50 and all(isinstance(e, StageOutputError) and e.kind == "none" for _, e in errors)
    assert errors[0][0] == 50 and seen.after[0] == (None, errors[0][1])

    last = p.process(numbers(*range(1, 51), attempts=3))

    assert len(last.dead) == 50 and last.retry == [] and last.outputs == {}
    assert {d.reason for d in last.dead} == {NONE_REASON + " (attempt 3 of max_tries 3)"}
    assert sorted(decode(d.body)["id"] for d in last.dead) == sorted(f"r-{n}" for n in range(1, 51))
    assert all(d.traceback is None for d in last.dead)  # nothing was raised


@pytest.mark.parametrize(("result", "kind", "reason"), [
    ([{"id": "x"}], "not_mapping", "handler returned list, not a mapping of outputs"),
    ("prime", "not_mapping", "handler returned str, not a mapping of outputs"),
    ({"prime": [], "primes": [{"id": "x"}]}, "undeclared_output",
     "handler emitted to 'primes', which is not an output of stage primes (outputs: prime, non_prime)"),
    ({"prime": ({"id": "x"},)}, "bad_value", "handler emitted tuple to 'prime', not a list of records or Columns"),
    ({"prime": None}, "bad_value", "handler emitted NoneType to 'prime', not a list of records or Columns"),
])
def test_a_result_that_is_not_a_mapping_of_outputs_fails_like_a_raise(tmp_path, result, kind, reason):
    p, errors, _ = plain_stage(tmp_path, lambda batch: result)
    messages = numbers(7, 8)

    outcome = p.process(numbers(7, 8, attempts=3))
    retried = p.process(messages)

    assert [d.reason for d in outcome.dead] == [reason + " (attempt 3 of max_tries 3)"] * 2
    assert outcome.outputs == {} and len(outcome.finish) == 2
    assert retried.retry == messages and retried.finish == [] and retried.dead == []
    assert {(e.kind, e.columnar) for _, e in errors} == {(kind, False)}


def test_an_empty_mapping_emits_nothing_and_finishes_the_batch(tmp_path):
    p, errors, _ = plain_stage(tmp_path, lambda batch: {})
    messages = numbers(1, 2, 3)
    outcome = p.process(messages)
    assert outcome.finish == messages and outcome.outputs == {} and outcome.dead == outcome.retry == [] == errors


def test_columns_are_a_valid_output_of_the_record_path(tmp_path):
    p, errors, _ = plain_stage(tmp_path, lambda batch: {"prime": Columns({"id": [r["id"] for r in batch],
                                                                          "n": [r["number"] for r in batch]})})
    outcome = p.process(numbers(2, 3))
    assert [decode(b) for b in outcome.outputs["prime"]] == [{"id": "r-2", "n": 2}, {"id": "r-3", "n": 3}]
    assert errors == [] and outcome.dead == []


def test_the_check_looks_at_the_outputs_not_at_their_records():
    class Untouchable(list):
        def __iter__(self):
            raise AssertionError("the check must not walk the records")

        def __len__(self):
            raise AssertionError("the check must not walk the records")

    check_result({"a": Untouchable([{"id": 1}]), "b": []}, {"a": 0, "b": 0}, "s")


def test_an_envelope_of_a_handler_returning_none_dead_letters_each_record(tmp_path):
    p, _, _ = plain_stage(tmp_path, forgets_return, in_pack=100)
    envelope = Msg(pack([{"id": f"r-{n}", "number": n} for n in range(1, 6)], 100)[0], attempts=3)
    outcome = p.process([envelope])
    assert [d.index for d in outcome.dead] == [0, 1, 2, 3, 4] and outcome.finish == [envelope]
    assert {d.reason for d in outcome.dead} == {NONE_REASON + " (attempt 3 of max_tries 3)"}


# -- tracebacks in dead letters --------------------------------------------------------------------------


def _deep(n: int):
    if n == 0:
        raise ValueError("seven")
    return _deep(n - 1)


def _one():
    _two()


def _two():
    _three()


def _three():
    _four()


def _four():
    _deep(0)


def fails_on_7_deep_down(batch):
    if any(r["number"] == 7 for r in batch):
        _one()
    return classify(batch)


def test_a_dead_letter_of_a_raise_carries_the_handlers_last_frames(tmp_path):
    p, errors, _ = plain_stage(tmp_path, fails_on_7_deep_down)
    outcome = p.process(numbers(6, 7, 8, attempts=3))

    [dead] = outcome.dead
    assert dead.reason == "handler raised ValueError: seven (attempt 3 of max_tries 3)"
    trace = dead.traceback
    assert trace.startswith("Traceback (most recent call last):") and trace.endswith("ValueError: seven")
    assert trace.count(f'File "{__file__}", line') == 5
    assert [f"in {name}" in trace for name in ("fails_on_7_deep_down", "_one", "_two", "_three", "_four", "_deep")] \
        == [False, True, True, True, True, True]  # the innermost five
    assert "processing.py" not in trace
    letter = decode(p.dead_letter(dead))
    assert letter["traceback"] == trace and raw_body(p.dead_letter(dead)) == dead.body


def test_a_shallow_handlers_traceback_starts_at_the_handler(tmp_path):
    p, _, _ = plain_stage(tmp_path, lambda batch: 1 / 0)
    [dead] = p.process(numbers(5, attempts=3)).dead
    assert dead.traceback.count("File ") == 1 and "in <lambda>" in dead.traceback
    assert dead.traceback.endswith("ZeroDivisionError: division by zero")


def test_a_traceback_is_bounded_and_keeps_the_innermost_frames():
    try:
        _one()
    except ValueError as e:
        e.args = ("x" * 10_000,)
        text = handler_frames(e, frames=3, limit=600)
    assert len(text) <= 600 and text.count("File ") == 3 and "in _deep" in text and "x" * 100 in text
    assert text.endswith("...")


def test_dead_letters_without_a_traceback_read_as_before():
    old = DeadLetter("r", "s", "t", "c", 1, "m", b'{"n": 1}')
    assert "traceback" not in decode(old.encode()) and raw_body(old.encode()) == b'{"n": 1}'
    huge = DeadLetter("r", "s", "t", "c", 1, "m", b"x" * 2_000_000, traceback="Traceback ...")
    encoded = huge.encode(limit=100_000)
    assert len(encoded) <= 100_000 and decode(encoded)["traceback"] == "Traceback ..."


# -- the columnar path ------------------------------------------------------------------------------------


def _columnar_handler(columns_result):
    def handler(batch):
        return classify(batch)
    handler.columns = lambda columns: columns_result  # type: ignore[attr-defined]
    return handler


@pytest.mark.parametrize(("result", "kind"), [([1, 2], "not_mapping"), ({"nope": Columns({"id": []})},
                                                                         "undeclared_output")])
def test_a_bad_columnar_result_hands_the_batch_to_the_record_path_and_is_reported(tmp_path, result, kind):
    p, errors, seen = plain_stage(tmp_path, _columnar_handler(result), in_pack=100)
    messages = [Msg(pack([{"id": f"r-{n}", "number": n} for n in range(1, 11)], 100)[0])]

    outcome = p.process(messages)

    assert len(out_records(outcome, "prime")) == 4 and outcome.finish == messages and outcome.dead == []
    [(count, error)] = errors
    assert count == 10 and error.kind == kind and error.columnar and not p.columns_declined
    assert seen.after[0] == (None, error)


def test_a_columnar_function_that_raises_is_reported(tmp_path):
    def broken(columns):
        raise KeyError("number")
    handler = _columnar_handler(None)
    handler.columns = broken  # type: ignore[attr-defined]
    p, errors, _ = plain_stage(tmp_path, handler, in_pack=100)
    outcome = p.process([Msg(pack([{"id": "r-2", "number": 2}], 100)[0])])
    assert len(out_records(outcome, "prime")) == 1 and [type(e) for _, e in errors] == [KeyError]


def test_a_columnar_none_still_declines_silently(tmp_path):
    p, errors, _ = plain_stage(tmp_path, _columnar_handler(None), in_pack=100)
    outcome = p.process([Msg(pack([{"id": "r-2", "number": 2}], 100)[0])])
    assert len(out_records(outcome, "prime")) == 1 and errors == [] and p.columns_declined


# -- keyed stages ---------------------------------------------------------------------------------------------


class ForgetfulSum(RunningSum):
    """RunningSum that changes its state and then forgets to return its outputs."""

    def __call__(self, batch):
        super().__call__(batch)


class ListingColumnarSum(ColumnarRunningSum):
    def columns(self, cols):
        super().columns(cols)
        return [cols]


class ListingAtomicSum(AtomicColumnarRunningSum):
    def columns(self, cols):
        super().columns(cols)
        return [cols]


def keyed_stage(tmp_path: Path, stage_class, pack_size: int = 1):
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        f"topics: {{ins: {{key: key, pack: {pack_size}}}, sums: {{}}}}\n"
        "stages:\n"
        "  s: {handler: 'stages_for_tests:RunningSum', input: ins, channel: c, keyed: true, outputs: [sums]}\n")
    topology = load_topology(path)
    sequencer = Sequencer(100, 60_000, pack_item=KeyedEntry.pack, unpack_item=KeyedEntry.unpack)
    errors: list[BaseException] = []
    context = ProcessingContext("s", topology.stage("s"), topology, stage_class(StageContext("s", 0, tmp_path)),
                                MiddlewareStack(), on_error=lambda count, error: errors.append(error))
    return KeyedProcessor(context, key_field="key", seq_field="seq", sequencer=sequencer), errors


def ticks(*seqs: int) -> list[dict]:
    return [{"id": f"A-{s}", "key": "A", "seq": s, "v": s} for s in seqs]


def test_a_keyed_handler_returning_none_dead_letters_each_record_and_keeps_the_state(tmp_path):
    p, errors = keyed_stage(tmp_path, ForgetfulSum)
    messages = [Msg(encode_json(r)) for r in ticks(1, 2, 3)]

    outcome = p.process(messages)

    assert [d.reason for d in outcome.dead] == [NONE_REASON + " (keyed stages do not retry)"] * 3
    assert outcome.finish == messages and outcome.outputs == {}
    assert p.handler.sums == {} and len(errors) == 4  # the state was put back after every call


def test_a_bad_keyed_columnar_result_is_put_back_and_the_record_path_takes_the_batch(tmp_path):
    p, errors = keyed_stage(tmp_path, ListingColumnarSum, pack_size=100)
    outcome = p.process([Msg(pack(ticks(1, 2, 3), 100)[0])])
    assert [(r["seq"], r["sum"]) for r in map(decode, outcome.outputs["sums"])] == [(1, 1), (2, 3), (3, 6)]
    assert p.columns_path == 0 and p.handler.sums == {"A": 6} and [e.kind for e in errors] == ["not_mapping"]


def test_a_bad_atomic_keyed_columnar_result_rewinds_like_a_raise(tmp_path):
    p, _ = keyed_stage(tmp_path, ListingAtomicSum, pack_size=100)
    with pytest.raises(StageStateError):
        p.process([Msg(pack(ticks(1, 2), 100)[0])])


# -- what the worker logs -------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _line_of(fn) -> int:
    return fn.__code__.co_firstlineno


def test_a_bad_result_is_logged_once_per_kind_at_error_naming_the_handler(caplog):
    failures = FailureLog("primes", forgets_return)
    with caplog.at_level(logging.INFO, logger="pipeline.runtime.results"):
        for _ in range(3):
            failures.report(50, StageOutputError(NONE_REASON, "none"))
        failures.report(1, StageOutputError("handler returned list, not a mapping of outputs", "not_mapping"))
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR"]
    first = caplog.records[0].getMessage()
    assert f"tests/test_results.py:{_line_of(forgets_return)}" in first and NONE_REASON in first
    assert "50 records" in first


def test_a_stage_objects_site_is_its_call_method_and_its_columnar_functions_own():
    stage = ColumnarRunningSum(None)
    assert code_site(stage).endswith(f"stages_for_tests.py:{_line_of(RunningSum.__call__)}")
    assert code_site(stage.columns).endswith(f"stages_for_tests.py:{_line_of(ColumnarRunningSum.columns)}")


def test_a_bad_columnar_result_names_the_columnar_function(caplog):
    stage = ColumnarRunningSum(None)
    with caplog.at_level(logging.ERROR, logger="pipeline.runtime.results"):
        FailureLog("s", stage).report(4, StageOutputError("handler returned list, not a mapping of outputs",
                                                          "not_mapping", columnar=True))
    [record] = caplog.records
    assert f"stages_for_tests.py:{_line_of(ColumnarRunningSum.columns)}" in record.getMessage()


def _raise_at_one_place():
    raise ValueError("seven")


def _raise_at_another_place():
    raise ValueError("seven")


def _caught(raiser) -> BaseException:
    try:
        raiser()
    except ValueError as e:
        return e
    raise AssertionError("did not raise")


def test_tracebacks_are_logged_at_most_once_per_interval_per_site(caplog):
    clock = Clock()
    failures = FailureLog("primes", forgets_return, every=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.results"):
        failures.report(10, _caught(_raise_at_one_place))
        for _ in range(3):
            clock.now += 1
            failures.report(1, _caught(_raise_at_one_place))
        failures.report(1, _caught(_raise_at_another_place))  # another site: its own traceback
        clock.now += 60
        failures.report(1, _caught(_raise_at_one_place))

    full = [r for r in caplog.records if r.exc_info]
    summaries = [r for r in caplog.records if not r.exc_info]
    assert len(full) == 3 and len(summaries) == 3
    assert [s.getMessage().split("(")[-1] for s in summaries] == [f"{n} times since its traceback {n} s ago)"
                                                                   for n in (1, 2, 3)]
    assert f"test_results.py:{_line_of(_raise_at_one_place) + 1}" in summaries[0].getMessage()
    assert "3 more there since its last traceback" in full[2].getMessage()
