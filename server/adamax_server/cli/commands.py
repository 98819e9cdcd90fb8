"""``adamax-ps`` command line: ``serve`` a parameter server, show a running one's ``status``.

    adamax-ps serve --host 0.0.0.0 --port 50051 --device auto
    adamax-ps status --target 127.0.0.1:50051 [--metrics 127.0.0.1:9100]
    adamax-ps health [--target 127.0.0.1:50051]   (exit 0 when SERVING: Docker's HEALTHCHECK)
    adamax-ps delete JOB --target 127.0.0.1:50051  (delete an optimizer: weights, state, workers)

Every flag of ``serve`` can also be set by an environment variable (``--tls-cert`` <-
``ADAMAX_PS_TLS_CERT``; see ``adamax_server.cli.runtime``); flags win over the environment.
``--log-level`` and ``--log-format`` go before or after the command.
    adamax-ps demo ...          (implemented by adamax_server.cli.demo:run_demo)
    adamax-ps bench NAME ...    (the measurement suite of benchmarks/, see adamax_server.cli.bench)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from adamax_server.cli.serve import DEFAULT_PORT
from adamax_server.ops.logging_setup import LEVELS

_log = logging.getLogger("adamax_server")


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


def _health_target(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Where ``health`` asks, and with what connection settings (see ``adamax_server.cli.health_file``)."""
    from adamax_server.cli.health_file import local_address, read_health_file
    from adamax_server.cli.runtime import client_connection

    own_tls = bool(args.tls_ca or args.tls_client_cert)
    if args.target or not args.health_file:
        return args.target or f"127.0.0.1:{DEFAULT_PORT}", client_connection(args)
    try:
        info = read_health_file(args.health_file)
    except FileNotFoundError:
        raise OSError(f"no health file {args.health_file} (is adamax-ps serve running, and has it started?)") from None
    if info.get("tls") and not own_tls:
        if not info.get("local_health_port"):
            raise ValueError(f"{args.health_file}: the server uses TLS; give health --tls-ca "
                             "(ADAMAX_PS_HEALTH_TLS_CA) to check it")
        return f"127.0.0.1:{info['local_health_port']}", {}
    return local_address(str(info.get("host", "")), int(info["port"])), client_connection(args)


def _health(args: argparse.Namespace) -> int:
    import grpc

    from adamax_server.cli.runtime import check_health

    where = args.target or args.health_file or f"127.0.0.1:{DEFAULT_PORT}"
    try:
        target, connection = _health_target(args)
        where = target
        status = check_health(target, timeout=args.timeout, service=args.service, connection=connection)
    except (grpc.RpcError, ValueError, OSError) as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else exc
        print(f"unhealthy: {where}: {detail}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


class _DeprecatedAlias(argparse.Action):
    """``--address`` of ``health``: still accepted, with a note to use ``--target``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"adamax-ps {parser.prog.split()[-1]}: {option_string} is deprecated; use --target", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _demo(args: argparse.Namespace, rest: Sequence[str]) -> int:
    try:
        from adamax_server.cli.demo import run_demo  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"the demo is not available in this installation: {exc}", file=sys.stderr)
        return 2
    result = run_demo(list(rest))
    return int(result or 0)


def _global_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--log-level / --log-format, on the top parser (with defaults) and on every command (without,
    so a flag after the command wins and one before it is not reset)."""
    from adamax_server.cli.runtime import env_default

    level = env_default("--log-level", "INFO") if defaults else argparse.SUPPRESS
    fmt = env_default("--log-format", "text") if defaults else argparse.SUPPRESS
    parser.add_argument("--log-level", type=str.upper, choices=LEVELS, default=level, metavar="LEVEL",
                        help=f"one of {', '.join(LEVELS)} (default INFO) [env ADAMAX_PS_LOG_LEVEL]")
    parser.add_argument("--log-format", choices=("text", "json"), default=fmt,
                        help="text, or one JSON object a line (default text) [env ADAMAX_PS_LOG_FORMAT]")


def _target_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORT}",
                        help=f"server address host:port (default: 127.0.0.1:{DEFAULT_PORT}; "
                             f"a host without a port means port {DEFAULT_PORT})")


