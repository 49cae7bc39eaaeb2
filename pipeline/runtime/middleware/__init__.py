"""Middleware the worker installs itself, one module each: metrics, collector tuning, chaos fault points.

Part of the runtime layer; typed against :class:`pipeline.middleware.WorkerView`, never the
worker itself. Map: docs/ARCHITECTURE.md.
"""
