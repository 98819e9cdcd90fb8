"""One gRPC channel to one adamax-ps server, with deadlines, retries and error mapping.

Every call carries a deadline. Only UNAVAILABLE is retried (exponential backoff with jitter,
bounded by the call's overall deadline): the request is re-sent unchanged, so a retried push
keeps its request id and the server's exactly-once table answers it with the first outcome.
Streaming calls take a *factory* of request frames, because a retry must send them again.

Streaming methods send pre-serialized frames (``adamax_wire.tensors``) and receive chunk
frames as memoryviews; unary methods use the generated message classes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_client.errors import DeadlineExceededError, ProtocolError, UnavailableError, from_rpc_error
from adamax_client.security import BearerTokenInterceptor

T = TypeVar("T")

_SERVICE = pb.DESCRIPTOR.services_by_name["AdamaxService"]
# Method names are unique across the services, so one table serves both.
_SERVICES = (_SERVICE, pb.DESCRIPTOR.services_by_name["CheckpointService"])
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Ping idle connections every 30 s so NATs and load balancers do not drop a worker's channel
# between steps; the server accepts pings that often (adamax_server.transport.server.KEEPALIVE_OPTIONS).
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures; the call's deadline bounds the total time."""

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    max_attempts: int = 8
    jitter: float = 0.2
    retry_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    # Until a call has reached the server once, a refused or unresolvable address fails at
    # once (a typo, a server that is not running) unless this is set: workers started before
    # their server then keep trying until the call's deadline.
    wait_for_server: bool = False

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1.0 + self.jitter * random.uniform(-1.0, 1.0))


DEFAULT_PORT = 50051


def normalize_target(target: str) -> str:
    """``host`` -> ``host:50051`` (gRPC would use 443); ``host:port``, ``[v6]:port`` and URIs unchanged."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"`target` must be 'host:port'. Received: target={target!r}")
    target = target.strip()
    if "://" in target or target.startswith(("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:", "dns:")):
        return target  # a gRPC name URI: the user chose its form
    if target.startswith("["):
        return target if "]:" in target else f"{target}:{DEFAULT_PORT}"
    if target.count(":") > 1:  # a bare IPv6 address
        return f"[{target}]:{DEFAULT_PORT}"
    host, sep, port = target.partition(":")
    if not sep or not port:
        return f"{host}:{DEFAULT_PORT}"
    return target


_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed", "name resolution",
                     "no address", "connect failed", "could not resolve", "unreachable")


def _is_connect_failure(exc: grpc.RpcError) -> bool:
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return any(marker in details.lower() for marker in _CONNECT_FAILURES)


def _connect_reason(exc: grpc.RpcError) -> str:
    details = ((exc.details() if hasattr(exc, "details") else "") or "").lower()
    if "refused" in details:
        return "connection refused"
    if "dns" in details or "resolve" in details or "name resolution" in details:
        return "the host name does not resolve"
    return (exc.details() if hasattr(exc, "details") else None) or "no connection"


class Transport:
    """Calls to one target. Thread safe (gRPC channels are)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        token: str | None = None,
    ) -> None:
        if timeout is None or not timeout > 0:
            raise ValueError(f"`timeout` must be a positive number of seconds. Received: timeout={timeout!r}")
        target = normalize_target(target)
        self.target = target
        self._reached = False  # a call got an answer from the server (any status but a connect failure)
        self.credentials = credentials  # the bulk channel secures its socket the same way
        self.server_name = dict(channel_options).get("grpc.ssl_target_name_override")
        self.timeout = float(timeout)
        self.retry = retry or RetryPolicy()
        options = list(  # later entries override earlier ones
            {
                "grpc.max_receive_message_length": max_message_bytes,
                "grpc.max_send_message_length": max_message_bytes,
                **dict(KEEPALIVE_OPTIONS),
                **dict(channel_options),
            }.items()
        )
        if credentials is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.secure_channel(target, credentials, options=options)
        self._raw_channel = channel
        if token is not None:  # bearer token on every call (see adamax_client.security)
            interceptors = [*interceptors, BearerTokenInterceptor(token)]
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._channel = channel
        self._methods: dict[str, Any] = {}
        for method in (m for service in _SERVICES for m in service.methods):
            path = f"/{method.containing_service.full_name}/{method.name}"
            request_cls = getattr(pb, method.input_type.name)
            response_cls = getattr(pb, method.output_type.name)
            serialize = _wire.identity_serializer if method.client_streaming else request_cls.SerializeToString
            deserialize = (
                _wire.frame_deserializer(response_cls) if method.server_streaming else response_cls.FromString
            )
            kind = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(method.client_streaming, method.server_streaming)]
            self._methods[method.name] = kind(path, request_serializer=serialize, response_deserializer=deserialize)

    # -------------------------------------------------------------- calls

    def _with_retries(self, attempt_fn: Callable[[float], T], timeout: float | None) -> T:
        overall = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + overall
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"call to {self.target} ran out of its {overall:.3g}s deadline while retrying")
            try:
                result = attempt_fn(remaining)
                self._reached = True
                return result
            except grpc.RpcError as exc:
                attempt += 1
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(exc):
                    if not self._reached and not self.retry.wait_for_server:
                        raise UnavailableError(
                            f"cannot connect to adamax-ps at {self.target}: {_connect_reason(exc)} (is "
                            "`adamax-ps serve` running there, on that port? RetryPolicy(wait_for_server=True) "
                            "keeps trying)"
                        ) from exc
                elif code is not None:
                    self._reached = True
                retryable = code in self.retry.retry_codes and attempt < self.retry.max_attempts
                pause = self.retry.backoff(attempt)
                if not retryable or time.monotonic() + pause >= deadline:
                    raise from_rpc_error(exc) from exc
                time.sleep(pause)
            except _wire.WireFormatError as exc:
                raise ProtocolError(f"malformed reply from {self.target}: {exc}") from exc

    def unary(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        call = self._methods[method]
        return self._with_retries(lambda remaining: call(request, timeout=remaining), timeout)

    def stream_unary(self, method: str, frames: Callable[[], Iterator[bytes]], *, timeout: float | None = None) -> Any:
        call = self._methods[method]
        return self._with_retries(lambda remaining: call(frames(), timeout=remaining), timeout)

    def unary_stream(
        self, method: str, request: Any, consume: Callable[[Iterator[Any]], T], *, timeout: float | None = None
    ) -> T:
        """Call and consume the whole reply inside the retry loop (a broken stream is retried)."""
        call = self._methods[method]
        return self._with_retries(lambda remaining: consume(call(request, timeout=remaining)), timeout)

    def stream_stream(
        self,
        method: str,
        frames: Callable[[], Iterator[bytes]],
        consume: Callable[[Iterator[Any]], T],
        *,
        timeout: float | None = None,
    ) -> T:
        call = self._methods[method]
        return self._with_retries(lambda remaining: consume(call(frames(), timeout=remaining)), timeout)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects; UnavailableError otherwise."""
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=self.timeout if timeout is None else timeout)
        except grpc.FutureTimeoutError as exc:
            raise UnavailableError(f"could not connect to {self.target}") from exc

    def close(self) -> None:
        self._channel.close()
