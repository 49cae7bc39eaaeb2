"""``pipeline auth-server``: nsqd's auth HTTP protocol, answered from the topology.

nsqd started with ``--auth-http-address`` asks, for every client that sends
AUTH, ``GET /auth?remote_ip=&tls=&secret=&common_name=`` and expects::

    {"ttl": 3600, "identity": "primes",
     "authorizations": [{"topic": "^numbers$", "channels": ["^primes$"], "permissions": ["subscribe"]}, ...]}

Topic and channel are regular expressions nsqd matches against the names, so
every name here is anchored and escaped. Each stage may subscribe to its input
(every partition) through its channel and publish to its outputs and its
dead-letter topic; a producer may publish to its topic; ``gateway`` may
publish to its tokens' topics; ``tail`` may read any topic through an
ephemeral ``tail-*`` channel or the channel ``keep`` (``pipeline peek``, ``pipeline
dead ls|show``, and the monitor's trimming). An unknown secret gets a 403, which nsqd turns
into ``E_AUTH_FAILED``.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import signal
from dataclasses import dataclass

from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

from pipeline.config import KEEP_CHANNEL, socket_address
from pipeline.config.credentials import SecretError
from pipeline.config.security import identity_secret

log = logging.getLogger(__name__)

PUBLISH, SUBSCRIBE = "publish", "subscribe"
_ANY = ".*"


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def _publish(topics: list[str]) -> list[dict]:
    # nsqd checks a publish with channel "", which must match one of the channel patterns
    return [{"topic": _exact(t), "channels": [_ANY], "permissions": [PUBLISH]} for t in topics]


def _subscribe(topics: list[str], channel_pattern: str) -> list[dict]:
    return [{"topic": _exact(t), "channels": [channel_pattern], "permissions": [SUBSCRIBE]} for t in topics]


def authorizations(topology, identity: str) -> list[dict]:
    """What ``identity`` may do on nsqd, as nsqd's auth protocol lists it (empty for an unknown identity)."""
    grants: list[dict] = []
    stage = topology.stages.get(identity)
    if stage is not None:
        grants += _subscribe(topology.physical_topics(stage.input), _exact(stage.channel))
        outputs = [t for topic in stage.output_topics.values() for t in topology.physical_topics(topic)]
        grants += _publish([*outputs, topology.dead_letter_topic(identity)])
    producer = topology.producers.get(identity)
    if producer is not None:
        grants += _publish(topology.physical_topics(producer.topic))
    if identity == "gateway" and topology.gateway is not None:
        grants += _publish(sorted({t for token in topology.gateway.tokens.values() for t in token.topics}))
    if identity == "tail":
        # its own ephemeral channels, and keep, which peek and `dead ls|show` read (and requeue)
        # and the monitor trims
        grants.append({"topic": _ANY, "channels": [r"^tail-[0-9a-f]+#ephemeral$", _exact(KEEP_CHANNEL)],
                       "permissions": [SUBSCRIBE]})
    return grants


@dataclass(frozen=True)
class Identity:
    """One identity the auth server knows: its name, secret and grants."""

    name: str
    secret: bytes
    grants: list


def load_identities(topology, *, strict: bool = False) -> list[Identity]:
    """Every identity whose secret can be read; with ``strict``, a missing one is an error.

    Raises:
        SecretError: two identities share a secret, or (``strict``) one secret cannot be read.
    """
    found: list[Identity] = []
    for name in topology.identities():
        try:
            secret = identity_secret(topology, name).encode()
        except SecretError as e:
            if strict:
                raise
            log.warning("identity %s disabled: %s", name, e)
            continue
        for other in found:
            if hmac.compare_digest(other.secret, secret):
                raise SecretError(f"identities {other.name!r} and {name!r} have the same secret")
        found.append(Identity(name, secret, authorizations(topology, name)))
    return found


class AuthHandler(RequestHandler):
    """``GET /auth``: the identity and authorizations of a secret, or 403."""

    def initialize(self, identities: list[Identity], ttl: int) -> None:
        self.identities, self.ttl = identities, ttl

    def get(self) -> None:
        given = self.get_query_argument("secret", "").encode()
        # every identity is compared, so the time taken does not say which one nearly matched
        matches = [i for i in self.identities if hmac.compare_digest(i.secret, given)]
        remote = self.get_query_argument("remote_ip", "?")
        if not given or not matches:
            log.warning("refused an unknown secret from %s", remote)
            self.set_status(403)
            self.finish({"message": "unknown secret"})
            return
        identity = matches[0]
        log.info("%s authenticated from %s (tls=%s)", identity.name, remote, self.get_query_argument("tls", "?"))
        self.finish({"ttl": self.ttl, "identity": identity.name, "authorizations": identity.grants})


class PingHandler(RequestHandler):
    """``GET /ping``: 200 ``OK``."""

    def get(self) -> None:
        self.finish("OK")


def application(topology, identities: list[Identity]) -> Application:
    """The tornado application serving ``/auth`` and ``/ping``."""
    return Application([(r"/auth", AuthHandler, {"identities": identities, "ttl": topology.auth.ttl}),
                        (r"/ping", PingHandler)])


async def serve(topology) -> None:
    """Run the auth server until SIGTERM or SIGINT."""
    identities = load_identities(topology)
    host, port = socket_address(topology.auth.http)
    server = HTTPServer(application(topology, identities))
    server.listen(port, address=host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("auth server on http://%s for %s", topology.auth.http, ", ".join(i.name for i in identities))
    await stop.wait()
    server.stop()
