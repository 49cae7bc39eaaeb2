"""Round-robin choice of nsqd nodes with health tracking, for publishers.

A publisher with several nsqd nodes sends each batch to the next node in
turn. A node that refuses a batch or drops its connection is marked down and
skipped for a back-off that doubles with each consecutive failure (up to
``max_backoff``); its first success marks it up again. When every node is
down, the one whose back-off ends first is tried rather than none, so a
publisher never stops trying while it has time.

Example::

    pool = NodePool(["127.0.0.1:4150", "127.0.0.1:4152"])
    node = pool.pick()          # 127.0.0.1:4150, then 127.0.0.1:4152, ...
    pool.failed(node)           # skipped for 0.5 s, then 1 s, 2 s, ...
    pool.succeeded(node)        # up again
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

BACKOFF = 0.5
WARN_EVERY = 10.0  # seconds between two warnings of publishing with fewer copies than a topic asks
MAX_BACKOFF = 30.0


@dataclass
class NodeHealth:
    """What a publisher knows of one node."""

    address: str
    failures: int = 0  # consecutive failures; 0 when the last attempt succeeded
    down_until: float = 0.0  # monotonic time before which the node is skipped
    published: int = 0  # batches the node acknowledged
    last_error: str = ""

    def up(self, now: float) -> bool:
        """True when the node may be tried at ``now``."""
        return now >= self.down_until


class NodePool:
    """The nsqd nodes of a publisher, handed out round-robin, skipping nodes that are down.

    Parameters:
        addresses: the nodes (any hashable names, usually ``host:port``), in order.
        backoff: seconds a node is skipped after its first consecutive failure.
        max_backoff: the longest a node is skipped.
        clock: the time source (monotonic seconds).
    """

    def __init__(self, addresses: Sequence[str], backoff: float = BACKOFF, max_backoff: float = MAX_BACKOFF,
                 clock: Callable[[], float] = time.monotonic):
        if not addresses:
            raise ValueError("NodePool needs at least one node")
        self.nodes = {address: NodeHealth(address) for address in addresses}
        self.order = list(self.nodes)
        self.backoff, self.max_backoff, self.clock = backoff, max_backoff, clock
        self._next = 0

    def pick(self, exclude: Collection[str] = (), usable: Callable[[str], bool] | None = None,
             key: str | None = None) -> str | None:
        """Return the next node that is up, not in ``exclude`` and ``usable``; None when there is none.

        With ``key``, the search starts at the key's own node (a stable hash)
        instead of the round-robin position, so one key's batches stay on one
        node, in order, while it is up. When every eligible node is down, the
        one that comes back first is returned.
        """
        if len(self.order) == 1:  # up or down, the one node is the answer unless excluded or unusable
            address = self.order[0]
            return None if address in exclude or (usable is not None and not usable(address)) else address
        now = self.clock()
        start = self._next if key is None else zlib.crc32(key.encode()) % len(self.order)
        candidates = []
        for step in range(len(self.order)):
            address = self.order[(start + step) % len(self.order)]
            if address in exclude or (usable is not None and not usable(address)):
                continue
            if self.nodes[address].up(now):
                if key is None:
                    self._next = (self.order.index(address) + 1) % len(self.order)
                return address
            candidates.append(address)
        if not candidates:
            return None
        return min(candidates, key=lambda a: self.nodes[a].down_until)

    def succeeded(self, address: str) -> None:
        """Record an acknowledged batch: the node is up."""
        node = self.nodes[address]
        node.failures, node.down_until = 0, 0.0
        node.published += 1

    def failed(self, address: str, error: object = "") -> None:
        """Record a refusal or a lost connection: skip the node for its back-off.

        Failures reported while the node is already skipped (the other
        batches of a connection that closed) do not lengthen the back-off:
        it doubles only when the node fails again after it.
        """
        node = self.nodes[address]
        node.last_error = str(error)
        now = self.clock()
        if not node.up(now):
            return
        node.failures += 1
        node.down_until = now + min(self.backoff * 2 ** (node.failures - 1), self.max_backoff)

    def is_up(self, address: str) -> bool:
        """True when ``address`` is not in its back-off."""
        return self.nodes[address].up(self.clock())

    def snapshot(self) -> list[NodeHealth]:
        """A copy of every node's health, in order."""
        return [NodeHealth(**vars(node)) for node in self.nodes.values()]
