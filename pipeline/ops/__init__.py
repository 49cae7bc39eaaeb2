"""Running a pipeline on one machine: NSQ binaries, processes, supervisord, scaling, compose, certificates.

Layer 5: imports ``pipeline.runtime`` and below; never ``observe``, ``edge`` or ``cli``.
Map: docs/ARCHITECTURE.md.
"""
