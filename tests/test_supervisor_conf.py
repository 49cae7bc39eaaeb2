"""Rendering supervisord's configuration from the topology."""
from __future__ import annotations

import configparser
from pathlib import Path

from pipeline.ops.supervisor_conf import conf_path, render
from pipeline.config import load_topology

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


def test_nsqd_behind_a_proxy_advertises_the_proxy(tmp_path) -> None:
    # A chaos run routes clients through Toxiproxy: lookupd must hand out the proxy's port,
    # clients use it, and nsqd still listens on its own address with the extra flags last.
    import yaml

    from pipeline.ops.supervisor_conf import render
    from pipeline.config import load_topology
    doc = {"nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:7150", "http": "127.0.0.1:7151",
                             "proxy_tcp": "127.0.0.1:7250", "args": ["--mem-queue-size=0"]}]}}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    topology = load_topology(path)
    command = next(line for line in render(topology).splitlines() if "nsqd\"" in line and line.startswith("command="))
    assert "--tcp-address=127.0.0.1:7150" in command
    assert command.endswith("--node-id=0 --broadcast-tcp-port=7250 --mem-queue-size=0")
    assert command.count("--broadcast-address=127.0.0.1") == 1
    assert topology.nsqd_tcp_addresses() == ["127.0.0.1:7250"]


def test_nsqd_args_must_be_flags(tmp_path) -> None:
    import pytest
    import yaml

    from pipeline.errors import TopologyError
    from pipeline.config import load_topology
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({"nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:7150",
                                                       "http": "127.0.0.1:7151", "args": ["rm -rf"]}]}}))
    with pytest.raises(TopologyError, match=r"nsq\.nsqd\.0\.args\.0: nsqd flag 'rm -rf' must look like"):
        load_topology(path)


def test_a_proxy_address_may_not_be_another_listener(tmp_path) -> None:
    import pytest
    import yaml

    from pipeline.errors import TopologyError
    from pipeline.config import load_topology
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({"nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:7150", "http": "127.0.0.1:7151",
                                                       "proxy_tcp": "127.0.0.1:7151"}]}}))
    with pytest.raises(TopologyError, match=r"nsq\.nsqd\.0\.proxy_tcp: address 127\.0\.0\.1:7151 is already used by "
                                            r"nsq\.nsqd\.0\.http"):
        load_topology(path)


def _nsqd_commands(tmp_path, nsq: dict) -> tuple[list[str], list[list[str]]]:
    """The nsqd command lines of a topology with ``nsq``: as supervisord.conf and the compose file give them."""
    import yaml

    from pipeline.ops.compose import render_compose
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({"nsq": nsq}))
    topology = load_topology(path)
    conf = [line for line in render(topology).splitlines() if "nsqd\"" in line and line.startswith("command=")]
    services = yaml.safe_load(render_compose(topology))["services"]
    return conf, [services[node.name]["command"] for node in topology.nsq.nsqd]


def test_a_durable_nsq_starts_every_nsqd_with_no_memory_queue_and_its_sync_policy(tmp_path) -> None:
    from pipeline.config.schema import DURABILITY_FLAGS
    durable = DURABILITY_FLAGS["durable"]
    assert durable[0] == "--mem-queue-size=0" and {f.partition("=")[0] for f in durable[1:]} == {
        "--sync-every", "--sync-timeout"}
    nodes = [{"name": f"nsqd-{i}", "tcp": f"nsqd-{i}:4150", "http": f"nsqd-{i}:4151"} for i in range(2)]
    conf, compose = _nsqd_commands(tmp_path, {"nsqd": nodes, "durability": "durable"})
    assert len(conf) == 2 and all(line.endswith(" ".join(durable)) for line in conf)
    assert all(command[-len(durable):] == list(durable) for command in compose)
    # nsqd's defaults otherwise: no flag of the profile appears
    conf, compose = _nsqd_commands(tmp_path, {"nsqd": nodes})
    assert not any(flag.partition("=")[0] in line for flag in durable for line in conf + [" ".join(compose[0])])


def test_an_nsqds_args_replace_the_profiles_flag_of_the_same_name(tmp_path) -> None:
    node = {"name": "nsqd-0", "tcp": "nsqd-0:4150", "http": "nsqd-0:4151", "args": ["--sync-every=1"]}
    conf, [compose] = _nsqd_commands(tmp_path, {"nsqd": [node], "durability": "durable"})
    from pipeline.config.schema import DURABILITY_FLAGS
    timeout = next(f for f in DURABILITY_FLAGS["durable"] if f.startswith("--sync-timeout="))
    assert conf[0].endswith(f"--mem-queue-size=0 {timeout} --sync-every=1")
    assert compose[-3:] == ["--mem-queue-size=0", timeout, "--sync-every=1"]
    assert " ".join(compose).count("--sync-every") == 1


def test_a_memory_queue_under_a_durable_nsq_is_refused_with_its_line(tmp_path) -> None:
    import pytest

    from pipeline.errors import TopologyError
    path = tmp_path / "topology.yaml"
    path.write_text("nsq:\n"
                    "  durability: durable\n"
                    "  nsqd:\n"
                    "    - {name: n0, tcp: 127.0.0.1:7150, http: 127.0.0.1:7151, args: [--mem-queue-size=0]}\n"
                    "    - {name: n1, tcp: 127.0.0.1:7250, http: 127.0.0.1:7251,\n"
                    "       args: [--sync-every=1, --mem-queue-size=100]}\n")
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(info.value) == (f"{path}:6:31: nsq.nsqd.1.args.1: --mem-queue-size=100 keeps messages in memory, "
                               "against durability: durable (--mem-queue-size=0); remove it, or set "
                               "nsq.durability: default")
    assert "\n" not in str(info.value)
