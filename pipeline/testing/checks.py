"""Checks of what a stage must keep equal: its columnar path and its record path, and a keyed stage's
outputs and state whatever NSQ does to its input (duplicates, reordering, a restart from a checkpoint).

Each runs the stage in-process (:mod:`pipeline.testing.runner`) and raises
:class:`AssertionError` naming the first difference. They build a fresh stage
for every run, so they take a stage class or handler path, not a built
stateful stage. Example::

    from pipeline.testing import assert_columns_match, check_keyed

    assert_columns_match(classify, records, outputs=["even", "odd"], pack=100)
    check_keyed(RunningSum, ticks, outputs=["sums"], key="symbol")
"""
from __future__ import annotations

import random
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.runtime.keyed_processing import KeyedProcessor
from pipeline.stage import Record
from pipeline.testing.runner import StageLike, StageRun, make_runner

T = TypeVar("T")
_SHOWN = 300  # characters of a record shown in a difference
_NO_KEY = "(no key field)"


def redelivered(records: Sequence[T], *, seed: int = 0, window: int = 8, duplicates: float = 0.25) -> list[T]:
    """``records`` as NSQ may deliver them: each moved up to ``window`` places, and about the ``duplicates``
    share of them delivered a second time, up to ``2 * window`` places later (seeded, so repeatable)."""
    rng = random.Random(seed)
    placed = [(i + rng.uniform(0, window), record) for i, record in enumerate(records)]
    placed += [(i + rng.uniform(0, 2 * window), record) for i, record in enumerate(records)
               if rng.random() < duplicates]
    placed.sort(key=lambda item: item[0])
    return [record for _, record in placed]


def assert_columns_match(stage: StageLike, records: Iterable[Record], *, batch_size: int | None = None,
                         **options: Any) -> StageRun:
    """Assert that ``stage``'s columnar function publishes and dead-letters what its record path does.

    ``records`` are fed twice in envelopes (``pack``, 100 by default) of the
    options of :func:`~pipeline.testing.runner.run_stage`: once with the columnar
    function, once without; the outputs, the dead letters and the stage's final
    state must be equal, and the columnar function must have taken some batch.
    Returns the columnar run.

    Raises:
        AssertionError: the paths differ, or the columnar one took no batch (so nothing was compared).
    """
    _check_rebuildable(stage, "assert_columns_match")
    if "topology" not in options:
        options.setdefault("pack", 100)
    records = list(records)
    by_columns, by_records = make_runner(stage, **options), make_runner(stage, columns=False, **options)
    if by_columns.processor.columns_handler is None:
        raise AssertionError(f"stage {by_columns.name} has no columnar function (no `columns` attribute)")
    got, want = by_columns.feed(records, batch_size), by_records.feed(records, batch_size)
    if got.columnar == 0:
        raise AssertionError(f"the columnar function took no batch ({got.batches} in all), so nothing was "
                             "compared: it takes envelopes (pack above 1) of records with the same keys, and "
                             "must return the outputs rather than None")
    problems = _differences(want, got, by_records.state(), by_columns.state())
    if problems:
        raise AssertionError("the columnar path differs from the record path: " + "; ".join(problems))
    return got


def check_keyed(stage: StageLike, records: Iterable[Record | bytes], *, seed: int = 0, window: int = 8,
                duplicates: float = 0.25, batch_sizes: Sequence[int] = (1, 10),
                restore_at: Iterable[int] | None = None, **options: Any) -> StageRun:
    """Check that a keyed stage publishes what NSQ's redeliveries and a restart cannot change.

    1. ``records`` in order, through the stage: the reference run (returned).
    2. The same records :func:`redelivered` (``seed``, ``window``, ``duplicates``), in batches of each of
       ``batch_sizes``: every output must hold the reference's records, each key's in the same order, and
       the dead letters must be the same.
    3. The redelivered records cut at each of ``restore_at`` (default: four points; ``range(1, n)`` for
       every one): a replica runs the records before the cut, writes its checkpoint to a file, and a new
       replica restores it and runs the rest; together they must publish and dead-letter what one
       uninterrupted replica does, and end in the same state (its ``snapshot()``).

    ``options`` are :func:`~pipeline.testing.runner.run_stage`'s; the stage must be keyed (``key=``, or a
    keyed stage of ``topology``).

    Raises:
        AssertionError: naming the step and the first difference.
        ValueError: the stage is not keyed, or is a built stateful stage (give its class).
    """
    _check_rebuildable(stage, "check_keyed")
    records = list(records)
    runner = make_runner(stage, **options)
    if not isinstance(runner.processor, KeyedProcessor):
        raise ValueError(f"stage {runner.name} is not keyed: give key= (its input's key field) or a keyed stage")
    key, reference = runner.processor.key_field, runner.feed(records)
    stream = redelivered(records, seed=seed, window=window, duplicates=duplicates)
    for size in batch_sizes:
        got = make_runner(stage, **options).feed(stream, size)
        problems = _keyed_differences(reference, got, key)
        if problems:
            raise AssertionError(f"with duplicates and reordering (seed {seed}, batches of {size}), "
                                 + "; ".join(problems))
    _check_restarts(stage, stream, restore_at, batch_sizes[0] if batch_sizes else None, options)
    return reference


