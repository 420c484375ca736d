"""How the Kafka transport's aiokafka clients reach the brokers: the settings every client of
one transport shares (bootstrap servers, client id, TLS, SASL) and what a failed attempt of
:meth:`~herald.transports.kafka.transport.KafkaTransport.connect` means.

Part of :mod:`herald.transports.kafka.transport`; the connect budget and the TLS checks are
:mod:`herald.transports.connecting`'s. aiokafka logs why a broker could not be used (a
refused login, a TLS error, a refused connection) and raises a vague "Unable to bootstrap";
:meth:`Access.classify` decides on the logged cause.
"""

from __future__ import annotations

import logging
import re
import ssl
from typing import Any

from aiokafka.errors import (  # type: ignore[import-untyped]
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)

from herald.transports.base import PermanentTransportError, TransportError
from herald.transports.connecting import Endpoint, describe, library_said, load_tls
from herald.transports.kafka.options import redact_url

__all__ = ["Access"]

#: the broker refused the SASL login: wrong credentials or mechanism
_REFUSED_LOGIN = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)
#: the broker's ACLs refuse what connect() needs (metadata, an idempotent producer)
_NOT_AUTHORIZED = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


class _HideSaslBytes(logging.Filter):
    """aiokafka logs every request at DEBUG, and a SASL PLAIN request's repr holds the
    password in clear (``sasl_auth_bytes=b'\\x00user\\x00password'``): blank it out."""

    _BYTES = re.compile(r"sasl_auth_bytes=b(['\"]).*?(?<!\\)\1")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            text = record.getMessage()
            if "sasl_auth_bytes" in text:
                record.msg, record.args = self._BYTES.sub("sasl_auth_bytes=<redacted>", text), ()
        return True


logging.getLogger("aiokafka.conn").addFilter(_HideSaslBytes())


class Access:
    """The brokers of one transport and how to reach them. Takes the credentials out of the
    parsed URL ``options``; the password is only ever handed to aiokafka."""

    def __init__(self, url: str, hosts: list[str], options: dict[str, Any]) -> None:
        #: the URL with the password redacted
        self.url = redact_url(url)
        self.hosts = hosts
        self.user: str | None = options.pop("_user", None)
        self._password: str | None = options.pop("_password", None)
        self._options = options
        self._ssl: ssl.SSLContext | None = None

    @property
    def tls(self) -> bool:
        return bool(self._options["security_protocol"] in ("SSL", "SASL_SSL"))

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            cafile = self._options["ssl_cafile"]
            self._ssl = load_tls(
                "Kafka", self.url, lambda: ssl.create_default_context(cafile=cafile)
            )
        return self._ssl

    def client_options(self) -> dict[str, Any]:
        """The aiokafka keyword arguments every client (admin, producer, consumer) gets."""
        o = self._options
        out: dict[str, Any] = {
            "bootstrap_servers": self.hosts,
            "client_id": o["client_id"],
            "security_protocol": o["security_protocol"],
        }
        if self.tls:
            out["ssl_context"] = self._ssl_context()
        if o["security_protocol"].startswith("SASL"):
            out["sasl_mechanism"] = o["sasl_mechanism"]
            out["sasl_plain_username"] = self.user
            out["sasl_plain_password"] = self._password
        return out

    def endpoint(self) -> Endpoint:
        """For :func:`~herald.transports.connecting.connect_within` (loads the TLS files)."""
        sasl = "SASL_" if self.user is not None else ""
        return Endpoint(
            engine="Kafka",
            url=self.url,
            hosts=[
                (h.rpartition(":")[0].strip("[]"), int(h.rpartition(":")[2])) for h in self.hosts
            ],
            tls=self._ssl_context() if self.tls else None,
            other_mode=f"security_protocol={sasl}{'PLAINTEXT' if self.tls else 'SSL'}",
            ca_option="ssl_cafile",
            scrub=self.scrub,
        )

    def scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def classify(self, e: Exception) -> Exception:
        """What a failed connect attempt means: a :class:`PermanentTransportError`, an
        :class:`ssl.SSLError` (a TLS failure), or a ``ConnectionError`` to retry."""
        said, logged = library_said()
        if isinstance(e, KafkaConnectionError) and isinstance(logged, Exception):
            e = logged
        if isinstance(e, (TransportError, ssl.SSLError)):
            return e
        if isinstance(e, _REFUSED_LOGIN):
            return PermanentTransportError(
                f"Kafka at {self.url} refused the SASL login "
                f"({self._options['sasl_mechanism']}, user {self.user!r}): {self.scrub(repr(e))}"
            )
        if isinstance(e, _NOT_AUTHORIZED):
            return PermanentTransportError(
                f"Kafka at {self.url}: the client is not authorized: {e!r} (the broker's ACLs "
                "must allow it)"
            )
        if isinstance(e, (KafkaError, OSError, TimeoutError)):
            return ConnectionError(self.scrub(said or describe(e)))
        # aiokafka lets some login failures escape as plain errors (a SCRAM reply with an
        # error instead of a server signature raises KeyError): not worth retrying
        return PermanentTransportError(
            f"Kafka at {self.url}: authentication or protocol failure: "
            f"{type(e).__name__}: {self.scrub(str(e))}"
        )
