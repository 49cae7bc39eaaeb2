"""Middleware the worker installs itself: metrics, collector tuning, chaos fault points.

One module per middleware, each a :class:`pipeline.middleware.Middleware`.
Part of the runtime layer: imports ``pipeline.runtime``'s lower layers, never the worker.
"""
