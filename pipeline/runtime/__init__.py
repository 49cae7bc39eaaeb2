"""The worker that runs one replica of a stage: batches, handler calls, commits, keyed state.

``runtime.middleware`` holds the middleware the worker installs itself (metrics,
collector tuning, fault points). Layer 4: imports ``pipeline.client`` and below.
"""
