"""The topology: what a pipeline declares in topology.yaml, validated at load with ``file:line:col`` errors.

Layer 1: imports only the public face (``pipeline.errors``, ``pipeline.stage``).
This package's own face re-exports what callers use. Map: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

from pipeline.config.loader import Positions, load_topology, read_positions, validate_topology
from pipeline.config.observe import MonitorSpec, ReportSpec, SmtpSpec
from pipeline.config.schema import (
    AuthSpec,
    BatchSpec,
    GatewaySpec,
    GatewayTokenSpec,
    LookupdSpec,
    NsqdSpec,
    NsqSpec,
    ProducerSpec,
    SecretSpec,
    StageSpec,
    TlsSpec,
    TopicSpec,
)
from pipeline.config.topology import Topology
from pipeline.config.types import (
    DEAD_LETTER_SUFFIX,
    KEEP_CHANNEL,
    MAX_MSG_SIZE,
    NSQ_NAME_MAX,
    RESERVED_STAGE_NAMES,
    socket_address,
    split_address,
)

__all__ = [
    "DEAD_LETTER_SUFFIX", "KEEP_CHANNEL", "MAX_MSG_SIZE", "NSQ_NAME_MAX", "RESERVED_STAGE_NAMES", "AuthSpec",
    "BatchSpec",
    "GatewaySpec", "GatewayTokenSpec", "LookupdSpec", "MonitorSpec", "NsqSpec", "NsqdSpec", "Positions",
    "ProducerSpec", "ReportSpec", "SecretSpec", "SmtpSpec", "StageSpec", "TlsSpec", "TopicSpec", "Topology",
    "load_topology", "read_positions", "socket_address", "split_address", "validate_topology",
]
