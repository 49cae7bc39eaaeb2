"""GcTuning: the collector's settings while a worker runs, and put back when it drains."""
from __future__ import annotations

import gc

import pytest

from pipeline.runtime.middleware.gctuning import GEN0_THRESHOLD, GcTuning


@pytest.fixture
def collector():
    before = gc.get_threshold()
    yield before
    assert gc.get_threshold() == before, "a test left the collector tuned"


def test_boot_freezes_the_heap_and_raises_the_young_threshold(collector):
    tuning = GcTuning()
    tuning.after_worker_boot(None)
    tuning.after_worker_boot(None)  # booting twice counts once
    assert gc.get_freeze_count() > 1000  # at least this test process's modules
    assert gc.get_threshold() == (GEN0_THRESHOLD, collector[1], collector[2])
    tuning.before_worker_shutdown(None)


def test_shutdown_puts_the_settings_back(collector):
    tuning = GcTuning()
    tuning.after_worker_boot(None)
    tuning.before_worker_shutdown(None)
    assert gc.get_threshold() == collector
    assert gc.get_freeze_count() == 0


def test_the_last_of_two_workers_in_one_process_restores(collector):
    first, second = GcTuning(), GcTuning()
    first.after_worker_boot(None)
    second.after_worker_boot(None)
    first.before_worker_shutdown(None)
    assert gc.get_threshold()[0] == GEN0_THRESHOLD, "the second worker still runs"
    second.before_worker_shutdown(None)
    second.before_worker_shutdown(None)  # a second drain call changes nothing
    assert gc.get_threshold() == collector


def test_cyclic_garbage_is_still_collected(collector):
    tuning = GcTuning()
    tuning.after_worker_boot(None)

    class Node:
        pass

    for _ in range(GEN0_THRESHOLD // 2 + 1000):  # each cycle is two objects that only the collector frees
        a, b = Node(), Node()
        a.other, b.other = b, a
    alive = sum(type(o) is Node for o in gc.get_objects())
    tuning.before_worker_shutdown(None)
    assert alive < GEN0_THRESHOLD


def test_kernels_loaded_after_the_boot_are_frozen_too_but_only_while_tuned(collector):
    from pipeline.runtime.middleware.gctuning import refreeze
    tuning = GcTuning()
    tuning.after_worker_boot(None)
    frozen = gc.get_freeze_count()
    late = [[i] for i in range(5000)]  # as numba's objects, allocated after the boot
    refreeze()
    assert gc.get_freeze_count() >= frozen + 5000
    tuning.before_worker_shutdown(None)
    refreeze()  # no worker tuned: nothing is frozen
    assert gc.get_freeze_count() == 0 and late
