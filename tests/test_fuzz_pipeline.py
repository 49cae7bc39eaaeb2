"""``make fuzz`` at a small count: the runner itself works and its checks hold on a real pipeline."""
from __future__ import annotations

import pytest

import fuzz_pipeline


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_messages_are_dead_lettered_and_good_ones_delivered_with_no_worker_crash(nsq_bin, tmp_path):
    result = fuzz_pipeline.run(count=1300, good=700, seed=7, workdir=tmp_path)
    assert result["ok"], result
    assert (result["dead_letters"], result["good_delivered"]) == (1300, 700)
    assert set(result["bad_kinds"]) == {*fuzz_pipeline.BAD_KINDS, "huge"}  # every kind was sent, a huge one too
    assert result["worker_exit_codes"] == [0, 0]


def test_plan_is_what_it_says():
    plan = fuzz_pipeline.make_plan(30, 20, seed=3)
    assert len(plan.bodies) == 50 and sum(plan.bad.values()) == 30 and len(plan.good_ids) == 20
    assert all(0 < len(b) <= fuzz_pipeline.MAX_MSG_SIZE for b in plan.bodies)
