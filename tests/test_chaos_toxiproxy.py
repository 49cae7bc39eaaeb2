"""Toxiproxy as the project installs and runs it: pinned build, 127.0.0.1 only, proxies and toxics on real nsqd."""
from __future__ import annotations

from pathlib import Path

import pytest

from chaos.toxiproxy import ToxiproxyServer
from pipeline.errors import PublishError
from pipeline.ops.install_toxiproxy import TOXIPROXY_TOOLS, TOXIPROXY_VERSION, install_toxiproxy, toxiproxy_version
from pipeline.client.nsqclient import NsqPublisher
from pipeline.ops.processes import free_port, listen_addresses, pid_alive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def toxiproxy_bin() -> Path:
    return install_toxiproxy(log=lambda line: None)


def test_install_is_pinned_and_idempotent(toxiproxy_bin: Path) -> None:
    lines: list[str] = []
    install_toxiproxy(toxiproxy_bin, log=lines.append)
    assert lines == [f"{name} {TOXIPROXY_VERSION} already installed" for name in TOXIPROXY_TOOLS]
    for name in TOXIPROXY_TOOLS:
        assert toxiproxy_version(toxiproxy_bin / name) == TOXIPROXY_VERSION


def test_proxy_and_toxics_between_a_client_and_nsqd(toxiproxy_bin: Path, nsqd, topic: str, tmp_path: Path) -> None:
    # Given toxiproxy on a free port with one proxy in front of nsqd
    server = ToxiproxyServer.start(tmp_path / "toxiproxy.log")
    try:
        listen = f"127.0.0.1:{free_port()}"
        server.create_proxy("nsqd", listen=listen, upstream=nsqd.tcp)
        assert all(a.startswith("127.0.0.1:") for a in listen_addresses(server.pid))
        # When publishing through it, it reaches nsqd
        with NsqPublisher(listen, timeout=5) as pub:
            pub.mpub(topic, [b'{"n": 1}'])
        # When the proxy is down, a client cannot publish
        server.set_enabled("nsqd", False)
        with pytest.raises(PublishError):
            with NsqPublisher(listen, timeout=2) as pub:
                pub.mpub(topic, [b'{"n": 2}'])
        # When a toxic is added it is listed, and reset removes it and enables the proxy again
        server.add_toxic("nsqd", "slow", "latency", {"latency": 50, "jitter": 10})
        assert [t["name"] for t in server.toxics("nsqd")] == ["slow"]
        server.reset()
        assert server.toxics("nsqd") == [] and server.proxies()["nsqd"]["enabled"]
        with NsqPublisher(listen, timeout=5) as pub:
            pub.mpub(topic, [b'{"n": 3}'])
    finally:
        server.stop()
    assert not pid_alive(server.pid)
