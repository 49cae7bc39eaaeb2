"""The chaos harness: scenarios as data, faults as plugins, a monkey that injects them, a checker that counts.

``pipeline chaos run SCENARIO`` validates the scenario, starts a private
pipeline (supervisord, nsqd behind Toxiproxy, the primes stage), runs the
workload while the monkey injects faults on a seeded schedule, heals, drains,
and has the checker compare what the producer's journal says nsqd acknowledged
with what arrived downstream.
"""
