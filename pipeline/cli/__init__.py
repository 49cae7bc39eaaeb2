"""The ``pipeline`` command line: every command, and the demo.

Commands that use the reference stages, producers, chaos harness or benchmarks
load them at call time (see :mod:`pipeline.cli.plugins`).
Layer 7, the top: may import every layer.
"""
from pipeline.cli.main import main

__all__ = ["main"]
