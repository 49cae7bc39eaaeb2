"""Toxiproxy for the chaos harness: the server process and a small client of its HTTP API.

The server listens on 127.0.0.1 (API and proxies). Each proxy forwards one
listen address to one upstream; toxics (latency, bandwidth, timeout,
reset_peer, limit_data, ...) degrade a proxy's traffic, and disabling a proxy
closes its connections and refuses new ones. Example::

    server = ToxiproxyServer.start(log_path)
    server.create_proxy("nsqd-n0", listen="127.0.0.1:5150", upstream="127.0.0.1:4150")
    server.add_toxic("nsqd-n0", "slow", "latency", {"latency": 200, "jitter": 100})
    server.reset()          # every toxic removed, every proxy enabled
    server.stop()
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ProcessError
from pipeline.ops.install_toxiproxy import toxiproxy_binary
from pipeline.ops.processes import free_port, stop_pid

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
START_TIMEOUT = 10.0


class ToxiproxyError(ProcessError):
    """Raised when the Toxiproxy API cannot be reached or refuses a request."""


@dataclass
class ToxiproxyServer:
    """A running toxiproxy-server started by :meth:`start`; stop it with :meth:`stop`."""

    api: str
    pid: int
    popen: subprocess.Popen | None = None

    @classmethod
    def start(cls, log_path: Path, timeout: float = START_TIMEOUT) -> ToxiproxyServer:
        """Start toxiproxy-server on a free 127.0.0.1 port and wait until its API answers.

        Raises:
            ToxiproxyError: it exits or does not answer within ``timeout`` seconds (it is stopped then).
        """
        port = free_port()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen([toxiproxy_binary("toxiproxy-server"), "-host", "127.0.0.1", "-port", str(port)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        server = cls(f"127.0.0.1:{port}", popen.pid, popen)
        deadline = time.monotonic() + timeout
        while True:
            try:
                server.request("GET", "/version")
                return server
            except ToxiproxyError:
                if popen.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise ToxiproxyError(f"toxiproxy-server did not answer on {server.api} (log: {log_path})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (its proxies close with it)."""
        code = stop_pid(self.pid, grace=5)
        if self.popen is not None and code is not None:
            self.popen.returncode = code

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """Send one API request; return the decoded JSON answer (None when empty)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.api}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _LOCAL.open(req, timeout=5) as resp:
                text = resp.read()
        except urllib.error.HTTPError as e:
            raise ToxiproxyError(f"toxiproxy {method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from e
        except OSError as e:
            raise ToxiproxyError(f"toxiproxy {method} {path}: {e}") from e
        return json.loads(text) if text.strip() else None

    def create_proxy(self, name: str, *, listen: str, upstream: str) -> None:
        """Create proxy ``name`` forwarding ``listen`` to ``upstream``."""
        self.request("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": True})

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Enable a proxy, or disable it: its connections are closed and new ones refused."""
        self.request("POST", f"/proxies/{name}", {"enabled": enabled})

    def add_toxic(self, proxy: str, name: str, kind: str, attributes: dict[str, Any], *,
                  stream: str = "downstream", toxicity: float = 1.0) -> None:
        """Add toxic ``name`` of type ``kind`` (latency, bandwidth, timeout, reset_peer, limit_data, ...)."""
        self.request("POST", f"/proxies/{proxy}/toxics", {"name": name, "type": kind, "stream": stream,
                                                          "toxicity": toxicity, "attributes": attributes})

    def remove_toxic(self, proxy: str, name: str) -> None:
        """Remove toxic ``name`` from ``proxy``."""
        self.request("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def toxics(self, proxy: str) -> list[dict]:
        """The toxics currently on ``proxy``."""
        return self.request("GET", f"/proxies/{proxy}/toxics") or []

    def proxies(self) -> dict[str, dict]:
        """Every proxy, by name, with its listen/upstream address and whether it is enabled."""
        return self.request("GET", "/proxies") or {}

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self.request("POST", "/reset")