def build_parser() -> argparse.ArgumentParser:
    from adamax_server.cli.runtime import add_server_arguments, add_tls_client_arguments, env_default
    from adamax_server.cli.serve import add_serve_arguments

    parser = argparse.ArgumentParser(prog="adamax-ps", description="Keras-exact Adamax parameter server")
    _global_flags(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a parameter server", parents=[common])
    add_serve_arguments(serve)
    add_server_arguments(serve)
    from adamax_server.cli.checkpoint_cli import add_checkpoint_arguments, add_checkpoint_commands

    add_checkpoint_arguments(serve)
    add_checkpoint_commands(sub, parents=[common], target_flag=_target_flag)
    from adamax_server.cli.shard_cli import add_shard_arguments

    add_shard_arguments(serve)

    status = sub.add_parser("status", help="list optimizers, versions and workers of a server", parents=[common])
    status.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORT}",
                        help=f"host:port, or a sharded job's shard list A0,A1,... (default: 127.0.0.1:{DEFAULT_PORT})")
    status.add_argument("--timeout", type=float, default=10.0)
    status.add_argument("--json", action="store_true")
    status.add_argument("--metrics", default=env_default("--metrics"),
                        help="host:port of the server's metrics endpoint, to add its counters [env ADAMAX_PS_METRICS]")
    add_tls_client_arguments(status)

    health = sub.add_parser(
        "health", parents=[common],
        help="exit 0 when the server's health service says SERVING (Docker HEALTHCHECK)",
        description="Ask a server's grpc.health.v1 service; exit 0 when it says SERVING. Without --target and "
                    "with --health-file (ADAMAX_PS_HEALTH_FILE), the port and TLS setting come from the file "
                    "`serve` wrote; its TLS flags have their own variables (ADAMAX_PS_HEALTH_TLS_CA ...), since "
                    "ADAMAX_PS_TLS_CA in a server's environment is the CA that verifies clients.",
    )
    health.add_argument("--target", default=env_default("--health-target"),
                        help=f"server address host:port (default: from --health-file when given, else "
                             f"127.0.0.1:{DEFAULT_PORT}) [env ADAMAX_PS_HEALTH_TARGET]")
    health.add_argument("--address", dest="target", action=_DeprecatedAlias, help="deprecated: use --target")
    health.add_argument("--health-file", default=env_default("--health-file"),
                        help="the file `serve --health-file` writes [env ADAMAX_PS_HEALTH_FILE]")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    add_tls_client_arguments(health, env_scope="HEALTH", token=False)

    delete = sub.add_parser("delete", help="delete optimizers (jobs) of a running server: weights, state, workers")
    delete.add_argument("names", nargs="+", metavar="NAME", help="optimizer (job) name")
    delete.add_argument("--target", default="127.0.0.1:50051")
    delete.add_argument("--timeout", type=float, default=10.0)
    add_tls_client_arguments(delete)

    sub.add_parser("demo", help="run the demo (arguments are passed on)", add_help=False)
    sub.add_parser("bench", help="run a benchmark of benchmarks/ (`adamax-ps bench NAME --help`)", add_help=False)
    return parser


def _json_requested(argv: Sequence[str]) -> bool:
    if os.environ.get("ADAMAX_PS_LOG_FORMAT", "").strip().lower() == "json":
        return True
    return any(a == "--log-format=json" or (a == "--log-format" and b == "json") for a, b in zip(argv, [*argv[1:], ""]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _json_requested(argv):
        # gRPC's C core writes its own plain-text lines to stderr; in a JSON log they would be the
        # only lines a collector cannot parse. Off unless the user chose a verbosity.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)  # demo and bench parse what follows them themselves
    if rest and args.command not in ("demo", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for name, flag in (("log_level", "ADAMAX_PS_LOG_LEVEL"), ("log_format", "ADAMAX_PS_LOG_FORMAT")):
        value = getattr(args, name)
        allowed = LEVELS if name == "log_level" else ("text", "json")
        if str(value).upper() not in [a.upper() for a in allowed]:
            parser.error(f"{flag}={value!r} is not one of {', '.join(allowed)}")
    from adamax_server.cli.runtime import unknown_env
    from adamax_server.ops.logging_setup import configure_logging

    configure_logging(str(args.log_level).upper(), str(args.log_format).lower())
    if args.command == "demo":
        return _demo(args, rest)
    if args.command == "bench":
        from adamax_server.cli.bench import run_bench

        return run_bench(rest)
    for name in unknown_env():
        _log.warning("environment variable %s is not a setting of adamax-ps; ignored", name)
    if args.command == "serve":
        from adamax_server.cli.serve import run_serve

        return run_serve(args)
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
