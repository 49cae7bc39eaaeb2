"""``pipeline certs``: a local certificate authority and certificates for development TLS.

Creates, in one folder: ``ca.pem``/``ca.key`` (the CA), ``nsqd.pem``/``nsqd.key``
(nsqd's server certificate, valid for the given hosts), and
``client.pem``/``client.key`` (the certificate the pipeline's clients present
under ``client_auth_policy: require-verify``). Keys are EC P-256, written with
mode 0600. For development and tests only: a production CA lives elsewhere.
Example::

    paths = create_dev_certs(Path("var/tls"), hosts=["127.0.0.1", "localhost"])
    paths.topology_section()   # the `tls:` block to paste into topology.yaml
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest validity clients accept for a server certificate


@dataclass(frozen=True)
class DevCerts:
    """Where :func:`create_dev_certs` wrote each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def topology_section(self) -> str:
        """The ``tls:`` section of a topology using these files."""
        return (f"tls:\n  cert: {self.server_cert}\n  key: {self.server_key}\n  root_ca_file: {self.ca_cert}\n"
                f"  client_auth_policy: require-verify\n  client_cert: {self.client_cert}\n"
                f"  client_key: {self.client_key}\n")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nsq-pipeline development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _leaf(name: str, hosts: list[str], usage: x509.ObjectIdentifier, ca_name: x509.Name,
          ca_key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(_name(name), ca_name, key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True))
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def create_dev_certs(out: Path, hosts: list[str], *, ca_name: str = "nsq-pipeline dev CA") -> DevCerts:
    """Create a CA, a server certificate for ``hosts`` and a client certificate in ``out``; return the paths.

    Raises:
        ValueError: ``hosts`` is empty.
    """
    if not hosts:
        raise ValueError("give at least one host for nsqd's certificate")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name(ca_name)
    ca = (_builder(ca_subject, ca_subject, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server, server_key = _leaf("nsqd", hosts, ExtendedKeyUsageOID.SERVER_AUTH, ca_subject, ca_key)
    client, client_key = _leaf("nsq-pipeline client", [], ExtendedKeyUsageOID.CLIENT_AUTH, ca_subject, ca_key)
    paths = DevCerts(out / "ca.pem", out / "ca.key", out / "nsqd.pem", out / "nsqd.key", out / "client.pem",
                     out / "client.key")
    for cert_path, cert, key_path, key in ((paths.ca_cert, ca, paths.ca_key, ca_key),
                                           (paths.server_cert, server, paths.server_key, server_key),
                                           (paths.client_cert, client, paths.client_key, client_key)):
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
    return paths
