"""Threads for control calls, whatever the data calls do.

grpc-python's sync server runs every call on one thread of a fixed pool from its start to its
end, including the time a handler blocks: a pull waiting for a version, a reply the client does
not read (gRPC's send waits for flow control), a push whose client stopped sending. Calls that
find every thread busy queue without a limit (``maximum_concurrent_rpcs`` would refuse them, but
control calls just as much as data calls). So a client that opens enough streams could stop the
whole server, CreateOptimizer and health included.

:class:`AdmissionInterceptor` keeps ``reserved`` threads of the pool for unary calls (control:
CreateOptimizer, GetOptimizer, OpenBulkChannel, SaveCheckpoint, health Check, ...): streaming
calls (Push, Pull, Build, checkpoint transfers, health Watch, reflection) may hold at most
``pool - reserved`` threads together, and one more is answered UNAVAILABLE ("busy", which
clients retry with backoff) at once, without waiting for a thread. Together with the budgets of
``transport.budget`` (a stalled push or an unread pull is cancelled, a pull waits at most
``max_wait``), a client can occupy data threads only while it keeps moving bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from adamax_server.errors import Unavailable, status_for


def default_reserved(pool: int) -> int:
    """Threads kept for control calls in a pool of ``pool``: a quarter, between 1 and 4."""
    return max(1, min(4, pool // 4))


class AdmissionInterceptor(grpc.ServerInterceptor):
    """At most ``slots`` streaming calls at a time; see the module docstring."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"`slots` must be >= 1 (a pool larger than the reserved threads). Received: {slots}")
        self.slots = slots
        self._free = threading.BoundedSemaphore(slots)
        self.refused = 0

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        return _limited(handler, self, details.method)

    def _refuse(self, context: grpc.ServicerContext, method: str) -> None:
        self.refused += 1
        info = status_for(Unavailable(
            f"server busy: all {self.slots} threads for streaming calls are in use ({method}); retry with backoff"
        ))
        context.abort(grpc.StatusCode[info.code], info.message)


def _limited(handler: grpc.RpcMethodHandler, gate: AdmissionInterceptor, method: str) -> grpc.RpcMethodHandler:
    kind = {
        (True, True): "stream_stream", (True, False): "stream_unary",
        (False, True): "unary_stream", (False, False): "unary_unary",
    }[(handler.request_streaming, handler.response_streaming)]  # fmt: skip
    inner = getattr(handler, kind)

    if handler.response_streaming:

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if not gate._free.acquire(blocking=False):
                gate._refuse(context, method)
            try:  # the thread is held until the last response went out
                yield from inner(request, context)
            finally:
                gate._free.release()

        return handler._replace(**{kind: streaming})

    def unary_reply(request: Any, context: grpc.ServicerContext) -> Any:
        if not gate._free.acquire(blocking=False):
            gate._refuse(context, method)
        try:
            return inner(request, context)
        finally:
            gate._free.release()

    return handler._replace(**{kind: unary_reply})
