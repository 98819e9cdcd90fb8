"""Benchmark-only gRPC service moving raw bytes: the alternative transports of the sweep.

Not the product's wire contract (that is proto/adamax/v1). Methods take and return ``bytes``
with identity (de)serializers, so the figures show what gRPC itself costs for each way of
moving one large buffer:

* ``Unary``: the whole buffer in one message (what a naive service does);
* ``PushStream`` / ``PullStream``: one call, the buffer as a stream of chunks;
* ``PushChunk`` / ``PullChunk``: one unary call per chunk (8-byte offset header), issued
  concurrently, over one or several channels.

Run as ``python benchmarks/_bytes_service.py SIZE``: prints "listening on 127.0.0.1:PORT".
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

SERVICE = "bench.Bytes"
MAX_MESSAGE = 1 << 30
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
_ident = (lambda b: b)  # noqa: E731


def _handlers(size: int) -> grpc.GenericRpcHandler:
    store = bytearray(size)  # where received bytes land, like a tensor being assembled
    view = memoryview(store)
    lock = threading.Lock()

    def unary(request: bytes, context: object) -> bytes:
        if len(request) <= 16:  # a pull request: answer with the whole buffer
            return bytes(view)
        view[: len(request)] = request
        return b"k"

    def push_stream(chunks: Iterator[bytes], context: object) -> bytes:
        offset = 0
        for chunk in chunks:
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        return b"k"

    def pull_stream(request: bytes, context: object) -> Iterator[bytes]:
        chunk = struct.unpack("<Q", request)[0]
        for start in range(0, size, chunk):
            yield bytes(view[start : start + chunk])

    def push_chunk(request: bytes, context: object) -> bytes:
        offset = struct.unpack_from("<Q", request)[0]
        with lock:
            view[offset : offset + len(request) - 8] = memoryview(request)[8:]
        return b"k"

    def pull_chunk(request: bytes, context: object) -> bytes:
        offset, length = struct.unpack("<QQ", request)
        return bytes(view[offset : offset + length])

    kw = {"request_deserializer": _ident, "response_serializer": _ident}
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "PushStream": grpc.stream_unary_rpc_method_handler(push_stream, **kw),
        "PullStream": grpc.unary_stream_rpc_method_handler(pull_stream, **kw),
        "PushChunk": grpc.unary_unary_rpc_method_handler(push_chunk, **kw),
        "PullChunk": grpc.unary_unary_rpc_method_handler(pull_chunk, **kw),
    })


def serve(size: int, address: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(size),))
    port = server.add_insecure_port(address)
    return server, port


class BytesClient:
    """Moves one buffer to/from the bytes service in each of the ways above."""

    def __init__(self, target: str, channels: int = 1) -> None:
        self.channels = [grpc.insecure_channel(target, options=[*OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(channels)]
        self._m = [{name: self._method(ch, name) for name in ("Unary", "PushStream", "PullStream", "PushChunk",
                                                                "PullChunk")} for ch in self.channels]

    @staticmethod
    def _method(channel: grpc.Channel, name: str) -> object:
        path = f"/{SERVICE}/{name}"
        kw = {"request_serializer": _ident, "response_deserializer": _ident}
        if name == "PushStream":
            return channel.stream_unary(path, **kw)
        if name == "PullStream":
            return channel.unary_stream(path, **kw)
        return channel.unary_unary(path, **kw)

    def push_unary(self, data: memoryview) -> None:
        self._m[0]["Unary"](bytes(data), timeout=300)

    def pull_unary(self) -> bytes:
        return self._m[0]["Unary"](b"", timeout=300)

    def push_stream(self, data: memoryview, chunk: int) -> None:
        self._m[0]["PushStream"]((bytes(data[i : i + chunk]) for i in range(0, len(data), chunk)), timeout=300)

    def pull_stream(self, out: memoryview, chunk: int) -> None:
        offset = 0
        for piece in self._m[0]["PullStream"](struct.pack("<Q", chunk), timeout=300):
            out[offset : offset + len(piece)] = piece
            offset += len(piece)

    def push_chunks(self, data: memoryview, chunk: int, inflight: int = 8) -> None:
        """Concurrent unary chunk calls, round-robin over the channels, at most ``inflight`` at once."""
        pending: list[grpc.Future] = []
        for k, i in enumerate(range(0, len(data), chunk)):
            if len(pending) >= inflight:
                pending.pop(0).result()
            method = self._m[k % len(self._m)]["PushChunk"]
            pending.append(method.future(struct.pack("<Q", i) + bytes(data[i : i + chunk]), timeout=300))
        for f in pending:
            f.result()

    def pull_chunks(self, out: memoryview, chunk: int, inflight: int = 8) -> None:
        pending: list[tuple[int, grpc.Future]] = []

        def land(item: tuple[int, grpc.Future]) -> None:
            offset, fut = item
            piece = fut.result()
            out[offset : offset + len(piece)] = piece

        for k, i in enumerate(range(0, len(out), chunk)):
            if len(pending) >= inflight:
                land(pending.pop(0))
            method = self._m[k % len(self._m)]["PullChunk"]
            pending.append((i, method.future(struct.pack("<QQ", i, min(chunk, len(out) - i)), timeout=300)))
        for item in pending:
            land(item)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


if __name__ == "__main__":
    srv, bound = serve(int(sys.argv[1]))
    srv.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    srv.wait_for_termination()
