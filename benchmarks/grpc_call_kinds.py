"""What one gRPC Python call costs by kind: unary, unary-stream, stream-stream (an echo server).

    python benchmarks/grpc_call_kinds.py [--calls 2000] [--bytes 200]

Why ``ShardService.CallOnce`` exists: the shard protocol's small calls (a commit at the leader,
prepare and commit on every shard) were streamed calls, and a streamed call costs several times
a unary one here. Prints ms per call, measured one kind after the other in one process.
"""

from __future__ import annotations

import argparse
import time
from concurrent import futures

import grpc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--bytes", type=int, default=200, help="message size")
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda r, c: r),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(lambda r, c: iter([r])),
        "StreamStream": grpc.stream_stream_rpc_method_handler(lambda it, c: (r for r in it)),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    payload = b"x" * args.bytes
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/bench.Echo/Unary")
            unary_stream = channel.unary_stream("/bench.Echo/UnaryStream")
            stream_stream = channel.stream_stream("/bench.Echo/StreamStream")
            kinds = {
                "unary": lambda: unary(payload),
                "unary-stream": lambda: list(unary_stream(payload)),
                "stream-stream": lambda: list(stream_stream(iter([payload]))),
            }
            results = {}
            for name, call in kinds.items():
                for _ in range(max(10, args.calls // 10)):
                    call()
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                results[name] = (time.perf_counter() - start) / args.calls * 1e3
            for name, ms in results.items():
                print(f"{name:14s} {ms:7.3f} ms/call  ({ms / results['unary']:.1f}x unary)")
    finally:
        server.stop(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
