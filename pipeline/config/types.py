"""Names, addresses and NSQ's limits: the constrained string types of topology.yaml and their rules.

Each type is a ``str`` with a validator and a :class:`TypeDoc`, so the schema
declares a field as ``TopicName`` or ``Address`` and ``pipeline.config.docs``
states the rule. :func:`split_address` is the one parser of ``host:port``
addresses in the pipeline. The big picture is in docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "DEAD_LETTER_SUFFIX", "KEEP_CHANNEL", "MAX_MSG_SIZE", "NSQ_NAME_MAX", "RESERVED_STAGE_NAMES", "Address",
    "ChannelName",
    "EnvName", "HandlerPath", "LocalName", "MetricsHost", "NsqdFlag", "NsqdName", "Problems", "TopicName",
    "TypeDoc", "check_address", "problem", "raise_problems", "socket_address", "split_address",
]

#: nsqd's limit on topic and channel names.
NSQ_NAME_MAX = 64
#: nsqd's default --max-msg-size: no message, dead letters included, may be longer.
MAX_MSG_SIZE = 1024 * 1024
#: A stage's dead-letter topic is its input topic followed by this.
DEAD_LETTER_SUFFIX = ".dead"
#: The durable channel that keeps the messages of a topic no stage reads (terminal and dead-letter
#: topics), so that an ephemeral channel (a tail) never takes them; read it without removing (peek).
KEEP_CHANNEL = "keep"
#: supervisord program (and log file) names the pipeline uses for itself; no stage may take them.
RESERVED_STAGE_NAMES = ("nsqd", "nsqlookupd", "nsqadmin", "restarter", "supervisord", "monitor", "auth",
                        "gateway")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_ADDRESS = re.compile(r"(\[[^\]]*\]|[^:\[\]]*):(\d+)")

#: Rules broken: (location inside the model, reason, offending value) each.
Problems = list[tuple[tuple[Any, ...], str, Any]]


@dataclass(frozen=True)
class TypeDoc:
    """How the reference docs name a constrained string type and state its rule."""

    name: str
    rule: str


def problem(reason: str) -> PydanticCustomError:
    """Return the error a validator raises for a broken rule; the loader shows ``reason`` verbatim."""
    # One error type for every rule of ours, so the loader can tell our reasons from pydantic's.
    return PydanticCustomError("topology", "{reason}", {"reason": reason})


def raise_problems(title: str, problems: Problems) -> None:
    """Raise one ValidationError holding each (loc, reason, input), so each lands on its own field."""
    if problems:
        details = [InitErrorDetails(type=problem(r), loc=loc, input=v) for loc, r, v in problems]
        raise ValidationError.from_exception_data(title, details)


def _matching(kind: str, pattern: str, rule: str, must: str = "be", then: Callable[[str], str] | None = None) -> Any:
    """Return a str type that must fully match ``pattern``; errors and docs state ``rule``.

    ``then``, if given, is a further check that runs after the match.
    """
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise problem(f"{kind} {value!r} must {must} {rule}")
        return value

    if then is None:
        return Annotated[str, AfterValidator(check), TypeDoc(kind, rule)]
    return Annotated[str, AfterValidator(check), TypeDoc(kind, rule), AfterValidator(then)]


def _not_a_dot_dir(value: str) -> str:
    # An nsqd name is a directory under var/nsqd/; these two would escape it.
    if value in (".", ".."):
        raise problem(f"nsqd name {value!r} must not be '.' or '..'")
    return value


# nsqd's own rules (protocol.IsValidTopicName / IsValidChannelName): at most 64 characters.
_NAME_RULE = "1..64 characters of a-z A-Z 0-9 . _ -"
_NSQ_NAME = r"(?=.{1,64}\Z)[.a-zA-Z0-9_-]+"
#: An NSQ topic name, as nsqd accepts it.
TopicName = _matching("topic name", _NSQ_NAME, _NAME_RULE)
#: An NSQ channel name, as nsqd accepts it.
ChannelName = _matching(
    "channel name", _NSQ_NAME + "(#ephemeral)?", _NAME_RULE + ", optionally ending in #ephemeral"
)
#: An nsqd's name; also the directory of its data under ``<var_dir>/nsqd/``.
NsqdName = _matching("nsqd name", _NSQ_NAME, _NAME_RULE, then=_not_a_dot_dir)
#: A stage, producer, token or identity name: these become supervisord program names and CLI arguments.
LocalName = _matching("name", r"[a-zA-Z0-9_-]{1,64}", "1..64 characters of a-z A-Z 0-9 _ -")
#: The name of an environment variable.
EnvName = _matching("variable", _IDENT, "a shell variable name")
#: A stage's batch function, ``package.module:function``.
HandlerPath = _matching("handler", rf"{_IDENT}(\.{_IDENT})*:{_IDENT}", "'package.module:function'", "look like")


def split_address(address: str, *, port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` (host an IPv4 address, a name, or ``[v6]``) into host and port.

    The brackets of an IPv6 host are kept, so ``f"{host}:{port}"`` rebuilds it.

    Parameters:
        address: the address, e.g. ``127.0.0.1:4150`` or ``[::1]:4150``.
        port_zero: also accept port 0, with which a listener asks the OS for a free port.

    Raises:
        ValueError: the address is malformed; the message says why.
    """
    match = _ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f"address {address!r} must be host:port, e.g. 127.0.0.1:4150")
    host, port = match.group(1), int(match.group(2))
    lowest = 0 if port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port {port} in {address!r} must be {lowest}..65535")
    if not host:
        raise ValueError(f"address {address!r} has an empty host")
    if not _valid_host(host):
        raise ValueError(f"host {host!r} in {address!r} is not an IPv4 address, host name or [IPv6]")
    return host, port


def socket_address(address: str, *, port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` as :func:`split_address` does, the host without brackets as sockets take it.

    Raises:
        ValueError: the address is malformed; the message says why.
    """
    host, port = split_address(address, port_zero=port_zero)
    return host.strip("[]"), port


def _valid_host(host: str) -> bool:
    try:
        if host.startswith("["):
            ipaddress.IPv6Address(host[1:-1])
        elif re.fullmatch(r"[0-9.]+", host):
            ipaddress.IPv4Address(host)
        elif not _HOSTNAME.fullmatch(host):
            return False
    except ValueError:
        return False
    return True


def check_address(value: str) -> str:
    """Validate a ``host:port`` field; a malformed one fails with the reason :func:`split_address` gives."""
    try:
        split_address(value)
    except ValueError as e:
        raise problem(str(e)) from e
    return value


#: A ``host:port`` address, checked by :func:`split_address`.
Address = Annotated[str, AfterValidator(check_address), TypeDoc("address", "host:port, port 1..65535")]


def _metrics_host(value: str) -> str:
    host = f"[{value}]" if ":" in value else value
    if not _valid_host(host):
        raise problem(f"host {value!r} is not an IPv4 address, host name or IPv6 address")
    return value


#: A host to listen on, an IPv6 address without brackets.
MetricsHost = Annotated[str, AfterValidator(_metrics_host),
                        TypeDoc("host", "an IPv4 address, host name or IPv6 address")]


def _nsqd_flag(value: str) -> str:
    if not re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", value):
        raise problem(f"nsqd flag {value!r} must look like --name or --name=value")
    return value


#: An extra nsqd command-line flag, ``--name`` or ``--name=value``.
NsqdFlag = Annotated[str, AfterValidator(_nsqd_flag)]

