"""``adamax-ps serve``: its flags, the checks before anything binds, and the run until SIGTERM.

Refused at start-up, each with one sentence and exit status 2 (never a half-started server that
says "listening" or "healthy" and fails later):

* a port in use (gRPC's SO_REUSEPORT would otherwise share it with the other server) or out of
  0-65535, for the gRPC, bulk and metrics ports;
* ``--device gpu`` without a usable CUDA GPU (``--device auto`` serves on the CPU instead, and
  says so in the log);
* bad TLS, token, limit or checkpoint settings.

With ``--health-file`` (``ADAMAX_PS_HEALTH_FILE``; the image sets it) the bound port and how to
ask for health are written for ``adamax-ps health`` (see ``adamax_server.cli.health_file``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from adamax_server.cli.runtime import _flag, port_number, positive

_log = logging.getLogger("adamax_server")

DEFAULT_PORT = 50051


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The core ``serve`` flags; each also reads its ``ADAMAX_PS_*`` variable."""
    _flag(serve, "--host", "127.0.0.1", help="address to bind (0.0.0.0 for all)")
    _flag(serve, "--port", DEFAULT_PORT, type=port_number("--port"), help="gRPC port (0 picks a free one)")
    _flag(serve, "--device", "auto", choices=("auto", "cpu", "gpu"),
          help="where optimizer state lives: gpu (refuses to start without a usable CUDA GPU), cpu, or auto "
               "(the GPU when one is usable, else the CPU)")
    _flag(serve, "--max-threads", 32, type=positive(int, "--max-threads"), help="RPC worker threads")
    _flag(serve, "--chunk-mib", 2, type=positive(int, "--chunk-mib"), help="tensor chunk size on the wire (MiB)")
    _flag(serve, "--max-tensor-gib", 64.0, type=positive(float, "--max-tensor-gib"), help="largest tensor accepted (GiB)")
    _flag(serve, "--max-optimizers", 1024, type=positive(int, "--max-optimizers"), help="optimizers one server hosts")
    _flag(serve, "--dedup-capacity", 1024, type=positive(int, "--dedup-capacity"),
          help="remembered request ids per worker (exactly-once retries)")
    _flag(serve, "--grace", 5.0, type=float,
          help="seconds to finish calls on SIGTERM (keep it under Docker's 10 s stop timeout)")
    _flag(serve, "--health-file",
          help="write the bound port and how to check health here (read by `adamax-ps health`; removed on stop)")


def resolve_device(requested: str) -> str:
    """The device optimizers get: ``gpu`` only with a usable GPU (else SystemExit-worthy ValueError)."""
    if requested == "cpu":
        return "cpu"
    from adamax_server.optim.kernels import gpu_available

    if gpu_available():
        return "gpu"
    why = gpu_unavailable_reason()
    if requested == "gpu":
        raise ValueError(
            f"--device gpu (ADAMAX_PS_DEVICE=gpu) but no CUDA GPU is usable here: {why}. Run the container with "
            "--gpus all (NVIDIA container toolkit), or use --device auto to fall back to the CPU, or --device cpu"
        )
    _log.info("device=auto: no CUDA GPU usable (%s); optimizer state lives on the CPU (device=cpu)", why)
    return "cpu"


def gpu_unavailable_reason() -> str:
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA library
        return f"CuPy does not import ({type(exc).__name__}: {exc}); install adamax-ps[gpu]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device node
        return f"CUDA reports no device ({exc})"
    return f"CUDA sees {count} device(s)"


def _check_ports(args: argparse.Namespace, hardening: dict[str, Any]) -> None:
    from adamax_server.transport.ports import ensure_free

    ensure_free(args.host, args.port, "gRPC port")
    bulk_on = hardening.get("bulk") is not False  # over TLS too when the gRPC port is TLS
    if bulk_on and args.bulk_port:
        ensure_free(args.host, args.bulk_port, "bulk port")
    if args.metrics_port:
        ensure_free(args.metrics_host or args.host, args.metrics_port, "metrics port")


