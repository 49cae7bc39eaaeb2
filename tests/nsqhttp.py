"""Small helpers for tests that talk to a real nsqd or nsqlookupd over HTTP.

``http`` arguments are ``host:port`` strings, as in ``NsqProcess.http``.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

# Ignore *_proxy variables: a proxy would answer in nsqd's place.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TIMEOUT = 5.0


def get_json(http: str, path: str) -> Any:
    """GET ``http://<http><path>`` and decode its JSON body."""
    with _LOCAL.open(f"http://{http}{path}", timeout=TIMEOUT) as response:
        return json.load(response)


def get_text(http: str, path: str) -> tuple[int, str]:
    """GET ``http://<http><path>``; return ``(status, body text)``, error statuses included."""
    try:
        with _LOCAL.open(f"http://{http}{path}", timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stats(http: str) -> dict:
    """Return nsqd's ``/stats?format=json`` document (``topics``, ``producers``, ...)."""
    return get_json(http, "/stats?format=json")


def topic_stats(http: str, topic: str) -> dict | None:
    """Return the stats of ``topic`` on nsqd at ``http``, or None if nsqd has no such topic."""
    quoted = urllib.parse.quote(topic)
    topics = get_json(http, f"/stats?format=json&topic={quoted}").get("topics") or []
    return next((t for t in topics if t["topic_name"] == topic), None)


def channel_stats(http: str, topic: str, channel: str) -> dict | None:
    """Return the stats of ``channel`` of ``topic`` (``depth``, ``in_flight_count`` ...), or None."""
    found = topic_stats(http, topic)
    channels = (found or {}).get("channels") or []
    return next((c for c in channels if c["channel_name"] == channel), None)


def http_pub(http: str, topic: str, body: bytes) -> tuple[int, str]:
    """POST ``body`` to nsqd's ``/pub?topic=<topic>``; return ``(status, response text)``, errors included."""
    url = f"http://{http}/pub?topic={urllib.parse.quote(topic)}"
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with _LOCAL.open(request, timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def lookupd_nodes(http: str) -> list[dict]:
    """Return the producers nsqlookupd at ``http`` knows (its ``/nodes``)."""
    return get_json(http, "/nodes").get("producers") or []


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, message: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; fail the test at ``timeout``.

    Raises:
        AssertionError: with ``message`` (and the last value seen) if ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or "condition not met"
            raise AssertionError(f"{what} (after {timeout:g} s; last value {value!r})")
        time.sleep(interval)
