"""The ``pipeline`` command line: one module per group of commands, and the demo.

Layer 7, the top: may import every layer; the checkout's reference code only
through :mod:`pipeline.cli.plugins`, at call time. Map: docs/ARCHITECTURE.md.
"""
from pipeline.cli.main import main

__all__ = ["main"]