def run_serve(args: argparse.Namespace) -> int:
    if getattr(args, "shards", None):
        from adamax_server.cli.shard_cli import serve_sharded

        return serve_sharded(args)
    from adamax_server.cli.checkpoint_cli import final_checkpoint, manager_from_args
    from adamax_server.cli.runtime import GracefulShutdown, server_kwargs
    from adamax_server.sharding.coordinator import Coordinator
    from adamax_server.ops.metrics import ServerMetrics
    from adamax_server.transport.security import SecurityConfigError
    from adamax_server.transport.server import create_server

    def refuse(exc: BaseException) -> int:
        if _json_logs():
            _log.error("not starting: %s", exc, extra={"event": "refused"})
        else:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    try:
        hardening = server_kwargs(args)  # TLS, tokens, limits: refuse to start on a bad setup
        device = resolve_device(args.device)
        _check_ports(args, hardening)
    except (SecurityConfigError, ValueError, OSError) as exc:
        return refuse(exc)
    metrics = ServerMetrics()
    coordinator = Coordinator(
        device=device, dedup_capacity=args.dedup_capacity, max_optimizers=args.max_optimizers, observer=metrics
    )
    try:  # restores --restore before the server takes any call
        checkpoints = manager_from_args(args, coordinator)
    except Exception as exc:  # noqa: BLE001 - a bad directory or checkpoint: refuse to start
        return refuse(exc)
    if checkpoints is not None:
        checkpoints.on_saved = metrics.observe_checkpoint
        checkpoints.on_failed = metrics.observe_checkpoint_failure
    try:
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
    except (SecurityConfigError, OSError) as exc:
        coordinator.close()
        return refuse(exc)
    metrics_port = None
    # Unauthenticated (it names the optimizers): only as reachable as the server itself, unless
    # --metrics-host says otherwise.
    metrics_host = args.metrics_host or args.host
    if args.metrics_port is not None:
        try:
            metrics_port = metrics.serve_http(args.metrics_port, metrics_host)
        except OSError as exc:
            from adamax_server.transport.server import close_bulk

            close_bulk(server)
            coordinator.close()
            return refuse(OSError(f"cannot serve metrics on {metrics_host}:{args.metrics_port}: {exc}"))
    tls = "credentials" in hardening
    from adamax_server.cli.health_file import HealthAnnouncement

    announce = HealthAnnouncement(args.health_file, server.health, tls=tls)
    stopped = [*announce.prepare(), metrics.close]
    shutdown = GracefulShutdown(
        server,
        grace=args.grace,
        final_checkpoint=(lambda: final_checkpoint(checkpoints)) if checkpoints is not None else None,
        on_stopped=stopped,
    )
    shutdown.install()
    server.start()
    if checkpoints is not None:
        checkpoints.start()
    bulk = getattr(server, "bulk", None)
    announce.publish(args.host, port, bulk_port=bulk.port if bulk is not None else None, metrics_port=metrics_port)
    # The line scripts and tests wait for; with --port 0 it is the only way to learn the port.
    # JSON logs carry it as fields of the "listening" record instead of a plain stdout line.
    _log.info("adamax-ps listening on %s:%d (device=%s, tls=%s, auth=%s)", args.host, port, device, tls,
              "tokens" in hardening,
              extra={"event": "listening", "host": args.host, "port": port, "device": device})
    if not _json_logs():
        print(f"listening on {args.host}:{port}", flush=True)
    if bulk is not None:
        _log.info("bulk channel on %s:%d (tls=%s, shared memory for same-host workers: %s)", args.host, bulk.port,
                  bulk.tls is not None, bulk.shared_memory, extra={"event": "bulk_channel", "port": bulk.port})
    else:
        _log.info("bulk channel off: tensors travel in gRPC streams")
    if metrics_port is not None:
        _log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_port,
                  extra={"event": "metrics", "host": metrics_host, "port": metrics_port})
        if not _json_logs():
            print(f"metrics on {metrics_host}:{metrics_port}", flush=True)
    return shutdown.run()


def _json_logs() -> bool:
    from adamax_server.ops.logging_setup import current_format

    return current_format() == "json"
