"""TLS between the pipeline and a real nsqd, with certificates from ``pipeline certs``.

nsqd runs with the topology's ``tls`` flags (``--tls-required``,
``--tls-client-auth-policy=require-verify``); a stage worker (pynsq), a
producer and a tail (the blocking client) talk to it over TLS, and clients
without TLS, or with a certificate from another CA, are refused.
"""
from __future__ import annotations

import ssl
import subprocess
import sys
import uuid

import pytest
import yaml

from harness import ROOT, Workers
from nsqhttp import wait_until
from pipeline.client import nsqd_http
from pipeline.ops.certs import create_dev_certs
from pipeline.records.codecs import decode, encode_json
from pipeline.errors import PublishError
from pipeline.client.nsqclient import NsqPublisher, NsqSubscriber
from pipeline.ops.processes import free_port, start_nsqd
from pipeline.config.security import ClientSecurity, client_security, nsqd_security_args
from pipeline.observe.tail import tail_channel
from pipeline.config import load_topology


@pytest.fixture(scope="module")
def tls_pipeline(nsq_bin, tmp_path_factory):
    """An nsqd requiring TLS with verified client certificates, and the topology that describes it."""
    tmp = tmp_path_factory.mktemp("tls")
    certs = create_dev_certs(tmp / "tls", ["127.0.0.1", "localhost"])
    name = f"tls_{uuid.uuid4().hex[:8]}"
    tcp, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    doc = {
        "nsq": {"nsqd": [{"name": "n0", "tcp": tcp, "http": http}], "var_dir": str(tmp / "var")},
        "topics": {name: {}, f"{name}_prime": {}, f"{name}_non_prime": {}},
        "stages": {"primes": {"handler": "consumers.primes:classify", "input": name, "channel": "primes",
                              "outputs": {"prime": f"{name}_prime", "non_prime": f"{name}_non_prime"},
                              "batch": {"size": 16, "wait_ms": 5}}},
        "tls": {"cert": "tls/nsqd.pem", "key": "tls/nsqd.key", "root_ca_file": "tls/ca.pem",
                "client_auth_policy": "require-verify", "client_cert": "tls/client.pem",
                "client_key": "tls/client.key"},
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    topology = load_topology(path)
    nsqd = start_nsqd(tmp / "nsqd", tcp=tcp, http=http, extra=nsqd_security_args(topology))
    yield topology, nsqd, certs, name
    nsqd.stop()
    assert not nsqd.alive()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_pipeline_runs_end_to_end_over_tls(tls_pipeline):
    topology, nsqd, _, name = tls_pipeline
    secure = client_security(topology, None)
    outputs = [f"{name}_prime", f"{name}_non_prime"]
    readers = [NsqSubscriber(nsqd.tcp, t, tail_channel(), security=secure) for t in outputs]
    workers = Workers(topology.path)
    try:
        workers.start(0)
        workers.wait_subscribed(nsqd.http, name, 1)
        with NsqPublisher(nsqd.tcp, security=secure) as pub:
            pub.mpub(name, [encode_json({"id": f"r{n}", "number": n}) for n in range(1, 31)])
        got: list[dict] = []

        def read() -> bool:
            for reader in readers:
                got.extend(decode(m.body) for m in reader.messages(timeout=0.05))
            return len(got) >= 30
        wait_until(read, 30, message=f"outputs over TLS; worker log: {workers.log_tail()}")
        assert sorted(r["number"] for r in got) == list(range(1, 31))
        clients = nsqd_http.stats(nsqd.http, name)["topics"][0]["channels"][0]["clients"]
        assert [c["tls"] for c in clients] == [True]  # the worker's connection is TLS
    finally:
        workers.stop_all()
        for reader in readers:
            reader.close()


@pytest.mark.integration
def test_plain_tcp_client_is_refused(tls_pipeline):
    _, nsqd, _, name = tls_pipeline
    before = nsqd_http.topic_message_count(nsqd.http, name)
    with pytest.raises(PublishError, match="E_INVALID"):
        with NsqPublisher(nsqd.tcp) as pub:
            pub.mpub(name, [b"{}"])
    with pytest.raises(PublishError, match="E_INVALID"):
        NsqSubscriber(nsqd.tcp, name, "primes")
    assert nsqd_http.topic_message_count(nsqd.http, name) == before


@pytest.mark.integration
def test_client_certificate_from_another_ca_is_refused(tls_pipeline, tmp_path):
    _, nsqd, certs, name = tls_pipeline
    other = create_dev_certs(tmp_path / "other", ["127.0.0.1"], ca_name="another CA")
    context = ssl.create_default_context(cafile=str(certs.ca_cert))  # trusts nsqd ...
    context.load_cert_chain(other.client_cert, other.client_key)  # ... but presents a stranger's certificate
    with pytest.raises(PublishError, match="UNKNOWN_CA"):
        with NsqPublisher(nsqd.tcp, security=ClientSecurity(ssl_context=context)) as pub:
            pub.mpub(name, [b"{}"])
    without = ssl.create_default_context(cafile=str(certs.ca_cert))  # no certificate at all
    with pytest.raises(PublishError, match="SSL"):
        with NsqPublisher(nsqd.tcp, security=ClientSecurity(ssl_context=without)) as pub:
            pub.mpub(name, [b"{}"])


@pytest.mark.integration
def test_client_refuses_an_nsqd_its_ca_did_not_sign(tls_pipeline, tmp_path):
    _, nsqd, certs, name = tls_pipeline
    other = create_dev_certs(tmp_path / "other", ["127.0.0.1"], ca_name="another CA")
    context = ssl.create_default_context(cafile=str(other.ca_cert))
    context.load_cert_chain(certs.client_cert, certs.client_key)
    with pytest.raises(PublishError, match="CERTIFICATE_VERIFY_FAILED"):
        NsqPublisher(nsqd.tcp, security=ClientSecurity(ssl_context=context))


def test_certs_command_writes_keys_only_the_owner_can_read(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "certs", "--out", str(tmp_path / "tls"),
                             "--host", "127.0.0.1", "--host", "nsqd.internal"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tls:\n  cert: ") and "client_auth_policy: require-verify" in result.stdout
    for key in ("ca.key", "nsqd.key", "client.key"):
        assert (tmp_path / "tls" / key).stat().st_mode & 0o777 == 0o600
    from cryptography import x509
    server = x509.load_pem_x509_certificate((tmp_path / "tls" / "nsqd.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["nsqd.internal"]
