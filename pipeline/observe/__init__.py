"""Seeing a running pipeline: the monitor, health database, report, status, top, tail and logs.

Layer 6: imports ``pipeline.ops`` and below; independent of ``pipeline.edge``.
Map: docs/ARCHITECTURE.md.
"""