def _check_restarts(stage: StageLike, stream: list[Any], cuts: Iterable[int] | None, batch_size: int | None,
                    options: dict[str, Any]) -> None:
    """Step 3 of :func:`check_keyed`: a restart from the checkpoint at each cut changes nothing."""
    n = len(stream)
    whole_runner = make_runner(stage, **options)
    whole = whole_runner.feed(stream, batch_size)
    points = sorted(set(cuts)) if cuts is not None else sorted({n * k // 5 for k in range(1, 5)} - {0, n})
    with tempfile.TemporaryDirectory(prefix="pipeline-check-") as folder:
        for cut in points:
            first = make_runner(stage, **options)
            first.feed(stream[:cut], batch_size)
            path = Path(folder) / f"at-{cut}.ckpt"
            first.save(path)
            second = make_runner(stage, **options)
            second.restore(path)
            second.feed(stream[cut:], batch_size)
            joined = StageRun(outputs={out: records + second.result.outputs[out]
                                       for out, records in first.result.outputs.items()},
                              dead=first.result.dead + second.result.dead)
            problems = _differences(whole, joined, whole_runner.state(), second.state())
            if problems:
                raise AssertionError(f"after a restart from the checkpoint taken at record {cut} of {n} "
                                     f"(of the redelivered records), " + "; ".join(problems))


def _check_rebuildable(stage: StageLike, what: str) -> None:
    if not isinstance(stage, (str, type)) and hasattr(stage, "snapshot"):
        raise ValueError(f"{what} builds a fresh stage for each run: give the class of {stage!r}, not an instance")


def _differences(want: StageRun, got: StageRun, want_state: bytes | None, got_state: bytes | None) -> list[str]:
    """What differs between two runs over the same input: outputs in order, dead letters, final state."""
    problems = [f"output {out!r}: {problem}" for out, records in want.outputs.items()
                if (problem := _first_difference(records, got.outputs.get(out, []))) is not None]
    if (problem := _first_difference(want.dead, got.dead)) is not None:
        problems.append(f"dead letters: {problem}")
    if want_state != got_state:
        problems.append(f"the final state (snapshot) differs: {_short(got_state)}, expected {_short(want_state)}")
    return problems


def _keyed_differences(want: StageRun, got: StageRun, key: str) -> list[str]:
    """What differs between a run in order and one redelivered: each key's outputs in order, and the set of
    dead letters (a record dead-lettered on arrival is dead-lettered again when redelivered)."""
    problems = []
    for out, records in want.outputs.items():
        expected, found = _by_key(records, key), _by_key(got.outputs.get(out, []), key)
        for value in sorted(expected.keys() | found.keys()):
            problem = _first_difference(expected.get(value, []), found.get(value, []))
            if problem is not None:
                problems.append(f"output {out!r}, {key} {value}: {problem}")
                break
    missing = {repr(d) for d in want.dead} - {repr(d) for d in got.dead}
    extra = {repr(d) for d in got.dead} - {repr(d) for d in want.dead}
    if missing or extra:
        shown = f"missing {_short(min(missing))}" if missing else f"unexpected {_short(min(extra))}"
        problems.append(f"dead letters: {len(missing)} missing, {len(extra)} unexpected; {shown}")
    return problems


def _by_key(records: list[Record], key: str) -> dict[str, list[Any]]:
    """Records grouped by the repr of their ``key`` field; those without it as a sorted group of reprs."""
    groups: dict[str, list[Any]] = {}
    for record in records:
        if isinstance(record, dict) and key in record:
            groups.setdefault(repr(record[key]), []).append(record)
        else:  # no order to keep between keys: compared as a multiset
            groups.setdefault(_NO_KEY, []).append(repr(record))
    if _NO_KEY in groups:
        groups[_NO_KEY].sort()
    return groups


def _first_difference(want: Sequence[Any], got: Sequence[Any]) -> str | None:
    """None when ``got`` equals ``want`` item by item (equal reprs count: NaN fields); else the first difference."""
    for i, (a, b) in enumerate(zip(want, got, strict=False)):
        if a != b and repr(a) != repr(b):
            return f"item {i} is {_short(b)}, expected {_short(a)}"
    if len(want) == len(got):
        return None
    longer, what = (got, "unexpected") if len(got) > len(want) else (want, "missing")
    first = min(len(want), len(got))
    return f"{len(got)} items, expected {len(want)}; the first {what} is {_short(longer[first])}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."
