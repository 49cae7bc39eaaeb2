"""Records as bytes: codecs, packed envelopes, partitions, dead letters, compiled kernels.

Everything here is pure data handling, with no sockets and no processes.
Layer 2: imports ``pipeline.config`` and the public face, nothing above.
"""
