"""pipeline.ops.supervise: supervisord whose loop never waits more than WAKE_S, so it restarts a dead worker at once."""
from __future__ import annotations

import time

from pipeline.ops.supervise import WAKE_S, WakingOptions, WakingPoller


def test_the_poller_caps_supervisords_one_second_wait():
    # supervisord asks for 1 s; ask for 30 to tell the cap from any other early return
    poller = WakingOptions().poller
    assert isinstance(poller, WakingPoller)
    started = time.monotonic()
    assert poller.poll(30) == ([], [])
    assert time.monotonic() - started < 10 * WAKE_S + 5  # 30 s without the cap
    poller.close()
