"""Rendering supervisord's configuration from the topology."""
from __future__ import annotations

import configparser
from pathlib import Path

from pipeline.supervisor_conf import conf_path, render
from pipeline.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent


def test_committed_supervisord_conf_is_the_render_of_topology_yaml():
    expected = render(load_topology(ROOT / "topology.yaml"))
    assert (ROOT / "supervisord.conf").read_text() == expected, \
        "supervisord.conf is stale; regenerate it with: pipeline render -o supervisord.conf"


def _parse(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return parser


def test_render_has_what_operations_rely_on():
    conf = _parse(render(load_topology(ROOT / "topology.yaml")))
    assert conf["unix_http_server"]["chmod"] == "0700"
    assert "inet_http_server" not in conf
    nsqd = conf["program:nsqd-n0"]
    assert nsqd["stopsignal"] == "TERM" and int(nsqd["stopwaitsecs"]) >= 30
    primes = conf["program:primes"]
    assert primes["numprocs"] == "2" and primes["process_name"] == "%(program_name)s-%(process_num)d"
    assert primes["autorestart"] == "true" and primes["killasgroup"] == "true" and primes["stopsignal"] == "TERM"
    assert int(primes["stopwaitsecs"]) > 10 + 2 + 2  # above the drain deadline (publish_timeout + waits)
    assert conf["eventlistener:restarter"]["events"] == "PROCESS_STATE"
    assert "--lookupd-http-address=127.0.0.1:4161" in conf["program:nsqadmin"]["command"]
    for section in conf.sections():
        if section.startswith(("program:", "eventlistener:")):
            assert "/work/" not in conf[section]["command"], "the render must not depend on this checkout"


def test_conf_lives_beside_its_topology(tmp_path):
    assert conf_path(tmp_path / "topology.yaml") == tmp_path / "supervisord.conf"
    assert conf_path(tmp_path / "prod.yaml") == tmp_path / "prod.supervisord.conf"
