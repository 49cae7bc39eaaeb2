"""The topology's gateway, auth and tls sections: each rule broken gives FILE:LINE:COL: field: reason."""
from __future__ import annotations

import textwrap

import pytest

from pipeline.errors import TopologyError
from pipeline.config import load_topology

BASE = textwrap.dedent("""\
    nsq:
      nsqd: [{name: n0, tcp: 127.0.0.1:4150, http: 127.0.0.1:4151}]
    topics:
      numbers: {schema: {number: integer}}
      ticks: {partitions: 2, key: symbol}
    stages: {}
    producers:
      numbers: {topic: numbers}
    """)

CASES = [
    ("token-topic-undeclared", "gateway:\n  http: 127.0.0.1:4180\n  tokens:\n    a: {secret: {env: T}, topics: [nope]}\n",
     "topology.yaml:12:36: gateway.tokens.a.topics.0: topic 'nope' is not declared under topics "
     "(declared: numbers, ticks)"),
    ("token-topic-partitioned", "gateway:\n  http: 127.0.0.1:4180\n  tokens:\n    a: {secret: {env: T}, topics: [ticks]}\n",
     "topology.yaml:12:36: gateway.tokens.a.topics.0: topic 'ticks' is partitioned; the gateway publishes to single "
     "topics only (an /mpub across partitions could not be all-or-nothing)"),
    ("secret-env-and-file", "gateway:\n  http: 127.0.0.1:4180\n  tokens:\n    a: {secret: {env: T, file: x}, topics: [numbers]}\n",
     "topology.yaml:12:17: gateway.tokens.a.secret: give exactly one of env and file"),
    ("secret-bad-variable", "gateway:\n  http: 127.0.0.1:4180\n  tokens:\n    a: {secret: {env: 1T}, topics: [numbers]}\n",
     "topology.yaml:12:23: gateway.tokens.a.secret.env: variable '1T' must be a shell variable name"),
    ("schema-unknown-type", None,
     "topology.yaml:4:30: topics.numbers.schema.number: must be one of: string, integer, number, boolean, "
     "object, array"),
    ("auth-unknown-identity", "auth:\n  http: 127.0.0.1:4181\n  secrets:\n    nobody: {env: X}\n",
     "topology.yaml:12:13: auth.secrets.nobody: 'nobody' is no identity; expected one of: gateway, numbers, tail"),
    ("tls-half-client-cert", "tls: {cert: c, key: k, root_ca_file: ca, client_cert: cc}\n",
     "topology.yaml:9:55: tls.client_cert: give client_cert and client_key together"),
    ("tls-verify-without-client-cert", "tls: {cert: c, key: k, root_ca_file: ca, client_auth_policy: require-verify}\n",
     "topology.yaml:9:62: tls.client_auth_policy: client_auth_policy require-verify needs client_cert and client_key"),
]


@pytest.mark.parametrize("extra, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_security_sections_name_line_column_and_field(tmp_path, extra, expected):
    text = BASE.replace("integer", "int") if extra is None else BASE + extra
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError) as error:
        load_topology(path)
    assert str(error.value).replace(str(tmp_path) + "/", "") == expected


def test_sections_load_with_their_defaults(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(BASE + "gateway:\n  http: 127.0.0.1:4180\n  tokens:\n    a: {secret: {file: tok}, topics: [numbers]}\n"
                    "auth: {http: 127.0.0.1:4181}\ntls: {cert: c, key: k, root_ca_file: ca}\n")
    topology = load_topology(path)
    assert topology.topics["numbers"].schema_ == {"number": "integer"}
    assert (topology.gateway.max_msg_size, topology.gateway.max_body_size) == (1048576, 5242880)
    assert (topology.auth.ttl, topology.tls.required, topology.tls.min_version) == (3600, True, "tls1.2")


def check(tmp_path, text: str):
    import subprocess
    import sys
    from pathlib import Path
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "check", "-t", str(path)], cwd=root,
                          capture_output=True, text=True, timeout=60)


EXPOSED = textwrap.dedent("""\
    nsq:
      nsqd: [{name: n0, tcp: 0.0.0.0:4150, http: 127.0.0.1:4151}]
      lookupd: [{tcp: 10.1.2.3:4160, http: 127.0.0.1:4161}]
      admin: 0.0.0.0:4171
    topics: {numbers: {}}
    """)


def test_check_warns_about_every_exposed_listener_without_protection(tmp_path):
    result = check(tmp_path, EXPOSED)
    assert result.returncode == 0 and result.stdout.strip().endswith("topology.yaml: ok")
    warnings = [line.split(": warning: ", 1)[1] for line in result.stderr.strip().splitlines()]
    assert warnings == [
        "nsq.nsqd.0.tcp 0.0.0.0:4150 is not loopback and has no TLS or auth",
        "nsq.lookupd.0.tcp 10.1.2.3:4160 is not loopback: nsqlookupd has no authentication",
        "nsq.admin 0.0.0.0:4171 is not loopback: nsqadmin treats every visitor as an admin; put it behind an "
        "authenticating proxy (docs/SECURITY.md)",
    ]


def test_check_is_quiet_when_exposed_nsqd_has_tls_and_auth(tmp_path):
    text = EXPOSED.replace("  lookupd: [{tcp: 10.1.2.3:4160, http: 127.0.0.1:4161}]\n", "").replace(
        "  admin: 0.0.0.0:4171\n", "")
    text += "auth: {http: 127.0.0.1:4181}\ntls: {cert: c, key: k, root_ca_file: ca}\n"
    result = check(tmp_path, text)
    assert (result.returncode, result.stderr) == (0, "")


def test_check_of_the_default_topology_has_no_warning():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "check"], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def test_rendered_config_runs_the_gateway_processes_on_one_port(tmp_path):
    from pipeline.ops.supervisor_conf import render
    path = tmp_path / "topology.yaml"
    path.write_text(BASE + "gateway:\n  http: 127.0.0.1:4180\n  processes: 3\n  tokens:\n"
                           "    a: {secret: {env: T}, topics: [numbers]}\n")
    section = render(load_topology(path)).split("[program:gateway]\n")[1].split("\n\n")[0]
    assert '-m pipeline.cli gateway -t "%(here)s/topology.yaml"' in section
    assert "numprocs=3" in section and "process_name=%(program_name)s-%(process_num)d" in section
    assert "stdout_logfile=%(here)s/var/log/%(program_name)s-%(process_num)d.log" in section


@pytest.mark.parametrize("name", ["auth", "gateway", "gateway-2"])
def test_stage_cannot_take_the_name_of_the_edge_programs(tmp_path, name):
    path = tmp_path / "topology.yaml"
    path.write_text(BASE.replace("stages: {}", f"stages:\n  {name}: {{handler: 'm:f', input: numbers, channel: c}}"))
    with pytest.raises(TopologyError, match=f"stages.{name}: .*auth, gateway"):
        load_topology(path)
