"""BatchProcessor's decisions: what is published, finished, retried and dead-lettered.

The messages are stand-ins for pynsq's: this is about the decisions, not NSQ
(the worker tests run the same logic on real nsqd).
"""
from __future__ import annotations

from pathlib import Path

from consumers.primes import classify
from pipeline.records.codecs import decode, encode_json
from pipeline.records.envelope import pack, records_of
from pipeline.middleware import Middleware, MiddlewareStack
from pipeline.runtime.processing import BatchProcessor, ProcessingContext
from pipeline.config import load_topology


class Msg:
    def __init__(self, body: bytes, attempts: int = 1, id: bytes = b"0123456789abcdef"):
        self.body, self.attempts, self.id = body, attempts, id


def processor(tmp_path: Path, handler=classify, in_pack=1, out_pack=1, max_tries=3) -> BatchProcessor:
    path = tmp_path / "topology.yaml"
    path.write_text(
        "nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]}\n"
        f"topics: {{numbers: {{pack: {in_pack}}}, prime: {{pack: {out_pack}}}, non_prime: {{}}}}\n"
        "stages:\n"
        f"  primes: {{handler: 'consumers.primes:classify', input: numbers, channel: c, max_tries: {max_tries},\n"
        "           outputs: [prime, non_prime]}\n")
    topology = load_topology(path)
    return BatchProcessor(ProcessingContext("primes", topology.stage("primes"), topology, handler, MiddlewareStack()))


def out_records(outcome, topic):
    return list(records_of(decode(b) for b in outcome.outputs.get(topic, [])))


def test_a_bad_record_inside_an_envelope_is_dead_lettered_alone(tmp_path):
    records = [{"id": f"r-{n}", "number": n} for n in range(1, 11)]
    records[4] = {"id": "r-bad", "number": "abc"}
    message = Msg(pack(records, 100)[0])

    outcome = processor(tmp_path).process([message])

    [dead] = outcome.dead
    assert dead.index == 4 and "'number'" in dead.reason and decode(dead.body) == {"id": "r-bad", "number": "abc"}
    good = out_records(outcome, "prime") + out_records(outcome, "non_prime")
    assert sorted(r["id"] for r in good) == sorted(r["id"] for r in records if r["id"] != "r-bad")
    assert outcome.finish == [message] and outcome.retry == []


def fail_on_7(batch):
    if any(r.get("number") == 7 for r in batch.records):
        raise ValueError("seven")
    return classify(batch)


def test_an_envelope_is_retried_whole_then_only_its_failing_record_is_dead(tmp_path):
    records = [{"id": f"r-{n}", "number": n} for n in range(1, 11)]
    other = Msg(encode_json({"id": "plain", "number": 11}), id=b"fedcba9876543210")
    env = pack(records, 100)[0]

    first = processor(tmp_path, fail_on_7).process([Msg(env, attempts=1), other])
    assert first.retry and first.retry[0].body == env and first.dead == []
    assert [r["id"] for r in out_records(first, "prime")] == ["plain"]  # the other message is not held back

    last = processor(tmp_path, fail_on_7).process([Msg(env, attempts=3)])
    [dead] = last.dead
    assert dead.index == 6 and "ValueError: seven" in dead.reason and "attempt 3 of max_tries 3" in dead.reason
    good = out_records(last, "prime") + out_records(last, "non_prime")
    assert sorted(r["number"] for r in good) == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert last.retry == [] and len(last.finish) == 1


def test_outputs_of_a_packed_topic_are_envelopes(tmp_path):
    messages = [Msg(encode_json({"id": f"r-{n}", "number": n})) for n in range(1, 101)]
    outcome = processor(tmp_path, out_pack=10).process(messages)
    assert len(outcome.outputs["prime"]) == 3  # 25 primes below 100, 10 per envelope
    assert len(out_records(outcome, "prime")) == 25
    assert len(outcome.outputs["non_prime"]) == 75  # not packed


def _records_only(batch):
    return classify(batch)  # the same function without its columnar path


def test_the_columnar_path_publishes_what_the_record_path_would(tmp_path):
    records = [{"id": f"r-{n}", "number": n, "tag": "x" * (n % 3)} for n in range(1, 2501)]
    messages = [Msg(body, id=b"%016d" % i) for i, body in enumerate(pack(records, 1000))]
    seen = []

    class Sizes(Middleware):
        def before_process_batch(self, worker, batch):
            seen.append(len(batch))

    columnar = processor(tmp_path, in_pack=1000, out_pack=1000)
    columnar.middleware.add(Sizes())
    calls = []
    columnar.handler = lambda batch: calls.append(batch) or classify(batch)  # counts record-path calls
    columnar.columns_handler = classify.columns
    fast = columnar.process(messages)
    slow = processor(tmp_path, _records_only, in_pack=1000, out_pack=1000).process(messages)

    assert calls == [] and seen == [2500]  # the records never became dicts
    assert fast.outputs == slow.outputs and fast.finish == messages and not fast.dead
    assert len(out_records(fast, "prime")) == sum(1 for n in range(1, 2501) if all(n % d for d in range(2, n))) - 1


def test_the_columnar_path_hands_a_batch_it_cannot_take_to_the_record_path(tmp_path):
    good = pack([{"id": f"r-{n}", "number": n} for n in range(1, 11)], 100)[0]
    other_keys = pack([{"id": "o-1", "number": 5, "extra": 1}], 100)[0]
    bad = pack([{"id": "b-1", "number": True}], 100)[0]  # a bool is not a number
    for second, dead in ((other_keys, 0), (bad, 1)):
        p = processor(tmp_path, in_pack=100, out_pack=100)
        outcome = p.process([Msg(good), Msg(second)])
        assert len(outcome.dead) == dead and len(outcome.finish) == 2
        assert len(out_records(outcome, "prime")) + len(out_records(outcome, "non_prime")) == 11 - dead
