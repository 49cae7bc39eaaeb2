"""The one hierarchy of errors raised by nsq-pipeline.

Every class says when it is raised. Errors that carry a user's input keep it
as an attribute, so a caller can report or dead-letter the exact payload.
"""
from __future__ import annotations

import os
import sysconfig
import traceback
from collections.abc import Sequence
from pathlib import Path


class PipelineError(Exception):
    """Base class for every error raised by nsq-pipeline."""


class TopologyError(PipelineError):
    """Raised when a topology file cannot be read or breaks the schema.

    ``str(error)`` reads ``PATH:LINE:COL: dotted.field: reason``, the form
    editors and CI annotations understand.
    """

    def __init__(self, path: str, line: int, col: int, field: str, reason: str):
        self.path, self.line, self.col = path, line, col
        self.field, self.reason = field, reason
        where = f"{field}: " if field else ""
        super().__init__(f"{path}:{line}:{col}: {where}{reason}")


class DecodeError(PipelineError):
    """Raised when a message body is neither a JSON object nor a msgpack map."""

    def __init__(self, reason: str, body: bytes):
        super().__init__(reason)
        self.reason = reason
        self.body = body


class InstallError(PipelineError):
    """Raised when the NSQ binaries can be neither found, built nor downloaded."""


class ProcessError(PipelineError):
    """Raised when a local NSQ process fails to start or to answer /ping in time."""


class PublishError(PipelineError):
    """Raised when nsqd refuses a publish, the connection drops, or no OK arrives in time."""


class PublishRefused(PublishError):
    """Raised when nsqd answered a publish with an error frame (the node is up but said no)."""


class ChannelNotFound(PipelineError):
    """Raised when a look at a topic's queued messages finds the channel it would read on no nsqd."""


class ComposeError(PipelineError):
    """Raised when a topology cannot be rendered as a compose deployment (an address is not a service name)."""


class HandlerLoadError(PipelineError):
    """Raised when a stage's ``handler`` import path does not name a callable."""


class StageOutputError(PipelineError):
    """Raised when a handler returns anything but a mapping of its stage's declared outputs to records.

    ``kind`` names the problem, so it can be reported once per kind:
    ``"none"`` (the handler returned None), ``"not_mapping"`` (a list, a
    tuple ...), ``"undeclared_output"`` (a key that is not an output of the
    stage) or ``"bad_value"`` (an output's value is neither a list of records
    nor ``Columns``). ``columnar`` is set when the stage's columnar function
    returned it.
    """

    def __init__(self, reason: str, kind: str = "undeclared_output", *, columnar: bool = False):
        super().__init__(reason)
        self.reason, self.kind, self.columnar = reason, kind, columnar


class StageStateError(PipelineError):
    """Raised when a keyed stage's atomic columnar call failed (raised, or emitted what cannot be published)
    after it may have changed the stage's state: the replica rewinds to its last checkpoint."""


class GatewayError(PipelineError):
    """Raised when the gateway must refuse a request; ``status`` and ``error`` form the HTTP answer."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = headers or {}


def user_frame(frames: Sequence[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The deepest frame outside the standard library, the installed packages and ``pipeline``, else the deepest."""
    paths = sysconfig.get_paths()
    folders = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")] + [str(Path(__file__).parent)]
    others = tuple({os.path.join(os.path.realpath(folder), "") for folder in folders})
    files = [f for f in frames if not f.filename.startswith("<")]
    user = [f for f in files if not os.path.realpath(f.filename).startswith(others)]
    chosen = user or files
    return chosen[-1] if chosen else None
