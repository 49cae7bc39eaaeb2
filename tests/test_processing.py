"""BatchProcessor's decisions: what is published, finished, retried and dead-lettered.

The messages are stand-ins for pynsq's: this is about the decisions, not NSQ
(the worker tests run the same logic on real nsqd).
"""
from __future__ import annotations

from pathlib import Path

from consumers.primes import classify
from pipeline.codecs import decode, encode_json
from pipeline.envelope import pack, records_of
from pipeline.middleware import MiddlewareStack
from pipeline.processing import BatchProcessor
from pipeline.topology import load_topology


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
    return BatchProcessor(None, "primes", topology.stage("primes"), topology, handler, MiddlewareStack())


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
