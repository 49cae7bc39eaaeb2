"""supervisord, woken every 0.1 s, so a dead worker is started again at once instead of up to 1 s later.

supervisord starts a dead program again only on the next turn of its main
loop, which waits up to 1 s (measured, and why it matters: docs/PERFORMANCE.md).

``python -m pipeline.ops.supervise -c supervisord.conf`` is supervisord with one
change: the loop's wait is capped at :data:`WAKE_S`. Everything else
(options, signals, the XML-RPC interface, reloading on SIGHUP) is
supervisord's own. A turn of the loop with nothing to do costs a few tens of
microseconds per program, so ten turns a second are not measurable.
"""
from __future__ import annotations

import os
import sys

from supervisor import poller
from supervisor.options import ServerOptions
from supervisor.states import SupervisorStates
from supervisor.supervisord import go

__all__ = ["WAKE_S", "WakingPoller", "WakingOptions", "main"]

#: The longest supervisord waits before it looks at its processes again, in seconds.
WAKE_S = 0.1


class WakingPoller(poller.Poller):
    """The platform's supervisord poller, with every wait capped at :data:`WAKE_S`."""

    def poll(self, timeout):
        return super().poll(min(timeout, WAKE_S))


class WakingOptions(ServerOptions):
    """supervisord's options, with a :class:`WakingPoller`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.poller = WakingPoller(self)


def main(args: list[str] | None = None) -> None:
    """Run supervisord as ``supervisor.supervisord.main`` does, with :class:`WakingOptions`."""
    first = True
    while True:  # a SIGHUP restarts with fresh options, as in supervisord
        options = WakingOptions()
        options.realize(args, doc="supervisord (pipeline.ops.supervise): supervisord that wakes every 0.1 s")
        options.first = first
        options.test = False
        go(options)
        options.close_httpservers()
        options.close_logger()
        first = False
        if options.mood < SupervisorStates.RESTARTING:
            break


if __name__ == "__main__":
    assert os.name == "posix", "supervisord is Unix-only"
    main(sys.argv[1:])
