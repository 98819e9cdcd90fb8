"""Assemble a gRPC server: the adamax.v1 service, grpc.health.v1 and server reflection.

``create_server(address) -> (server, port)`` is kept apart from the CLI so tests can bind
``127.0.0.1:0``, start an in-process server and stop it in teardown.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_wire.proto.adamax.v1 import adamax_pb2_grpc as pb_grpc

from adamax_server.transport.admission import AdmissionInterceptor, default_reserved
from adamax_server.transport.budget import CallLimits
from adamax_server.transport.bulk import DEFAULT_STALL_TIMEOUT, BulkServer
from adamax_server.transport.checkpoint_service import CheckpointServicer, add_checkpoint_service
from adamax_server.storage.checkpointing import CheckpointManager
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.ops.metrics import MetricsInterceptor, ServerMetrics
from adamax_server.transport.ports import PortInUse
from adamax_server.transport.security import SecurityConfigError, TokenAuthInterceptor, TokenTable
from adamax_server.transport.service import AdamaxServicer
from adamax_server.transport.validation import ResourceLimits, tolerant_handler

_log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdamaxService"].full_name
# Chunks are a few MiB; leave room for headers and larger client-chosen chunks.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive: the server pings idle clients to find dead peers, and accepts clients' pings (every
# 10 s at most, also without calls) instead of closing their connection with GOAWAY too_many_pings.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class _HandlerCapture:
    """Stands in for a server to collect the generated method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def _serialize_frame(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def method_handlers(servicer: AdamaxServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers, with frame-aware (de)serializers on the streaming methods.

    Request streams parse chunk frames as memoryviews (one copy less); response streams
    accept pre-serialized frames so a cached pull reply is not serialized again.
    """
    capture = _HandlerCapture()
    pb_grpc.add_AdamaxServiceServicer_to_server(servicer, capture)
    methods = pb.DESCRIPTOR.services_by_name["AdamaxService"].methods_by_name
    out = {}
    for name, handler in capture.handlers.items():
        method = methods[name]
        if handler.request_streaming:
            handler = handler._replace(
                request_deserializer=_wire.frame_deserializer(getattr(pb, method.input_type.name))
            )
        if handler.response_streaming:
            handler = handler._replace(response_serializer=_serialize_frame)
        out[name] = tolerant_handler(handler)  # unparsable input -> INVALID_ARGUMENT, not INTERNAL
    return out


def create_server(
    address: str = "127.0.0.1:0",
    *,
    coordinator: Coordinator | None = None,
    device: str = "auto",
    max_workers: int = 32,
    chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
    max_tensor_bytes: int = _wire.DEFAULT_MAX_TENSOR_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    tokens: TokenTable | None = None,
    metrics: ServerMetrics | None = None,
    limits: ResourceLimits | None = None,
    max_concurrent_rpcs: int | None = None,
    reflection: bool = True,
    checkpoints: CheckpointManager | None = None,
    options: Sequence[tuple[str, Any]] = (),
    bulk: bool | None = None,
    bulk_port: int = 0,
    shared_memory: bool = True,
    bulk_stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    call_limits: CallLimits | None = None,
    reserved_threads: int | None = None,
    bulk_tls: ssl.SSLContext | None = None,
) -> tuple[grpc.Server, int]:
    """Create (not start) a server bound to ``address``; returns it and the bound port.

    Waiting pulls and open sync rounds over gRPC each hold a worker thread, so ``max_workers``
    minus ``reserved_threads`` should exceed the number of gRPC workers of the largest job
    (pushes and pulls over the bulk channel hold none). ``tokens`` turns on bearer-token auth,
    ``metrics`` counts every call (pass the same object as the coordinator's ``observer``),
    ``max_concurrent_rpcs`` answers calls beyond it with RESOURCE_EXHAUSTED, and
    ``reflection=False`` hides the service descriptions (production).

    ``bulk`` opens the bulk channel (raw TCP on ``bulk_port`` of the same host, plus shared
    memory for same-host workers unless ``shared_memory=False``; see ``bulk.py``). With TLS
    ``credentials`` the bulk channel is TLS too: ``bulk_tls`` is its ``ssl.SSLContext`` with the
    same certificate and client-certificate rules (``security.bulk_server_context(config)``).
    ``bulk=None`` (default): on, except with TLS credentials but no ``bulk_tls`` (a plaintext
    bulk port next to a TLS gRPC port is refused, also with ``bulk=True``). A bulk call whose
    peer sends nothing for ``bulk_stall_timeout`` seconds fails (nothing applied) and its
    connection closes.

    ``call_limits`` (``transport.budget.CallLimits``) are the time budgets of pushes and pulls
    on both transports (its ``stall`` defaults to ``bulk_stall_timeout``); ``reserved_threads``
    of the ``max_workers`` threads are kept for unary (control) calls (default: a quarter, 1 to
    4; ``transport.admission``), so streams cannot take every thread.
    """
    if bulk_tls is not None and credentials is None:
        raise SecurityConfigError("`bulk_tls` needs TLS `credentials` for the gRPC port as well")
    if bulk is None:
        bulk = credentials is None or bulk_tls is not None
    elif bulk and credentials is not None and bulk_tls is None:
        raise SecurityConfigError(
            "a TLS server's bulk channel needs its TLS context (bulk_tls=bulk_server_context(config)); "
            "a plaintext bulk port next to TLS is refused (use --no-bulk)"
        )
    coordinator = coordinator or Coordinator(device=device, observer=metrics)
    call_limits = call_limits or CallLimits(stall=bulk_stall_timeout)
    reserved = default_reserved(max_workers) if reserved_threads is None else reserved_threads
    if not 0 <= reserved < max_workers:
        raise ValueError(f"`reserved_threads` must be in [0, max_workers={max_workers}). Received: {reserved}")
    admission = AdmissionInterceptor(max_workers - reserved)
    chain: list[grpc.ServerInterceptor] = []
    if metrics is not None:
        chain.append(MetricsInterceptor(metrics))  # outermost: refused calls are counted too
    if tokens is not None:
        chain.append(TokenAuthInterceptor(tokens))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adamax-rpc"),
        interceptors=[*chain, *interceptors, admission],  # admission innermost: after auth
        options=list(  # later entries override earlier ones
            {
                "grpc.max_receive_message_length": max_message_bytes,
                "grpc.max_send_message_length": max_message_bytes,
                # gRPC sets SO_REUSEPORT by default: a second server on a port in use would bind
                # too and share its connections. One server per port.
                "grpc.so_reuseport": 0,
                **dict(KEEPALIVE_OPTIONS),
                **dict(options),
            }.items()
        ),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    if limits is not None:
        max_tensor_bytes = min(max_tensor_bytes, limits.max_bytes_per_optimizer or max_tensor_bytes)
    bulk_server = None
    if bulk:
        bulk_server = BulkServer(
            coordinator, host=_host_of(address), port=bulk_port, shared_memory=shared_memory,
            max_tensor_bytes=max_tensor_bytes, metrics=metrics, limits=call_limits, tls=bulk_tls,
        ).start()  # fmt: skip
    servicer = AdamaxServicer(
        coordinator, chunk_bytes=chunk_bytes, max_tensor_bytes=max_tensor_bytes, limits=limits or ResourceLimits(),
        bulk=bulk_server, call_limits=call_limits,
    )  # fmt: skip
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    # Without a checkpoint directory the service still streams live state in and out.
    checkpoints = checkpoints or CheckpointManager(coordinator)
    add_checkpoint_service(
        server, CheckpointServicer(checkpoints, chunk_bytes=chunk_bytes, max_tensor_bytes=max_tensor_bytes)
    )

    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        grpc_reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, grpc_reflection.SERVICE_NAME),
            server,
        )

    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises "Failed to bind to address ..." (details only in its C-core log)
        port = 0
    if port == 0:
        if bulk_server is not None:
            bulk_server.close()
        host = address.rpartition(":")[0]
        raise PortInUse(errno.EADDRINUSE, f"cannot bind the gRPC port {address}: it is in use or {host or 'the host'} "
                        "is no address of this machine")
    server.bulk = bulk_server  # type: ignore[attr-defined]
    server.admission = admission  # type: ignore[attr-defined]
    server.coordinator = coordinator  # type: ignore[attr-defined]  # for the CLI and tests
    server.health = health_servicer  # type: ignore[attr-defined]
    server.metrics = metrics  # type: ignore[attr-defined]
    server.checkpoints = checkpoints  # type: ignore[attr-defined]
    return server, port


def stop_server(server: grpc.Server, grace: float | None = 1.0) -> None:
    """Mark NOT_SERVING, wake waiting pulls, and stop."""
    health_servicer = getattr(server, "health", None)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    coordinator = getattr(server, "coordinator", None)
    if coordinator is not None:
        coordinator.close()
    server.stop(grace).wait()
    close_bulk(server)


def close_bulk(server: grpc.Server) -> None:
    """Close the server's bulk channel, if it has one (after the gRPC server stopped)."""
    bulk_server = getattr(server, "bulk", None)
    if bulk_server is not None:
        bulk_server.close()


def _host_of(address: str) -> str:
    """The host part of a gRPC bind address ("[::]:50051" -> "::", "0.0.0.0:0" -> "0.0.0.0")."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    return host or "0.0.0.0"
