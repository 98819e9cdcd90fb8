"""A shard server: ``ShardService`` (with health and reflection) on one address, and its servicer.

``create_shard_server(address, shard_index, shards)`` is what ``adamax-ps serve --shard-index I
--shards A0,A1,...`` runs; tests bind port 0 on every shard first and then hand each registry
the real list (``server.shard_registry.set_shards``).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adamax_wire import pb
from adamax_wire import shard_codec as codec
from adamax_wire import tensors as _wire

from adamax_server.errors import InvalidArgument, status_for
from adamax_server.sharding import bulk as shard_bulk
from adamax_server.sharding.bulk import ShardBulkHosts
from adamax_server.sharding.healing import ShardWatch
from adamax_server.sharding.rpc import SERVICE, ShardRegistry, _call_frames, _decode_call
from adamax_server.sharding.warmup import warm_up
from adamax_server.transport.budget import CallLimits
from adamax_server.transport.bulk import BulkServer
from adamax_server.transport.security import SecurityConfigError, peer_identities

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def create_shard_server(
    address: str,
    shard_index: int,
    shards: Sequence[str],
    *,
    max_workers: int = 32,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    bulk: bool | None = None,
    bulk_port: int = 0,
    bulk_tls: ssl.SSLContext | None = None,
    shared_memory: bool = True,
    call_limits: CallLimits | None = None,
    warm: bool = True,
    watch_interval: float | None = 2.0,
    **registry_kwargs: Any,
) -> tuple[grpc.Server, int]:
    """Create (not start) a shard server; returns it and the bound port.

    ``registry_kwargs`` go to ``ShardRegistry`` (device, checkpoint_dir, staging_ttl,
    call_timeout, min_piece_bytes, link_credentials, link_token, auto_heal).
    ``bulk`` opens this shard's bulk channel (``sharding.bulk``: staging and pulls over TCP on
    ``bulk_port`` of the same host), as on a single server: ``None`` (default) on, except with
    TLS ``credentials`` but no ``bulk_tls`` (the channel's ``ssl.SSLContext``,
    ``security.bulk_server_context``); a plaintext bulk port next to a TLS gRPC port is refused.
    ``shared_memory``: workers on this host stage and pull through shared memory (as on a
    single server; ``sharding.bulk``).
    ``watch_interval``: seconds between the leader's looks for a restarted shard
    (``sharding.healing``; None: only a push notices one). ``warm`` loads the step kernels first (``sharding.warmup``), so that the first event the
    leader sends is not held up past ``call_timeout`` by a kernel compile or cache load.
    """
    if bulk_tls is not None and credentials is None:
        raise SecurityConfigError("`bulk_tls` needs TLS `credentials` for the gRPC port as well")
    if bulk is None:
        bulk = credentials is None or bulk_tls is not None
    elif bulk and credentials is not None and bulk_tls is None:
        raise SecurityConfigError(
            "a TLS shard's bulk channel needs its TLS context (bulk_tls=bulk_server_context(config)); "
            "a plaintext bulk port next to TLS is refused (use --no-bulk)"
        )
    registry = ShardRegistry(shard_index, shards, **registry_kwargs)
    if warm:
        warm_up(registry.device)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"adamax-shard{shard_index}"),
        interceptors=list(interceptors),
        options=list(
            {
                "grpc.max_receive_message_length": DEFAULT_MAX_MESSAGE_BYTES,
                "grpc.max_send_message_length": DEFAULT_MAX_MESSAGE_BYTES,
                **dict(options),
            }.items()
        ),
    )
    add_shard_service(server, ShardServicer(registry))
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    if bulk:
        host = address.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        registry.bulk = BulkServer(
            ShardBulkHosts(registry), host=host, port=bulk_port, shared_memory=shared_memory, limits=call_limits,  # type: ignore[arg-type]
            max_tensor_bytes=DEFAULT_MAX_MESSAGE_BYTES, tls=bulk_tls,
        ).start()  # fmt: skip
    server.bulk = registry.bulk  # type: ignore[attr-defined]
    server.shard_watch = None  # type: ignore[attr-defined]
    if shard_index == 0 and watch_interval:
        server.shard_watch = ShardWatch(registry, watch_interval).start()  # type: ignore[attr-defined]
    server.shard_registry = registry  # type: ignore[attr-defined]
    server.health = health_servicer  # type: ignore[attr-defined]
    return server, port


def stop_shard_server(server: grpc.Server, grace: float | None = 1.0) -> None:
    server.health.enter_graceful_shutdown()  # type: ignore[attr-defined]
    if server.shard_watch is not None:  # type: ignore[attr-defined]
        server.shard_watch.close()  # type: ignore[attr-defined]
    server.shard_registry.close()  # type: ignore[attr-defined]
    server.stop(grace).wait()
    if server.bulk is not None:  # type: ignore[attr-defined]
        server.bulk.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the servicer


class ShardServicer:
    """``ShardService.Call`` (and ``CallOnce``, the same in one message each way): frames in,
    ``ShardRegistry.dispatch``, frames out."""

    def __init__(self, registry: ShardRegistry) -> None:
        self.registry = registry

    def Call(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._serve(request_iterator, context)

    def CallOnce(self, request: Any, context: grpc.ServicerContext) -> bytes:
        return codec.batch_bytes(self._serve(iter(request.frames), context))

    def _serve(self, frames_in: Iterator[Any], context: grpc.ServicerContext) -> list[bytes]:
        try:
            head, args = _decode_call(frames_in)
            if not isinstance(args, list):
                raise InvalidArgument("shard call arguments must be a list")
            if head.method == "open_bulk":  # the ticket is bound to the caller's certificate
                result = shard_bulk.open_bulk(self.registry, head.optimizer, args, peer_identities(context))
            else:
                result = self.registry.dispatch(head.optimizer, head.method, args)
            return _call_frames(head.optimizer, "", result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            info = status_for(exc)
            context.set_trailing_metadata(info.metadata)
            context.abort(grpc.StatusCode[info.code], info.message)
            raise  # not reached: abort raises


def add_shard_service(server: grpc.Server, servicer: ShardServicer) -> None:
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Call,
        request_deserializer=_wire.frame_deserializer(pb.ShardCallFrame),
        response_serializer=lambda frame: frame,
    )
    once = grpc.unary_unary_rpc_method_handler(
        servicer.CallOnce, request_deserializer=pb.ShardCallBatch.FromString, response_serializer=lambda b: b
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Call": handler, "CallOnce": once}),))
