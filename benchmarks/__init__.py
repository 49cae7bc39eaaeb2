"""Throughput benchmarks: the primes stage side by side with its baselines, in one run.

``python -m benchmarks.run`` starts a fresh nsqd per measurement, preloads the
same numbers, and times how fast each contender drains them: the textbook
pynsq consumer (:mod:`benchmarks.textbook`), NSQ's own ``nsq_to_nsq``
pass-through, the primes stage with one and two replicas, and the primes stage
on batched envelopes (``pack: 1000``, two replicas). It also times a
worker's restart-to-consuming. Results go to ``bench/results.json`` and
``bench/results.md``.
"""
