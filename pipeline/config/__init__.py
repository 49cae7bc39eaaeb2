"""The topology: what a pipeline declares in topology.yaml, validated at load.

The schema of every section, the loader that turns YAML into it with
``file:line:col`` errors, and the settings derived from it (security, observation).
Layer 1: imports only the public face (``pipeline.errors``, ``pipeline.stage``).
"""
from pipeline.config.topology import Topology, load_topology

__all__ = ["Topology", "load_topology"]
