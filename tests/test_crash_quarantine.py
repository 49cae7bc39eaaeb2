"""Crash quarantine under real supervisord: records that kill their worker are dead-lettered, not redelivered forever.

The stage (``chaos.crashing:classify``) calls ``os._exit(1)`` on one record
and segfaults on another. Without the quarantine each would kill a replica
after every ``msg_timeout``, for ever; with it, each is dead-lettered after
``crash_tries`` (2) deaths with the cause in its reason, and every other
record is delivered.
"""
from __future__ import annotations

import json
import re

import orjson
import pytest
from harness import collect, ids_seen
from test_supervise import Deployment

from pipeline.client.nsqclient import NsqPublisher

pytestmark = pytest.mark.integration

CRASH_TRIES = 2  # the default
RECORDS = 400
CRASHES = {120: "exit", 260: "segv"}
CAUSES = {"exit": "exit status 1", "segv": "SIGSEGV"}


@pytest.fixture
def deployment(nsq_bin):
    d = Deployment(handler="chaos.crashing:classify", replicas=2, msg_timeout=3)
    yield d
    d.close()


def test_records_that_kill_their_worker_are_dead_lettered_with_the_cause(deployment):
    d = deployment
    d.up()
    outputs = d.checked_outputs()
    bodies = [orjson.dumps({"id": f"c-{n}", "number": n, **({"crash": CRASHES[n]} if n in CRASHES else {})})
              for n in range(1, RECORDS + 1)]
    with NsqPublisher(d.tcp) as pub:
        pub.mpub("numbers", bodies)

    good = {f"c-{n}" for n in range(1, RECORDS + 1) if n not in CRASHES}
    got = collect(d.tcp, outputs, lambda g: len(g["numbers.dead"]) >= len(CRASHES)
                  and set(ids_seen(g, outputs[:2])) >= good, 120)

    assert set(ids_seen(got, outputs[:2])) == good
    # Each is dead-lettered (twice at most: a worker dying in another batch before its FIN duplicates a
    # dead letter as it would an output), and nothing else is.
    letters = [(json.loads(letter["body"])["crash"], letter) for letter in got["numbers.dead"]]
    assert sorted({kind for kind, _ in letters}) == ["exit", "segv"] and len(letters) <= 4, letters
    for kind, letter in letters:
        found = re.fullmatch(r"worker died (\d+) times while processing it \(last: (.+)\)", letter["reason"])
        assert found and found.group(2) == CAUSES[kind], letter["reason"]
        assert CRASH_TRIES <= int(found.group(1)) <= CRASH_TRIES + 1, letter["reason"]
        assert letter["attempts"] >= CRASH_TRIES + 1 and letter["stage"] == "primes"
    events = [json.loads(line) for line in (d.dir / "var" / "log" / "events.jsonl").read_text().splitlines()]
    worker_events = [e for e in events if e["group"] == "primes"]
    assert not [e for e in worker_events if e["event"] == "FATAL"], "a poison record must not drive a replica FATAL"
    deaths = [e for e in worker_events if e["event"] in ("EXITED", "BACKOFF")]
    assert CRASH_TRIES <= len(deaths) <= len(CRASHES) * (CRASH_TRIES + 1), deaths
    print(f"{len(deaths)} worker deaths, {len(letters)} dead letters")
    assert all(p.state == "RUNNING" for p in d.supervisor().processes() if p.group == "primes")
