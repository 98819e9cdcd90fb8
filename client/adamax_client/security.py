"""Client side of the server's security: TLS/mTLS channel credentials and a bearer token.

    creds = tls_channel_credentials(ca_file="ca.pem", cert_file="worker.pem", key_file="worker.key")
    RemoteAdamax("ps:50051", credentials=creds, token=open("token").read().strip())

The token travels as ``authorization: Bearer <token>`` metadata on every call, added by a
client interceptor (so it also works on plaintext channels inside a trusted network; over
the internet use TLS, or the token is readable on the wire).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION_KEY = "authorization"


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path!r}: {exc.strerror or exc}") from exc


def tls_channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: ``ca_file`` verifies the server (system roots if None); a client
    certificate and key are sent for mutual TLS when both are given."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key and vice versa (`cert_file` and `key_file`)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA"),
        private_key=_read(key_file, "client key"),
        certificate_chain=_read(cert_file, "client certificate"),
    )


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token:
            raise ValueError("`token` must be a non-empty string")
        self._entry = (AUTHORIZATION_KEY, f"Bearer {token}")

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)
