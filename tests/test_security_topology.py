"""The topology's gateway, auth and tls sections: each rule broken gives FILE:LINE:COL: field: reason."""
from __future__ import annotations

import textwrap

import pytest

from pipeline.errors import TopologyError
from pipeline.topology import load_topology

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
