"""The monkey's schedule: seeded, probabilistic, lasting faults healed and never stacked."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from chaos.faults import Fault
from chaos.monkey import Monkey
from chaos.scenario import ProxyDown


class Recording(Fault):
    """A fault that only notes when it is injected and healed (the test is about the schedule)."""

    def __init__(self, spec, events: list):
        super().__init__(spec)
        self.events = events

    def inject(self, ctx):
        # A draw from the run's RNG: equal only if every earlier decision drew the same
        self.events.append(("inject", round(ctx.rng.random(), 12)) if self.spec.every and self.spec.probability < 1
                           else "inject")
        return "recorded"

    def heal(self, ctx):
        self.events.append("heal")


def _run(seed: int, spec: ProxyDown, tmp_path: Path, duration: float = 0.6) -> tuple[list, Monkey]:
    events: list[str] = []
    monkey = Monkey(SimpleNamespace(folder=tmp_path), [], seed, duration)
    monkey.faults = [Recording(spec, events)]
    monkey.run(threading.Event())
    return events, monkey


def test_same_seed_same_decisions(tmp_path: Path) -> None:
    spec = ProxyDown(fault="proxy_down", probability=0.5, every=[0.05, 0.06])
    first, _ = _run(7, spec, tmp_path, duration=1.0)
    second, _ = _run(7, spec, tmp_path, duration=1.0)
    other, _ = _run(8, spec, tmp_path, duration=1.0)
    # ticks are ~18; with p=0.5 about half fire, the same ones for the same seed
    assert 3 <= len(first) <= 15
    assert abs(len(first) - len(second)) <= 1  # the last tick may fall either side of the end
    assert first == second[:len(first)] or second == first[:len(second)]
    assert other[:3] != first[:3]


def test_a_lasting_fault_is_healed_once_and_not_stacked(tmp_path: Path) -> None:
    # Ticks every 50-60 ms but each injection holds 0.25 s: it is not injected again while in force
    spec = ProxyDown(fault="proxy_down", probability=1, every=[0.05, 0.06], duration=0.25)
    events, monkey = _run(1, spec, tmp_path, duration=1.0)
    assert events[:2] == ["inject", "heal"]
    assert all(a != b for a, b in zip(events, events[1:])), events
    assert events[-1] == "heal"  # healed at the end of the method too
    assert monkey.injected == events.count("inject")
    assert (tmp_path / "faults.jsonl").read_text().count("recorded") == monkey.injected


def test_a_stop_request_heals_at_once(tmp_path: Path) -> None:
    events: list[str] = []
    spec = ProxyDown(fault="proxy_down", probability=1, duration=600)
    monkey = Monkey(SimpleNamespace(folder=tmp_path), [], 1, 600)
    monkey.faults = [Recording(spec, events)]
    stop = threading.Event()
    thread = threading.Thread(target=monkey.run, args=(stop,))
    thread.start()
    while "inject" not in events:
        thread.join(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and events == ["inject", "heal"]


class HealsOnThirdTry(Recording):
    """A fault whose heal fails twice (as Toxiproxy's DELETE of a toxic may time out), then works."""

    def heal(self, ctx):
        self.events.append("heal")
        if self.events.count("heal") < 3:
            raise TimeoutError("timed out")


def test_a_heal_that_fails_is_tried_again_and_the_fault_not_injected_over_it(tmp_path: Path) -> None:
    # Ticks every 50-60 ms, each injection held 0.1 s; the first heal fails twice
    spec = ProxyDown(fault="proxy_down", probability=1, every=[0.05, 0.06], duration=0.1)
    events: list = []
    monkey = Monkey(SimpleNamespace(folder=tmp_path), [], 1, 2.8)
    monkey.faults = [HealsOnThirdTry(spec, events)]
    monkey.run(threading.Event())
    # the heal is retried a second later each time until it works, and no injection comes in between
    assert events[:5] == ["inject", "heal", "heal", "heal", "inject"]
    log = (tmp_path / "faults.jsonl").read_text()
    assert log.count("heal of proxy_down failed: timed out") == 2
