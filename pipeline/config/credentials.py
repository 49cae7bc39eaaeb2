"""Secrets named by the topology: read from an environment variable or a 0600 file.

A secret file that others may read is refused, as ssh refuses a private key
that others may read: a token anyone on the machine can see protects nothing.
Example::

    from pipeline.config.credentials import read_secret

    token = read_secret(topology.gateway.tokens["curl"].secret, topology, "gateway.tokens.curl")
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.errors import PipelineError


class SecretError(PipelineError):
    """Raised when a secret named by the topology is missing, empty, or in a file others may read."""


def resolve(topology, path: str) -> Path:
    """A path from the topology: absolute, or relative to the topology file's folder."""
    base = topology.path.parent if topology.path is not None else Path.cwd()
    return Path(os.path.abspath(base / path))


def read_secret(spec, topology, where: str) -> str:
    """Return the secret ``spec`` (a :class:`~pipeline.config.schema.SecretSpec`) names.

    Parameters:
        where: the topology field, for the error message.

    Raises:
        SecretError: the variable is unset or empty, or the file is missing, empty, or readable by others.
    """
    if spec.env is not None:
        value = os.environ.get(spec.env, "").strip()
        if not value:
            raise SecretError(f"{where}: environment variable {spec.env} is not set")
        return value
    return read_secret_file(resolve(topology, spec.file), where)


def read_secret_file(path: Path, where: str) -> str:
    """Return the stripped contents of a secret file whose mode is 0600 or stricter.

    Raises:
        SecretError: the file is missing, empty, or readable or writable by group or others.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SecretError(f"{where}: cannot read secret file {path}: {e.strerror or e}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{where}: secret file {path} has mode {stat.S_IMODE(mode):04o}; "
                          f"it must be 0600 (chmod 600 {path})")
    if not text:
        raise SecretError(f"{where}: secret file {path} is empty")
    return text


def env_name(identity: str) -> str:
    """The default environment variable of an identity's nsqd secret: ``NSQ_SECRET_<NAME>``."""
    return "NSQ_SECRET_" + identity.upper().replace("-", "_")
