"""``adamax-ps`` command line: ``serve`` a parameter server, show a running one's ``status``.

    adamax-ps serve --host 0.0.0.0 --port 50051 --device auto
    adamax-ps status --target 127.0.0.1:50051
    adamax-ps demo ...          (implemented by adamax_server.demo:run_demo)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

_log = logging.getLogger("adamax_server")


def _serve(args: argparse.Namespace) -> int:
    from .coordinator import Coordinator
    from .server import create_server, stop_server

    coordinator = Coordinator(
        device=args.device, dedup_capacity=args.dedup_capacity, max_optimizers=args.max_optimizers
    )
    server, port = create_server(
        f"{args.host}:{args.port}",
        coordinator=coordinator,
        max_workers=args.max_threads,
        chunk_bytes=args.chunk_mib * 1024 * 1024,
        max_tensor_bytes=int(args.max_tensor_gib * 1024**3),
    )
    server.start()
    # The line scripts and tests wait for; with --port 0 it is the only way to learn the port.
    _log.info("adamax-ps listening on %s:%d (device=%s)", args.host, port, args.device)
    print(f"listening on {args.host}:{port}", flush=True)

    stopped = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    stopped.wait()
    _log.info("shutting down")
    stop_server(server, grace=args.grace)
    return 0


def _status(args: argparse.Namespace) -> int:
    from adamax_client._proto.adamax.v1 import adamax_pb2 as pb
    from adamax_client.errors import AdamaxError
    from adamax_client.transport import Transport

    transport = Transport(args.target, timeout=args.timeout)
    try:
        response = transport.unary("ListOptimizers", pb.ListOptimizersRequest())
    except AdamaxError as exc:
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    finally:
        transport.close()
    rows = []
    for info in response.optimizers:
        rows.append(
            {
                "optimizer": info.optimizer,
                "mode": "sync" if info.policy.mode == pb.SYNC else "async",
                "built": info.built,
                "version": info.version,
                "iterations": info.iterations,
                "learning_rate": info.learning_rate,
                "variables": len(info.variables),
                "round_arrivals": list(info.round_arrivals),
                "workers": [
                    {"worker_id": w.worker_id, "last_step": w.last_step, "pushes": w.pushes,
                     "seconds_since_seen": round(w.seconds_since_seen, 1)}
                    for w in info.workers
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{args.target}: no optimizers")
    for row in rows:
        print(
            f"{row['optimizer']}: mode={row['mode']} built={row['built']} version={row['version']} "
            f"iterations={row['iterations']} lr={row['learning_rate']:.6g} variables={row['variables']}"
        )
        for w in row["workers"]:
            print(f"  worker {w['worker_id']}: last_step={w['last_step']} pushes={w['pushes']} "
                  f"seen {w['seconds_since_seen']}s ago")
    return 0


def _demo(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        from .demo import run_demo  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"the demo is not available in this installation: {exc}", file=sys.stderr)
        return 2
    result = run_demo(list(rest))
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamax-ps", description="Keras-exact Adamax parameter server")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a parameter server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    serve.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    serve.add_argument("--max-threads", type=int, default=32, help="RPC worker threads")
    serve.add_argument("--chunk-mib", type=int, default=2, help="tensor chunk size on the wire")
    serve.add_argument("--max-tensor-gib", type=float, default=64.0, help="largest tensor accepted")
    serve.add_argument("--max-optimizers", type=int, default=1024)
    serve.add_argument("--dedup-capacity", type=int, default=1024, help="remembered request ids per worker")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on shutdown")

    status = sub.add_parser("status", help="list optimizers, versions and workers of a server")
    status.add_argument("--target", default="127.0.0.1:50051")
    status.add_argument("--timeout", type=float, default=10.0)
    status.add_argument("--json", action="store_true")

    sub.add_parser("demo", help="run the demo (arguments are passed on)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "serve":
        return _serve(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
