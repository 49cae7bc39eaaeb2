"""``pipeline scale STAGE N``: change a stage's replicas in the topology file and live.

The topology file stays the one source of truth: the new ``replicas`` value is
written into it (a text edit at the position the YAML parser reports, so
comments and layout survive), the config beside it is rendered again, and a
running supervisord restarts only that stage's group. Its replicas drain on
SIGTERM, so nothing in flight is lost.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.config import load_topology
from pipeline.errors import PipelineError
from pipeline.ops.control import Log, Supervisor


class ScaleError(PipelineError):
    """Raised when a stage cannot be scaled as asked."""


def scale(topology, stage: str, replicas: int, log: Log = print):
    """Set ``stage``'s replicas to ``replicas`` in the topology file and apply it; return the new topology.

    Raises:
        ScaleError: unknown stage or a replica count outside the schema's bounds.
    """
    if stage not in topology.stages:
        raise ScaleError(f"no stage {stage!r} in {topology.path} (stages: {', '.join(topology.stages)})")
    spec = topology.stage(stage)
    if spec.keyed:
        partitions = topology.topics[spec.input].partitions
        raise ScaleError(f"stage {stage!r} is keyed: it runs one replica per partition of {spec.input!r} "
                         f"({partitions}); change the topic's partitions (a re-partition: drain the topic first, "
                         f"see README) instead of scaling the stage")
    path = Path(topology.path)
    text = path.read_text()
    edited = set_replicas(text, stage, replicas)
    tmp = path.with_name(path.name + ".scale.tmp")
    tmp.write_text(edited)
    try:
        updated = load_topology(tmp)  # the new file must be valid before it replaces the old one
    except PipelineError as e:
        tmp.unlink()
        raise ScaleError(str(e).replace(str(tmp), str(path))) from e
    os.replace(tmp, path)
    updated = load_topology(path)
    log(f"{path}: stages.{stage}.replicas = {replicas}")
    supervisor = Supervisor(updated)
    supervisor.write_conf()
    if supervisor.running():
        supervisor.update(log)
        supervisor.wait_ready()
    else:
        log("supervisord is not running; `pipeline up` will start the new size")
    return updated


def set_replicas(text: str, stage: str, replicas: int) -> str:
    """Return the topology text with ``stages.<stage>.replicas`` set, comments kept."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    stage_node = _child(_child(root, "stages"), stage)
    value = _child(stage_node, "replicas", required=False)
    if value is not None:
        return text[:value.start_mark.index] + str(replicas) + text[value.end_mark.index:]
    if stage_node.flow_style:
        at = stage_node.start_mark.index + 1  # just inside the "{"
        return text[:at] + f"replicas: {replicas}, " + text[at:]
    first_key = stage_node.value[0][0]
    indent = " " * first_key.start_mark.column
    at = first_key.start_mark.index
    return text[:at] + f"replicas: {replicas}\n{indent}" + text[at:]


def _child(node, key: str, required: bool = True):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return v
    if required:
        raise ScaleError(f"topology has no mapping entry {key!r}")
    return None
