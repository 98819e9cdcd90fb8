"""``adamax-ps`` command line: ``serve`` a parameter server, show a running one's ``status``.

    adamax-ps serve --host 0.0.0.0 --port 50051 --device auto
    adamax-ps status --target 127.0.0.1:50051 [--metrics 127.0.0.1:9100]
    adamax-ps health --address 127.0.0.1:50051     (exit 0 when SERVING: Docker's HEALTHCHECK)
    adamax-ps delete JOB --target 127.0.0.1:50051  (delete an optimizer: weights, state, workers)

Every flag of ``serve`` can also be set by an environment variable (``--tls-cert`` <-
``ADAMAX_PS_TLS_CERT``; see ``adamax_server.cli.runtime``); flags win over the environment.
    adamax-ps demo ...          (implemented by adamax_server.cli.demo:run_demo)
    adamax-ps bench NAME ...    (the measurement suite of benchmarks/, see adamax_server.cli.bench)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

_log = logging.getLogger("adamax_server")


def _serve(args: argparse.Namespace) -> int:
    if args.shards:
        from adamax_server.cli.shard_cli import serve_sharded

        return serve_sharded(args)
    from adamax_server.coordination.coordinator import Coordinator
    from adamax_server.ops.metrics import ServerMetrics
    from adamax_server.cli.runtime import GracefulShutdown, server_kwargs
    from adamax_server.transport.security import SecurityConfigError
    from adamax_server.transport.server import create_server

    try:
        hardening = server_kwargs(args)  # TLS, tokens, limits: refuse to start on a bad setup
    except (SecurityConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = ServerMetrics()
    coordinator = Coordinator(
        device=args.device, dedup_capacity=args.dedup_capacity, max_optimizers=args.max_optimizers, observer=metrics
    )
    from adamax_server.cli.checkpoint_cli import final_checkpoint, manager_from_args

    try:  # restores --restore before the server takes any call
        checkpoints = manager_from_args(args, coordinator)
    except Exception as exc:  # noqa: BLE001 - a bad directory or checkpoint: refuse to start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if checkpoints is not None:
        checkpoints.on_saved = metrics.observe_checkpoint
        checkpoints.on_failed = metrics.observe_checkpoint_failure
    server, port = create_server(
        f"{args.host}:{args.port}",
        coordinator=coordinator,
        max_workers=args.max_threads,
        chunk_bytes=args.chunk_mib * 1024 * 1024,
        max_tensor_bytes=int(args.max_tensor_gib * 1024**3),
        metrics=metrics,
        checkpoints=checkpoints,
        **hardening,
    )
    shutdown = GracefulShutdown(
        server,
        grace=args.grace,
        final_checkpoint=(lambda: final_checkpoint(checkpoints)) if checkpoints is not None else None,
        on_stopped=[metrics.close],
    )
    shutdown.install()
    server.start()
    if checkpoints is not None:
        checkpoints.start()
    # The line scripts and tests wait for; with --port 0 it is the only way to learn the port.
    _log.info("adamax-ps listening on %s:%d (device=%s, tls=%s, auth=%s)", args.host, port, args.device,
              "credentials" in hardening, "tokens" in hardening)
    print(f"listening on {args.host}:{port}", flush=True)
    bulk = getattr(server, "bulk", None)
    if bulk is not None:
        _log.info("bulk channel on %s:%d (tls=%s, shared memory for same-host workers: %s)", args.host, bulk.port,
                  bulk.tls is not None, bulk.shared_memory)
    else:
        _log.info("bulk channel off: tensors travel in gRPC streams")
    if args.metrics_port is not None:
        # Unauthenticated (it names the optimizers): only as reachable as the server itself,
        # unless --metrics-host says otherwise.
        metrics_host = args.metrics_host or args.host
        metrics_port = metrics.serve_http(args.metrics_port, metrics_host)
        _log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port)
        print(f"metrics on {metrics_host}:{metrics_port}", flush=True)
    return shutdown.run()


def _status(args: argparse.Namespace) -> int:
    if "," in args.target:
        from adamax_server.cli.shard_cli import run_sharded_status

        return run_sharded_status(args)
    from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
    from adamax_client.errors import AdamaxError
    from adamax_client.transport import Transport

    from adamax_server.cli.runtime import client_connection
    from adamax_server.cli.status_view import metrics_summary

    try:
        transport = Transport(args.target, timeout=args.timeout, **client_connection(args))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        response = transport.unary("ListOptimizers", pb.ListOptimizersRequest())
    except AdamaxError as exc:
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    finally:
        transport.close()
    summary = metrics_summary(args.metrics, timeout=args.timeout) if args.metrics else None
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
        print(json.dumps({"optimizers": rows, "metrics": summary} if summary is not None else rows, indent=2))
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
    if summary is not None:
        from adamax_server.cli.status_view import format_summary

        print(format_summary(summary))
    return 0


def _delete(args: argparse.Namespace) -> int:
    from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
    from adamax_client.errors import AdamaxError
    from adamax_client.transport import Transport

    from adamax_server.cli.runtime import client_connection

    try:
        transport = Transport(args.target, timeout=args.timeout, **client_connection(args))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    try:
        for name in args.names:
            response = transport.unary("DeleteOptimizer", pb.OptimizerRef(optimizer=name))
            if response.deleted:
                print(f"deleted {name}")
            else:
                print(f"{args.target}: no optimizer named {name!r}", file=sys.stderr)
                status = 1
    except AdamaxError as exc:  # a token that may not touch it, an unreachable server...
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    finally:
        transport.close()
    return status


def _health(args: argparse.Namespace) -> int:
    from adamax_server.cli.runtime import check_health, client_connection

    import grpc

    try:
        status = check_health(args.address, timeout=args.timeout, service=args.service,
                              connection=client_connection(args))
    except (grpc.RpcError, ValueError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else exc
        print(f"unhealthy: {args.address}: {detail}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _demo(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        from adamax_server.cli.demo import run_demo  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"the demo is not available in this installation: {exc}", file=sys.stderr)
        return 2
    result = run_demo(list(rest))
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    from adamax_server.cli.runtime import add_server_arguments, add_tls_client_arguments, env_default, env_name

    parser = argparse.ArgumentParser(prog="adamax-ps", description="Keras-exact Adamax parameter server")
    parser.add_argument("--log-level", default=env_default("--log-level", "INFO"), help="logging level (default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default=env_default("--log-format", "text"),
                        help="text, or one JSON object a line [env ADAMAX_PS_LOG_FORMAT]")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a parameter server")
    serve.add_argument("--host", default=env_default("--host", "127.0.0.1"),
                       help=f"address to bind (0.0.0.0 for all) [env {env_name('--host')}]")
    serve.add_argument("--port", type=int, default=env_default("--port", 50051),
                       help=f"port (0 picks a free one) [env {env_name('--port')}]")
    serve.add_argument("--device", choices=("auto", "cpu", "gpu"), default=env_default("--device", "auto"))
    serve.add_argument("--max-threads", type=int, default=32, help="RPC worker threads")
    serve.add_argument("--chunk-mib", type=int, default=2, help="tensor chunk size on the wire")
    serve.add_argument("--max-tensor-gib", type=float, default=64.0, help="largest tensor accepted")
    serve.add_argument("--max-optimizers", type=int, default=1024)
    serve.add_argument("--dedup-capacity", type=int, default=1024, help="remembered request ids per worker")
    serve.add_argument("--grace", type=float, default=env_default("--grace", 5.0),
                       help="seconds to finish calls on SIGTERM (keep it under Docker's 10 s stop timeout)")
    add_server_arguments(serve)
    from adamax_server.cli.checkpoint_cli import add_checkpoint_arguments, add_checkpoint_commands

    add_checkpoint_arguments(serve)
    add_checkpoint_commands(sub)
    from adamax_server.cli.shard_cli import add_shard_arguments

    add_shard_arguments(serve)

    status = sub.add_parser("status", help="list optimizers, versions and workers of a server")
    status.add_argument("--target", default="127.0.0.1:50051", help="host:port, or a sharded job's shard list A0,A1,...")
    status.add_argument("--timeout", type=float, default=10.0)
    status.add_argument("--json", action="store_true")
    status.add_argument("--metrics", default=env_default("--metrics"),
                        help="host:port of the server's metrics endpoint, to add its counters [env ADAMAX_PS_METRICS]")
    add_tls_client_arguments(status)

    health = sub.add_parser("health", help="exit 0 when the server's health service says SERVING (Docker HEALTHCHECK)")
    health.add_argument("--address", default=f"127.0.0.1:{env_default('--port', 50051)}")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    add_tls_client_arguments(health)

    delete = sub.add_parser("delete", help="delete optimizers (jobs) of a running server: weights, state, workers")
    delete.add_argument("names", nargs="+", metavar="NAME", help="optimizer (job) name")
    delete.add_argument("--target", default="127.0.0.1:50051")
    delete.add_argument("--timeout", type=float, default=10.0)
    add_tls_client_arguments(delete)

    sub.add_parser("demo", help="run the demo (arguments are passed on)", add_help=False)
    sub.add_parser("bench", help="run a benchmark of benchmarks/ (arguments are passed on)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    from adamax_server.ops.logging_setup import configure_logging
    from adamax_server.cli.runtime import unknown_env

    configure_logging(args.log_level, args.log_format)
    if args.command == "demo":
        return _demo(args, rest)
    if args.command == "bench":
        from adamax_server.cli.bench import run_bench

        return run_bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for name in unknown_env():
        _log.warning("environment variable %s is not a setting of adamax-ps; ignored", name)
    if args.command == "serve":
        return _serve(args)
    if args.command == "health":
        return _health(args)
    if args.command == "delete":
        return _delete(args)
    if args.command == "checkpoint":
        if "," in args.target:
            from adamax_server.cli.shard_cli import run_sharded_checkpoint

            return run_sharded_checkpoint(args)
        from adamax_server.cli.checkpoint_cli import run_checkpoint_command

        return run_checkpoint_command(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
