"""Talking to nsqd: frames, connections, readers, publishers and the HTTP API.

The NSQ wire protocol and the publish paths (one node, several nodes, MPUB).
Layer 3: imports ``pipeline.records``, ``pipeline.config`` and the public face.
"""
