"""Transport security and access control of the server: TLS/mTLS credentials and bearer tokens.

* :func:`server_credentials` reads a certificate chain, its key and (for mutual TLS) a CA
  bundle from files. A server told to require client certificates without a CA refuses to
  start (:class:`SecurityConfigError`), rather than silently accepting anyone.
* :func:`bulk_server_context` builds the same TLS setup (certificate, key, client CA, mutual
  TLS) as an ``ssl.SSLContext`` for the bulk channel's sockets; :func:`certificate_identities`
  names a peer certificate the way gRPC's ``peer_identities`` does, so a bulk connection is
  bound to the mTLS identity that asked for its ticket.
* :class:`TokenAuthInterceptor` checks ``authorization: Bearer <token>`` on every call except
  the gRPC health service, before any handler runs: a missing or unknown token is
  UNAUTHENTICATED. Tokens are compared in constant time (SHA-256 digests through
  ``hmac.compare_digest``, every configured token is compared, no early exit).
* A token may be scoped to optimizer names: calls naming another optimizer, and calls that
  span optimizers (``ListOptimizers``), are PERMISSION_DENIED. The optimizer a call names is
  read from its request (unary) or its first frame (streams) before the handler sees it, so
  one job's token cannot touch another job's state.

Token file format (``--token-file`` / ``ADAMAX_PS_TOKEN_FILE``), one token a line::

    # comment
    s3cr3t-admin-token                    <- may call everything
    job-a-token  job-a  job-a-eval        <- only optimizers "job-a" and "job-a-eval"
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION_KEY = "authorization"
_BEARER = "bearer "
# Calls that are not about one optimizer; scoped tokens may not make them.
_UNSCOPED_METHODS = frozenset({"ListOptimizers"})


class SecurityConfigError(ValueError):
    """The TLS or token configuration is unusable; the server must not start with it."""


# ---------------------------------------------------------------- TLS


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} file {str(path)!r}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise SecurityConfigError(f"the {what} file {str(path)!r} is empty")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """PEM file paths of the server's TLS setup; ``require_client_auth`` turns on mutual TLS."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    require_client_auth: bool = False


