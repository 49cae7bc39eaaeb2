"""pipeline.records.jit: a worker consumes before numba is loaded, then switches to the compiled kernels."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from pipeline.records import bulkjson

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    from pipeline.records import jit
    jit.defer()
    import consumers.primes, pipeline.client.fastconn, pipeline.runtime.processing, pipeline.runtime.worker
    from consumers.primes import is_prime_array
    from pipeline.records.bulkjson import dumps_each
    import numpy as np
    before = {"numba": "numba" in sys.modules, "primes": is_prime_array(np.arange(20)).tolist(),
              "json": [b.decode() for b in dumps_each([{"a": 1}, [2]])],
              "kernels": [jit.kernel(m) is not None for m in jit._registered]}
    jit.register("no_such_kernel_module")
    jit.load_in_background().join(120)
    after = {"numba": "numba" in sys.modules, "primes": is_prime_array(np.arange(20)).tolist(),
             "json": [b.decode() for b in dumps_each([{"a": 1}, [2]])],
             "kernels": {m: jit.kernel(m) is not None for m in jit._registered}}
    print(json.dumps([before, after]))
""")


def test_a_deferring_process_works_without_numba_then_loads_every_kernel_in_the_background():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    before, after = __import__("json").loads(done.stdout)
    primes = [n in (2, 3, 5, 7, 11, 13, 17, 19) for n in range(20)]
    assert before == {"numba": False, "primes": primes, "json": ['{"a":1}', "[2]"], "kernels": [False] * 3}
    assert after == {"numba": True, "primes": primes, "json": ['{"a":1}', "[2]"],
                     "kernels": {"pipeline.records.bulkjson_kernel": True, "pipeline.client.frames": True,
                                 "consumers.primes_kernel": True, "no_such_kernel_module": False}}
    # A kernel that cannot load leaves its twin working, loudly.
    assert "CRITICAL:pipeline.records.jit:cannot load the compiled kernels of no_such_kernel_module" in done.stderr
    assert "compiled kernels ready after" in done.stderr


def test_bulkjson_gives_the_same_bytes_before_and_after_its_kernel_loads(monkeypatch):
    from pipeline.records import jit
    records = [{"a": 'x,"}', "n": [1, {"b": []}]}, [], "s", 3.5, None, {"deep": [[{"x": "]"}]]}]
    compiled = bulkjson.dumps_each(records)
    monkeypatch.setattr(jit, "_deferred", True)
    monkeypatch.setattr(jit, "_ready", {})
    assert bulkjson.dumps_each(records) == compiled
