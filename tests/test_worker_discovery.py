"""A worker finds the topology's nsqd even when nsqlookupd does not know it (yet).

A restarted nsqlookupd learns of an nsqd only at the nsqd's next ping, up to
30 s later; a worker (re)started meanwhile must not wait for that. Regression
fixture for the chaos soak's slow recoveries after `lookupd_kill`.
"""
from __future__ import annotations

import pytest

from harness import Workers, collect, write_topology
from pipeline.client.nsqclient import NsqPublisher
from pipeline.ops.processes import start_nsqlookupd

pytestmark = pytest.mark.integration


def test_worker_consumes_from_an_nsqd_its_lookupd_does_not_know(nsqd, tmp_path) -> None:
    # Given an nsqlookupd that nsqd never registered with (as after a lookupd restart)
    lookupd = start_nsqlookupd(tmp_path / "nsqlookupd.log")
    workers = None
    try:
        path, names = write_topology(tmp_path, nsqd, "unregistered", lookupd=lookupd, replicas=1)
        with NsqPublisher(nsqd.tcp) as pub:
            pub.publish(names.input, [b'{"id": "a", "number": 7}', b'{"id": "b", "number": 8}'])
        # When a worker starts with both in its topology
        workers = Workers(path)
        workers.start(0)
        # Then it consumes from nsqd at once (the lookupd's answer has no nsqd)
        got = collect(nsqd.tcp, names.outputs, lambda g: len(g[names.prime]) + len(g[names.non_prime]) >= 2, 30)
        assert [r["id"] for r in got[names.prime]] == ["a"] and [r["id"] for r in got[names.non_prime]] == ["b"]
    finally:
        if workers is not None:
            workers.stop_all()
        lookupd.stop()
