"""Records as bytes: codecs, packed envelopes, partitions, dead letters and their compiled kernels.

Layer 2: pure data handling, no sockets, no processes; imports ``pipeline.config`` and the
public face. Map: docs/ARCHITECTURE.md.
"""
