"""How the pipeline's clients and nsqd are secured, derived from the topology's ``auth`` and ``tls``.

One place answers three questions: which flags nsqd gets (``nsqd_security_args``),
what a client sends when it connects (``client_options`` for pynsq, ``ClientSecurity``
for the blocking clients), and which listeners are exposed without protection
(``exposure_warnings``, shown by ``pipeline check``). Example::

    options = client_options(topology, "primes")    # {"auth_secret": ..., "tls_v1": True, ...}
    reader = nsq.Reader(topic=..., channel=..., **options)
"""
from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from pipeline.config.credentials import SecretError, env_name, read_secret, resolve
from pipeline.config.types import socket_address

__all__ = ["ClientSecurity", "SecretError", "client_options", "client_security", "exposure_warnings", "identity_secret",
           "nsqd_security_args"]


def identity_secret(topology, identity: str) -> str:
    """The nsqd auth secret of ``identity``: from ``auth.secrets``, else ``NSQ_SECRET_<NAME>``.

    Raises:
        SecretError: auth is off, or the secret cannot be read.
    """
    if topology.auth is None:
        raise SecretError("the topology has no auth section")
    spec = topology.auth.secrets.get(identity)
    if spec is not None:
        return read_secret(spec, topology, f"auth.secrets.{identity}")
    from pipeline.config.schema import SecretSpec
    return read_secret(SecretSpec(env=env_name(identity)), topology, f"auth identity {identity!r}")


@dataclass(frozen=True)
class ClientSecurity:
    """What a client does after connecting to nsqd: upgrade to TLS with ``ssl_context``, AUTH with ``secret``."""

    secret: str | None = None
    ssl_context: ssl.SSLContext | None = None

    @property
    def active(self) -> bool:
        """True when the client must IDENTIFY and negotiate before use."""
        return self.secret is not None or self.ssl_context is not None


def _tls_files(topology) -> dict[str, str]:
    tls = topology.tls
    files = {"ca_certs": str(resolve(topology, tls.root_ca_file))}
    if tls.client_cert is not None:
        files["certfile"] = str(resolve(topology, tls.client_cert))
        files["keyfile"] = str(resolve(topology, tls.client_key))
    return files


def client_security(topology, identity: str | None) -> ClientSecurity:
    """The :class:`ClientSecurity` of ``identity`` (None: no auth secret) under ``topology``."""
    secret = identity_secret(topology, identity) if topology.auth is not None and identity else None
    context = None
    if topology.tls is not None:
        files = _tls_files(topology)
        context = ssl.create_default_context(cafile=files["ca_certs"])
        if "certfile" in files:
            context.load_cert_chain(files["certfile"], files["keyfile"])
    return ClientSecurity(secret, context)


def client_options(topology, identity: str | None) -> dict:
    """Keyword arguments for a pynsq ``Reader``/``Writer``: ``auth_secret`` and TLS with CA verification."""
    options: dict = {}
    if topology.auth is not None and identity:
        options["auth_secret"] = identity_secret(topology, identity)
    if topology.tls is not None:
        # PROTOCOL_TLS_CLIENT negotiates the newest version both sides have and checks the host name.
        options["tls_v1"] = True
        options["tls_options"] = {"cert_reqs": ssl.CERT_REQUIRED, "ssl_version": ssl.PROTOCOL_TLS_CLIENT,
                                  **_tls_files(topology)}
    return options


def nsqd_security_args(topology) -> list[str]:
    """nsqd's flags for the topology's ``tls`` and ``auth`` (empty when both are off)."""
    args: list[str] = []
    tls = topology.tls
    if tls is not None:
        args += [f"--tls-cert={resolve(topology, tls.cert)}", f"--tls-key={resolve(topology, tls.key)}",
                 f"--tls-root-ca-file={resolve(topology, tls.root_ca_file)}",
                 f"--tls-min-version={tls.min_version}", f"--tls-required={'tcp-https' if tls.required else 'false'}"]
        if tls.client_auth_policy != "none":
            args.append(f"--tls-client-auth-policy={tls.client_auth_policy}")
    if topology.auth is not None:
        args.append(f"--auth-http-address={topology.auth.http}")
    return args


def _loopback(address: str) -> bool:
    host = socket_address(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warnings(topology) -> list[str]:
    """One line per listener that is not on loopback and lacks the protection it needs.

    nsqd's TCP port needs TLS and auth; its HTTP port, nsqlookupd, nsqadmin and
    the auth server have no authentication at all, so they warn whenever exposed;
    the gateway needs no more than its tokens, but sends them in clear text.
    """
    warnings = []
    for i, nsqd in enumerate(topology.nsq.nsqd):
        missing = [what for what, on in (("TLS", topology.tls), ("auth", topology.auth)) if on is None]
        if not _loopback(nsqd.tcp) and missing:
            warnings.append(f"nsq.nsqd.{i}.tcp {nsqd.tcp} is not loopback and has no {' or '.join(missing)}")
        if not _loopback(nsqd.http):
            warnings.append(f"nsq.nsqd.{i}.http {nsqd.http} is not loopback: nsqd's HTTP API (/pub, "
                            "/topic/delete, /config) has no authentication; use the gateway")
    for i, lookupd in enumerate(topology.nsq.lookupd):
        for kind in ("tcp", "http"):
            address = getattr(lookupd, kind)
            if not _loopback(address):
                warnings.append(f"nsq.lookupd.{i}.{kind} {address} is not loopback: nsqlookupd has no "
                                "authentication")
    if topology.nsq.admin and not _loopback(topology.nsq.admin):
        warnings.append(f"nsq.admin {topology.nsq.admin} is not loopback: nsqadmin treats every visitor as an "
                        "admin; put it behind an authenticating proxy (docs/SECURITY.md)")
    if topology.auth is not None and not _loopback(topology.auth.http):
        warnings.append(f"auth.http {topology.auth.http} is not loopback: anyone could probe secrets")
    if topology.gateway is not None and not _loopback(topology.gateway.http):
        warnings.append(f"gateway.http {topology.gateway.http} is not loopback: bearer tokens travel in clear "
                        "text; put a TLS-terminating proxy in front")
    return warnings

