"""The worker that runs one replica of a stage: batches, handler calls, answers, keyed state and commits.

Layer 4: imports ``pipeline.client`` and below. ``runtime.middleware`` holds the middleware
the worker installs itself. Map and the life of one message: docs/ARCHITECTURE.md.
"""
