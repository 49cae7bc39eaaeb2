"""``pipeline auth-server`` behind a real nsqd (``--auth-http-address``): what each identity may do.

One auth server and one nsqd serve the module; nsqd itself decides every case
from the auth server's answers, so the grants are checked against nsqd's real
behaviour, not against our reading of its protocol.
"""
from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from harness import Workers
from nsqhttp import channel_stats, wait_until
from pipeline.client import nsqd_http
from pipeline.edge.authserver import authorizations
from pipeline.records.codecs import decode, encode_json
from pipeline.errors import PublishError
from pipeline.client.nsqclient import NsqPublisher, NsqSubscriber
from pipeline.ops.processes import NsqProcess, free_port, start_nsqd, start_process
from pipeline.config.security import ClientSecurity
from pipeline.observe.tail import tail_channel
from pipeline.config import load_topology

SECRETS = {"primes": "s-primes-" + "1" * 20, "numbers": "s-numbers-" + "2" * 20, "tail": "s-tail-" + "3" * 20,
           "gateway": "s-gateway-" + "4" * 20}
GATEWAY_TOKEN = "t-" + "5" * 30


@dataclass
class Secured:
    """The auth server, the nsqd that asks it, and the topology both were started from."""

    auth: NsqProcess
    nsqd: NsqProcess
    path: Path
    topics: dict[str, str]