def server_credentials(config: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials for TLS, or mutual TLS when ``require_client_auth`` is set."""
    if config.require_client_auth and not config.ca_file:
        raise SecurityConfigError(
            "client certificates are required (mutual TLS) but no CA was given to verify them; "
            "set --tls-ca / ADAMAX_PS_TLS_CA"
        )
    if not config.cert_file or not config.key_file:
        raise SecurityConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    cert = _read(config.cert_file, "TLS certificate")
    key = _read(config.key_file, "TLS key")
    ca = _read(config.ca_file, "TLS CA") if config.ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=config.require_client_auth
    )


def bulk_server_context(config: TlsConfig) -> ssl.SSLContext:
    """The server side of the bulk channel's TLS: the server certificate, and for mutual TLS the
    client CA with client certificates required (the gRPC port's rules, for the bulk port)."""
    server_credentials(config)  # the same checks and messages as for the gRPC port
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
        if config.ca_file:
            context.load_verify_locations(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"unusable TLS certificate, key or CA for the bulk channel: {exc}") from exc
    if config.require_client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.ca_file:
        context.verify_mode = ssl.CERT_OPTIONAL  # as gRPC: a client certificate is checked if sent
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def certificate_identities(cert: Mapping[str, Any] | None) -> frozenset[str]:
    """A verified peer certificate's identities (``ssl.SSLSocket.getpeercert()``): its subject
    alternative names, or its common name when it has none, as gRPC reports them."""
    if not cert:
        return frozenset()
    names = [str(value) for _kind, value in cert.get("subjectAltName", ())]
    if not names:
        names = [str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return frozenset(names)


# ---------------------------------------------------------------- tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenGrant:
    """One accepted token; ``optimizers`` empty means every optimizer."""

    digest: bytes = field(repr=False)
    optimizers: frozenset[str] = frozenset()

    @property
    def scoped(self) -> bool:
        return bool(self.optimizers)


class TokenTable:
    """The accepted tokens, kept only as SHA-256 digests."""

    def __init__(self, grants: Iterable[TokenGrant]) -> None:
        self._grants = tuple(grants)
        if not self._grants:
            raise SecurityConfigError("token authentication is on but no token was configured")

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, Iterable[str]]) -> TokenTable:
        """``{token: optimizer names}``; an empty list of names grants every optimizer."""
        grants = []
        for token, names in tokens.items():
            if not token or any(c.isspace() for c in token):
                raise SecurityConfigError("tokens must be non-empty and contain no whitespace")
            grants.append(TokenGrant(_digest(token), frozenset(names)))
        return cls(grants)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenTable:
        tokens: dict[str, list[str]] = {}
        for line in _read(path, "token").decode("utf-8").splitlines():
            words = line.split("#", 1)[0].split()
            if words:
                tokens.setdefault(words[0], []).extend(words[1:])
        return cls.from_tokens(tokens)

    def match(self, token: str) -> TokenGrant | None:
        """The grant of ``token``; compares against every grant so timing does not leak which."""
        digest = _digest(token)
        found = None
        for grant in self._grants:
            if hmac.compare_digest(digest, grant.digest) and found is None:
                found = grant
        return found


def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


def _abort_handler(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts (the real one never runs)."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    streaming_in = bool(handler and handler.request_streaming)
    streaming_out = bool(handler and handler.response_streaming)
    if streaming_in and streaming_out:
        return grpc.stream_stream_rpc_method_handler(deny)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(deny)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def _optimizer_of(message: Any) -> str | None:
    """The optimizer a request or first stream frame names (None: none found)."""
    if isinstance(message, memoryview) or message is None:
        return None
    if getattr(message, "DESCRIPTOR", None) is not None and message.DESCRIPTOR.name == "ShardCallBatch":
        message = message.frames[0] if message.frames else None  # CallOnce: the frames of a Call
        if message is None:
            return None
    if hasattr(message, "WhichOneof") and "frame" in message.DESCRIPTOR.oneofs_by_name:
        if message.WhichOneof("frame") != "header":
            return None
        message = message.header
    return getattr(message, "optimizer", None)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token check on every method but health; see the module docstring."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method.startswith(HEALTH_SERVICE_PREFIX):
            return continuation(handler_call_details)
        token = _bearer_token(handler_call_details.invocation_metadata)
        grant = self._tokens.match(token) if token else None
        handler = continuation(handler_call_details)
        if grant is None:
            why = "missing bearer token" if not token else "invalid bearer token"
            return _abort_handler(grpc.StatusCode.UNAUTHENTICATED, f"{why}: send 'authorization: Bearer <token>'", handler)
        if not grant.scoped or handler is None:
            return handler
        name = method.rsplit("/", 1)[-1]
        if name in _UNSCOPED_METHODS or not method.startswith("/adamax."):
            return _abort_handler(
                grpc.StatusCode.PERMISSION_DENIED, f"this token is limited to optimizers {sorted(grant.optimizers)}; "
                f"{name} needs an unscoped token", handler,
            )
        return _scoped(handler, grant)


def _check_scope(grant: TokenGrant, message: Any, context: grpc.ServicerContext) -> None:
    optimizer = _optimizer_of(message)
    if optimizer not in grant.optimizers:
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"this token may not use optimizer {optimizer!r}; it is limited to {sorted(grant.optimizers)}",
        )


def _scoped(handler: grpc.RpcMethodHandler, grant: TokenGrant) -> grpc.RpcMethodHandler:
    """Wrap ``handler`` so the named optimizer is checked before the handler runs."""
    if handler.request_streaming:
        inner = handler.stream_unary or handler.stream_stream

        def streaming(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            frames = iter(request_iterator)
            first = next(frames, None)
            _check_scope(grant, first, context)
            return inner(itertools.chain([first], frames), context)

        if handler.stream_unary:
            return handler._replace(stream_unary=streaming)
        return handler._replace(stream_stream=streaming)

    inner = handler.unary_unary or handler.unary_stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        _check_scope(grant, request, context)
        return inner(request, context)

    if handler.unary_unary:
        return handler._replace(unary_unary=unary)
    return handler._replace(unary_stream=unary)


def peer_identities(context: Any) -> frozenset[str]:
    """A gRPC caller's client-certificate identities (empty without mutual TLS)."""
    try:
        found = context.peer_identities() or ()
    except Exception:  # a context without an auth context (tests' fakes)
        return frozenset()
    return frozenset(i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in found)
