"""Talking to nsqd: frames, connections, readers, publishers (one node, several, MPUB) and the HTTP API.

Layer 3: imports ``pipeline.records``, ``pipeline.config`` and the public face.
Map: docs/ARCHITECTURE.md.
"""
