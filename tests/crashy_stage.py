"""A stage whose import fails while a flag file exists next to the topology (crash-loop tests).

Every import appends a line to ``starts`` beside the flag, so a test can count
how often supervisord started the worker. The check comes before the heavy
import so the crash lands within supervisord's ``startsecs``, like a broken
handler import does.
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path.cwd()  # supervisord runs workers in the topology's folder
with open(_HERE / "starts", "a") as _starts:
    _starts.write("start\n")
if (_HERE / "crash").exists():
    raise RuntimeError("crash flag present: failing on start")

from consumers.primes import classify  # noqa: E402,F401  (the stage itself)
