"""Small client for nsqd's HTTP API: topic/channel creation, stats, /pub."""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
#: Seconds the other nodes get to answer once one node created a consumer's channel.
PATIENCE = 0.5


class NsqdHTTPError(PipelineError):
    """Raised when nsqd's HTTP API cannot be reached or answers with an error."""


def request(http: str, path: str, params: dict[str, str] | None = None, *,
            body: bytes | None = None, method: str = "POST", timeout: float = 5.0) -> bytes:
    """Send one request to nsqd's HTTP API at ``http`` (host:port) and return the body."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    req = urllib.request.Request(f"http://{http}{path}{query}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        raise NsqdHTTPError(f"nsqd {http}{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e
    except OSError as e:
        raise NsqdHTTPError(f"nsqd {http}{path}: {e}") from e


def create_channel(http: str, topic: str, channel: str) -> None:
    """Create ``topic`` and its ``channel`` so messages published before a consumer connects wait for it."""
    request(http, "/topic/create", {"topic": topic})
    request(http, "/channel/create", {"topic": topic, "channel": channel})


def create_topic(http: str, topic: str) -> None:
    """Create ``topic`` (no-op when it exists)."""
    request(http, "/topic/create", {"topic": topic})


def stats(http: str, topic: str | None = None) -> dict[str, Any]:
    """Return nsqd's ``/stats?format=json`` (only ``topic`` when given)."""
    params = {"format": "json"}
    if topic:
        params["topic"] = topic
    return json.loads(request(http, "/stats", params, method="GET"))


def topic_stats(http: str, topic: str) -> dict[str, Any] | None:
    """nsqd's ``/stats`` of ``topic`` (its ``depth``, ``channels`` ...), or None when nsqd has no such topic."""
    return next((t for t in stats(http, topic).get("topics") or [] if t["topic_name"] == topic), None)


def topic_message_count(http: str, topic: str) -> int:
    """Messages nsqd has accepted on ``topic`` since it started (0 if it does not exist)."""
    for t in stats(http, topic).get("topics") or []:
        if t["topic_name"] == topic:
            return int(t["message_count"])
    return 0


def channel_backlog(http: str, topic: str, channel: str) -> int:
    """Messages of ``topic/channel`` nsqd still holds for delivery: queued, on disk or deferred (0 if none)."""
    for t in stats(http, topic).get("topics") or []:
        if t["topic_name"] != topic:
            continue
        for c in t.get("channels") or []:
            if c["channel_name"] == channel:
                return int(c["depth"]) + int(c["backend_depth"]) + int(c["deferred_count"])
    return 0


def create_channel_on_nodes(https: list[str], topic: str, channel: str, *,
                            patience: float | None = PATIENCE) -> list[str]:
    """Create ``topic`` and ``channel`` on every nsqd that answers; return the nodes that did not.

    The nodes are asked at once, so a node that does not answer (SIGSTOPped,
    or its machine gone: the request waits for its timeout) does not hold
    back a consumer that can read the others: once one node has the channel,
    the rest get ``patience`` seconds more (None: until each answers or times
    out), and a node still silent then is left to its request, which ends in
    the background. A node left out loses nothing: its channel was persisted
    with its metadata if it existed, and a consumer's SUB creates it otherwise.

    Raises:
        NsqdHTTPError: no node could be reached (the last node's error).
    """
    pool = ThreadPoolExecutor(max_workers=max(1, len(https)), thread_name_prefix="nsqd-create")
    pending = {pool.submit(create_channel, http, topic, channel): http for http in https}
    pool.shutdown(wait=False)
    created, errors = 0, {}
    deadline: float | None = None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        if not done:
            break  # patience over: the nodes still silent are left to their requests
        for future in done:
            http = pending.pop(future)
            error = future.exception()
            if error is None:
                created += 1
                if deadline is None and patience is not None:
                    deadline = time.monotonic() + patience
            elif isinstance(error, NsqdHTTPError):
                errors[http] = error
            else:
                raise error
    if errors and not created:
        raise list(errors.values())[-1]
    for http, error in errors.items():
        log.warning("cannot create %s/%s on nsqd %s (down?): %s", topic, channel, http, error)
    for http in pending.values():
        log.warning("cannot create %s/%s on nsqd %s: no answer within %gs of the others' (stopped?); going on "
                    "without it", topic, channel, http, patience)
    return [http for http in https if http in errors or http in pending.values()]
