"""Client side of the server's security: TLS/mTLS channel credentials and a bearer token.

    creds = tls_channel_credentials(ca_file="ca.pem", cert_file="worker.pem", key_file="worker.key")
    RemoteAdamax("ps:50051", credentials=creds, token=open("token").read().strip())

The same credentials secure the bulk channel: ``tls_channel_credentials`` returns a
``TlsChannelCredentials`` that also builds the ``ssl.SSLContext`` (same CA, same client
certificate) for the bulk connection's socket. Plain ``grpc.ssl_channel_credentials`` cannot
be read back, so with them tensors travel over gRPC.

The token travels as ``authorization: Bearer <token>`` metadata on every call, added by a
client interceptor (so it also works on plaintext channels inside a trusted network; over
the internet use TLS, or the token is readable on the wire).
"""

from __future__ import annotations

import collections
import ssl
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


class TlsChannelCredentials(grpc.ChannelCredentials):
    """gRPC TLS channel credentials that remember their PEM files, so the bulk channel's socket
    can be secured the same way (``ssl_context``)."""

    def __init__(self, ca: bytes | None, key: bytes | None, chain: bytes | None) -> None:
        inner = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
        super().__init__(inner._credentials)
        self._ca, self._key, self._chain = ca, key, chain

    def ssl_context(self) -> ssl.SSLContext:
        """A client ``SSLContext``: verifies the server by the CA (system roots without one) and
        host name, and presents the client certificate for mutual TLS."""
        context = ssl.create_default_context(cadata=self._ca.decode("ascii") if self._ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._chain and self._key:
            _load_chain(context, self._chain, self._key)
        return context


def _load_chain(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """``load_cert_chain`` reads files only: hand it private temporary ones, removed at once."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="adamax-tls-") as tmp:
        paths = []
        for name, data in (("chain.pem", chain), ("key.pem", key)):
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        context.load_cert_chain(paths[0], paths[1])


def tls_channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> TlsChannelCredentials:
    """TLS credentials: ``ca_file`` verifies the server (system roots if None); a client
    certificate and key are sent for mutual TLS when both are given. They secure the gRPC
    channel and the bulk channel alike."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key and vice versa (`cert_file` and `key_file`)")
    return TlsChannelCredentials(
        _read(ca_file, "CA"), _read(key_file, "client key"), _read(cert_file, "client certificate")
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
