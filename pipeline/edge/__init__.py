"""The optional edge in front of nsqd: an authenticated /pub and /mpub gateway and nsqd's auth server.

Layer 6: imports ``pipeline.ops`` and below; independent of ``pipeline.observe``.
Map: docs/ARCHITECTURE.md.
"""
