"""The worker that runs one replica of a stage: batches, handler calls, commits, keyed state.

``worker`` holds the lifecycle (start, subscribe, drain) and the plain path;
``batcher`` makes the batches; ``processing`` decides each batch's outcome;
``acks`` answers the messages; ``keyed_path`` takes a keyed stage's batches
through ``commits`` (publish OK, checkpoint, FIN, in order) with ``keyed``'s
sequencer and checkpoint file. ``runtime.middleware`` holds the middleware the
worker installs itself (metrics, collector tuning, fault points).
Layer 4: imports ``pipeline.client`` and below.
"""
