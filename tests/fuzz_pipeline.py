"""``make fuzz``: generated bad messages mixed with good ones through a running primes pipeline.

Starts its own nsqd (free 127.0.0.1 ports, temporary data) and two primes
replicas, publishes COUNT bad messages and as many good ones, shuffled, and
checks that:

- no worker crashed (both still run, and exit 0 when stopped);
- every bad message is on ``<input>.dead`` (one dead letter per message,
  by nsqd message id) with a non-empty reason and its raw body;
- every good record came out on ``prime`` or ``non_prime``.

Run ``python tests/fuzz_pipeline.py --count 100000`` (what ``make fuzz``
does); the test suite runs it with a small count.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Workers, collect, write_topology  # noqa: E402
from pipeline.records import envelope  # noqa: E402
from pipeline.records.codecs import encode_json  # noqa: E402
from pipeline.client.nsqclient import NsqPublisher  # noqa: E402
from pipeline.config import MAX_MSG_SIZE  # noqa: E402
from pipeline.ops.processes import start_nsqd  # noqa: E402

HUGE_EVERY = 5000  # one body near nsqd's size limit per this many bad messages (and always one)


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([1100, 2000, 5000])  # past orjson's 1024 and Python's recursion limit
    return b'{"number": 123456789012345678901234, "a": ' + b"[" * depth + b"]" * depth + b"}"


def _wrong_type(rng: random.Random) -> bytes:
    value = rng.choice(["7", 7.5, True, None, [7], {"n": 7}, 2**63, -(2**63) - 1, 10**30, "", "x" * 1000])
    return json.dumps({"id": f"b-{rng.random()}", "number": value}).encode()


def _huge(rng: random.Random) -> bytes:
    # control bytes are invalid JSON and escape to 6 bytes each: the dead letter must still fit
    return b'{"number": "' + bytes([rng.randrange(1, 32)]) * (MAX_MSG_SIZE - 100) + b'"}'


BAD_KINDS = {
    "random bytes": lambda rng: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
    "truncated json": lambda rng: b'{"id": "t", "number": ' + str(rng.randrange(10**6)).encode(),
    "json not an object": lambda rng: rng.choice([b"[1, 2]", b'"number"', b"42", b"null", b"true"]),
    "deep nesting": _deep,
    "wrong type": _wrong_type,
    "missing field": lambda rng: json.dumps({"id": "m", "numbr": rng.randrange(100)}).encode(),
    "huge string": lambda rng: json.dumps({"id": "h", "number": "9" * rng.randrange(10_000, 50_000)}).encode(),
    "msgpack wrong type": lambda rng: msgpack.packb({"id": "p", "number": rng.choice([b"7", 1.5, "7", None])}),
    "msgpack int keys": lambda rng: msgpack.packb({1: 2, "number": 3}),
    "msgpack truncated": lambda rng: msgpack.packb({"id": "p", "number": 7, "pad": "x" * 20})[:rng.randrange(2, 20)],
    "bad envelope": lambda rng: msgpack.packb(rng.choice([{envelope.MARKER: 2}, {envelope.MARKER: 1, "records": [1]},
                                                          {envelope.MARKER: 1, "keys": ["number"], "columns": [[1]],
                                                           "n": 3},
                                                          {envelope.MARKER: 1, "keys": ["number"], "columns": [[1]],
                                                           "n": []},
                                                          {envelope.MARKER: 1, "keys": [[1]], "columns": [[1]], "n": 1}])),
    "invalid utf-8": lambda rng: b'{"id": "u", "number": "\xff\xfe"}',
    "nan": lambda rng: b'{"id": "n", "number": NaN}',
}


@dataclass
class Plan:
    """What is published: bodies in order, which are bad (by kind), and the good ids."""

    bodies: list[bytes] = field(default_factory=list)
    bad: collections.Counter = field(default_factory=collections.Counter)  # body -> count
    kinds: collections.Counter = field(default_factory=collections.Counter)
    good_ids: set[str] = field(default_factory=set)


def make_plan(count: int, good: int, seed: int) -> Plan:
    """``count`` bad and ``good`` good message bodies, shuffled with ``seed``."""
    rng = random.Random(seed)
    plan = Plan()
    names = list(BAD_KINDS)
    for i in range(count):
        kind = "huge" if i % HUGE_EVERY == HUGE_EVERY // 2 or (i == count - 1 and count < HUGE_EVERY) else names[i % len(names)]
        body = _huge(rng) if kind == "huge" else BAD_KINDS[kind](rng)
        plan.bodies.append(body)
        plan.bad[body] += 1
        plan.kinds[kind] += 1
    for i in range(good):
        plan.good_ids.add(f"g-{i}")
        plan.bodies.append(encode_json({"id": f"g-{i}", "number": rng.randrange(1, 10**12)}))
    rng.shuffle(plan.bodies)
    return plan


def run(count: int, good: int, seed: int, workdir: Path) -> dict:
    """Run the fuzz once; return its report (``ok`` False when a check failed)."""
    started = time.monotonic()
    plan = make_plan(count, good, seed)
    nsqd = start_nsqd(workdir / "nsqd", extra=["--mem-queue-size=1000000"])
    workers = None
    try:
        path, names = write_topology(workdir, nsqd, f"fuzz_{seed}", replicas=2)
        workers = Workers(path)
        for replica in range(2):
            workers.start(replica)
        workers.wait_subscribed(nsqd.http, names.input, 2)
        with NsqPublisher(nsqd.tcp) as pub:
            pub.publish(names.input, plan.bodies, chunk=200)

        def done(got) -> bool:
            seen = {r["id"] for t in (names.prime, names.non_prime) for r in got.get(t, [])}
            dead = {r["nsq_message_id"] for r in got.get(names.dead, [])}
            return plan.good_ids <= seen and len(dead) >= count
        got = collect(nsqd.tcp, names.outputs, done, timeout=120 + len(plan.bodies) / 1000)
        alive = [p.poll() is None for p in workers.procs]
        workers.stop_all()
        codes = [p.returncode for p in workers.procs]
        return report(plan, got, names, alive, codes, time.monotonic() - started)
    finally:
        if workers is not None:
            workers.stop_all()
        nsqd.stop()


def _raw(letter: dict) -> bytes:
    """The original body a decoded dead letter carries."""
    if "body_bytes" in letter:
        return letter["body_bytes"]
    if "body" in letter:
        return letter["body"].encode("utf-8")
    return base64.b64decode(letter["body_base64"])


def report(plan: Plan, got: dict, names, alive: list[bool], codes: list, seconds: float) -> dict:
    """Check what came out against the plan."""
    dead = {}
    for letter in got.get(names.dead, []):
        dead.setdefault(letter["nsq_message_id"], letter)
    unexplained = [m for m, letter in dead.items() if not letter.get("reason")
                   or ("body_truncated_from" not in letter and _raw(letter) not in plan.bad)]
    seen = {r["id"] for t in (names.prime, names.non_prime) for r in got.get(t, [])}
    reasons = collections.Counter(letter["reason"].split(":")[0][:40] for letter in dead.values())
    result = {
        "bad_published": sum(plan.bad.values()), "good_published": len(plan.good_ids),
        "dead_letters": len(dead), "dead_letters_without_reason_or_unknown_body": len(unexplained),
        "good_delivered": len(plan.good_ids & seen), "workers_alive_at_end": sum(alive),
        "worker_exit_codes": codes, "seconds": round(seconds, 1), "bad_kinds": dict(plan.kinds),
        "top_reasons": dict(reasons.most_common(8)),
    }
    result["ok"] = (result["dead_letters"] == result["bad_published"] and not unexplained
                    and result["good_delivered"] == len(plan.good_ids) and all(alive) and codes == [0, 0])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="bad messages (default 100,000)")
    parser.add_argument("--good", type=int, default=None, help="good messages (default: as many as bad)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nsq-fuzz-") as tmp:
        result = run(args.count, args.count if args.good is None else args.good, args.seed, Path(tmp))
    print(json.dumps(result, indent=1))
    print(f"fuzz: {'OK' if result['ok'] else 'FAILED'}: {result['bad_published']:,} bad -> {result['dead_letters']:,} "
          f"dead letters with reasons; {result['good_delivered']:,} of {result['good_published']:,} good delivered; "
          f"{result['workers_alive_at_end']} of 2 workers alive, exit codes {result['worker_exit_codes']}; "
          f"{result['seconds']} s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
