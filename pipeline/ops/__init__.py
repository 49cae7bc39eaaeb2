"""Running a pipeline on one machine: NSQ binaries, supervisord, processes, scaling, certificates.

Renders supervisord.conf and docker-compose from the topology and drives them.
Layer 5: imports ``pipeline.runtime`` and below; never ``observe``, ``edge`` or ``cli``.
"""