def write_topology(tmp: Path, tcp: str, http: str, auth: str, topics: dict[str, str]) -> Path:
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": tcp, "http": http}], "var_dir": str(tmp / "var")},
        "topics": {topics["input"]: {}, topics["prime"]: {}, topics["non_prime"]: {}},
        "stages": {"primes": {"handler": "consumers.primes:classify", "input": topics["input"], "channel": "primes",
                              "outputs": {"prime": topics["prime"], "non_prime": topics["non_prime"]},
                              "replicas": 1, "batch": {"size": 16, "wait_ms": 5}}},
        "producers": {"numbers": {"topic": topics["input"]}},
        "auth": {"http": auth, "ttl": 60},
        "gateway": {"http": f"127.0.0.1:{free_port()}",
                    "tokens": {"t": {"secret": {"env": "GW_AUTH_TOKEN"}, "topics": [topics["input"]]}}},
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def secured(nsq_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    name = f"a_{uuid.uuid4().hex[:8]}"
    topics = {"input": name, "prime": f"{name}_prime", "non_prime": f"{name}_non_prime"}
    tcp, http, auth = (f"127.0.0.1:{free_port()}" for _ in range(3))
    path = write_topology(tmp, tcp, http, auth, topics)
    env = {f"NSQ_SECRET_{k.upper()}": v for k, v in SECRETS.items()}
    os.environ.update(env)
    try:
        server = start_process("auth", [sys.executable, "-m", "pipeline.cli", "auth-server", "-t", str(path)],
                               http=auth, log_path=tmp / "auth.log")
    finally:
        for key in env:
            del os.environ[key]
    try:
        nsqd = start_nsqd(tmp / "nsqd", tcp=tcp, http=http, extra=[f"--auth-http-address={auth}"])
    except BaseException:
        server.stop()
        raise
    for topic in topics.values():
        nsqd_http.create_topic(nsqd.http, topic)
    yield Secured(server, nsqd, path, topics)
    nsqd.stop()
    server.stop()
    assert not nsqd.alive() and not server.alive()


def as_(identity: str | None, secret: str | None = None) -> ClientSecurity:
    return ClientSecurity(secret=secret or (SECRETS[identity] if identity else None))


def test_grants_are_anchored_and_cover_partitions_outputs_and_dead_letters(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump({
        "nsq": {"nsqd": [{"name": "n0", "tcp": "127.0.0.1:1", "http": "127.0.0.1:2"}]},
        "topics": {"ticks": {"partitions": 2, "key": "symbol"}, "a.b": {}},
        "stages": {"s": {"handler": "m:f", "input": "ticks", "channel": "c", "outputs": ["a.b"], "keyed": True,
                         "replicas": 2}},
        "producers": {"ticks": {"topic": "ticks"}},
        "auth": {"http": "127.0.0.1:3"}}))
    topology = load_topology(path)
    assert authorizations(topology, "s") == [
        {"topic": r"^ticks\.0$", "channels": ["^c$"], "permissions": ["subscribe"]},
        {"topic": r"^ticks\.1$", "channels": ["^c$"], "permissions": ["subscribe"]},
        {"topic": r"^a\.b$", "channels": [".*"], "permissions": ["publish"]},
        {"topic": r"^ticks\.dead$", "channels": [".*"], "permissions": ["publish"]},
    ]
    assert [g["topic"] for g in authorizations(topology, "ticks")] == [r"^ticks\.0$", r"^ticks\.1$"]
    assert authorizations(topology, "nobody") == []


@pytest.mark.integration
def test_producer_publishes_only_to_its_own_topic(secured):
    t = secured.topics
    with NsqPublisher(secured.nsqd.tcp, security=as_("numbers")) as pub:
        pub.mpub(t["input"], [b'{"number": 1}'])
    with pytest.raises(PublishError, match=r"E_UNAUTHORIZED AUTH failed for MPUB on \"" + t["prime"]):
        with NsqPublisher(secured.nsqd.tcp, security=as_("numbers")) as pub:
            pub.mpub(t["prime"], [b'{"number": 1}'])
    assert nsqd_http.topic_message_count(secured.nsqd.http, t["prime"]) == 0


@pytest.mark.integration
def test_wrong_or_missing_secret_cannot_sub_or_publish(secured):
    t = secured.topics
    with pytest.raises(PublishError, match="AUTH refused by nsqd.*E_AUTH_FAILED"):
        NsqSubscriber(secured.nsqd.tcp, t["input"], "primes", security=as_(None, "not-a-secret"))
    with pytest.raises(PublishError, match="E_AUTH_FIRST"):  # no AUTH at all
        NsqSubscriber(secured.nsqd.tcp, t["input"], "primes")
    with pytest.raises(PublishError, match="E_AUTH_FIRST"):
        with NsqPublisher(secured.nsqd.tcp) as pub:
            pub.mpub(t["input"], [b"{}"])


@pytest.mark.integration
def test_stage_subscribes_to_its_channel_and_publishes_to_outputs_and_dead_letters_only(secured):
    t = secured.topics
    NsqSubscriber(secured.nsqd.tcp, t["input"], "primes", security=as_("primes")).close()
    with pytest.raises(PublishError, match="E_UNAUTHORIZED"):
        NsqSubscriber(secured.nsqd.tcp, t["input"], "other", security=as_("primes"))
    with pytest.raises(PublishError, match="E_UNAUTHORIZED"):
        NsqSubscriber(secured.nsqd.tcp, t["prime"], "primes", security=as_("primes"))
    with NsqPublisher(secured.nsqd.tcp, security=as_("primes")) as pub:
        pub.mpub(t["prime"], [b"{}"])
        pub.mpub(t["input"] + ".dead", [b"{}"])
    with pytest.raises(PublishError, match="E_UNAUTHORIZED"):
        with NsqPublisher(secured.nsqd.tcp, security=as_("primes")) as pub:
            pub.mpub(t["input"], [b"{}"])  # its own input: it would feed itself


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_worker_with_its_secret_runs_and_one_with_a_wrong_secret_never_subscribes(secured, monkeypatch):
    t = secured.topics
    run = uuid.uuid4().hex[:6]
    # Given a tail reading the outputs (ephemeral channels: subscribed before anything is published)
    readers = [NsqSubscriber(secured.nsqd.tcp, t[k], tail_channel(), security=as_("tail")) for k in ("prime", "non_prime")]
    # When a worker starts with a wrong secret, it cannot subscribe
    monkeypatch.setenv("NSQ_SECRET_PRIMES", "wrong-" + "9" * 20)
    wrong = Workers(secured.path)
    wrong.start(0)
    try:
        wait_until(lambda: "E_AUTH_FAILED" in wrong.log_tail(), 20, message="the refusal in the worker's log")
        assert (channel_stats(secured.nsqd.http, t["input"], "primes") or {}).get("clients") in (None, [])
        wrong.stop_all()
        # And with its secret, it classifies what the producer publishes
        monkeypatch.setenv("NSQ_SECRET_PRIMES", SECRETS["primes"])
        right = Workers(secured.path)
        right.start(0)
        right.wait_subscribed(secured.nsqd.http, t["input"], 1)
        with NsqPublisher(secured.nsqd.tcp, security=as_("numbers")) as pub:
            pub.mpub(t["input"], [encode_json({"id": f"{run}-{n}", "number": n}) for n in range(1, 21)])
        got: list[dict] = []

        def read() -> bool:
            for reader in readers:
                got.extend(r for m in reader.messages(timeout=0.05)
                           if (r := decode(m.body)).get("id", "").startswith(run))
            return len(got) >= 20
        wait_until(read, 30, message=f"outputs; worker log: {right.log_tail()}")
        assert sorted(r["number"] for r in got) == list(range(1, 21))
        right.stop_all()
    finally:
        wrong.stop_all()
        for reader in readers:
            reader.close()



def test_rendered_config_supervises_the_auth_server_and_tells_nsqd_about_it(tmp_path):
    path = write_topology(tmp_path, "127.0.0.1:4150", "127.0.0.1:4151", "127.0.0.1:4181",
                          {"input": "numbers", "prime": "prime", "non_prime": "non_prime"})
    from pipeline.ops.supervisor_conf import render
    text = render(load_topology(path))
    assert "--auth-http-address=127.0.0.1:4181" in text
    section = text[text.index("[program:auth]"):].split("\n\n")[0]
    assert '"%(ENV_NSQ_PIPELINE_PYTHON)s" -m pipeline.cli auth-server -t "%(here)s/topology.yaml"' in section
    assert "priority=150" in section  # before nsqd (200), which asks it from its first client on


@pytest.mark.integration
def test_gateway_publishes_with_its_own_identity(secured, monkeypatch):
    import http.client
    t = secured.topics
    address = yaml.safe_load(secured.path.read_text())["gateway"]["http"]
    monkeypatch.setenv("GW_AUTH_TOKEN", GATEWAY_TOKEN)
    monkeypatch.setenv("NSQ_SECRET_GATEWAY", SECRETS["gateway"])
    before = nsqd_http.topic_message_count(secured.nsqd.http, t["input"])
    gateway = start_process("gateway", [sys.executable, "-m", "pipeline.cli", "gateway", "-t", str(secured.path)],
                            http=address, log_path=secured.path.parent / "gateway.log", ping_timeout=20)
    try:
        host, port = address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", f"/pub?topic={t['input']}", body=b'{"number": 3}',
                     headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"OK")
        conn.close()
        assert nsqd_http.topic_message_count(secured.nsqd.http, t["input"]) == before + 1
    finally:
        gateway.stop()
