"""Micro-benchmark of crash quarantine's hot path: a handler call's ids into the black box and out.

Run ``python -m benchmarks.blackbox`` from the checkout. It prints the time of
``BlackBox.hold`` + ``clear`` for 1, 64 and 500 message ids, and of
``BatchProcessor.process`` on 64 primes records without and with a black box,
interleaved (the machine's speed drifts; see docs/PERFORMANCE.md). Not part
of ``make bench``: no broker, no processes, a few seconds.
"""
from __future__ import annotations

import tempfile
import timeit
from pathlib import Path

import orjson

from consumers.primes import classify
from pipeline.client.fastconn import FastMessage
from pipeline.config import load_topology
from pipeline.middleware import MiddlewareStack
from pipeline.records import jit
from pipeline.runtime.blackbox import BlackBox
from pipeline.runtime.processing import BatchProcessor, ProcessingContext
from pipeline.runtime.quarantine import Quarantine

TOPOLOGY = """\
nsq: {nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}], var_dir: var}
topics: {numbers: {}, prime: {}, non_prime: {}}
stages: {primes: {handler: 'consumers.primes:classify', input: numbers, channel: c, outputs: [prime, non_prime]}}
"""


def _best(call, number: int) -> float:
    """Microseconds per call: the best of 7 repeats of ``number`` calls."""
    return min(timeit.repeat(call, number=number, repeat=7)) / number * 1e6


def _messages(count: int) -> list[FastMessage]:
    return [FastMessage(None, b"%016x" % i, orjson.dumps({"id": f"r-{i}", "ts": 1, "number": 1_000_003 + i}), 0, 1)
            for i in range(count)]


def main() -> None:
    jit.load_in_background().join()
    folder = Path(tempfile.mkdtemp(prefix="blackbox-"))
    box, _ = BlackBox.open(folder / "boxes", "primes", 0)
    for count in (1, 64, 500):
        messages = _messages(count)
        took = _best(lambda held=messages: (box.hold(held), box.clear()), 20_000)
        print(f"hold + clear of {count:3d} ids: {took:6.2f} us")
    box.close()
    (folder / "topology.yaml").write_text(TOPOLOGY)
    topology = load_topology(folder / "topology.yaml")
    quarantine = Quarantine(folder / "crash", "primes", 0, crash_tries=2)
    quarantine.open()
    processors = {name: BatchProcessor(ProcessingContext("primes", topology.stage("primes"), topology, classify,
                                                         MiddlewareStack(), quarantine=q))
                  for name, q in (("without", None), ("with", quarantine))}
    batch = _messages(64)
    for _ in range(3):
        for name, processor in processors.items():
            took = _best(lambda p=processor: p.process(batch), 2000)
            print(f"process(64 primes records) {name:7s} a black box: {took:7.1f} us")
    quarantine.close()


if __name__ == "__main__":
    main()
