"""Running a server in production: configuration from flags and environment, graceful stop.

Every ``serve`` flag has an environment variable (``--tls-cert`` <- ``ADAMAX_PS_TLS_CERT``);
a flag given on the command line wins over the environment, which wins over the default.
``ADAMAX_PS_*`` variables that no flag reads are reported at start-up rather than ignored.

:class:`GracefulShutdown` is what SIGTERM (``docker stop``) and SIGINT do:

1. health goes NOT_SERVING, so load balancers and health checks stop sending work;
2. the server refuses new calls; calls in flight get ``grace`` seconds to finish (default 5 s,
   well inside Docker's 10 s stop timeout); calls still running then (pulls waiting for a
   sync round that cannot close any more) are cancelled, and workers retry after the restart;
3. with no call running, the final checkpoint is written (when a checkpoint hook is
   configured), then the coordinator is closed;
4. the process exits 0.

Nothing here forks: gRPC's threads do not survive ``fork``; background work uses threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

_log = logging.getLogger(__name__)

ENV_PREFIX = "ADAMAX_PS_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
# Variables read elsewhere (tests, CI), not by a flag; never reported as unknown.
_OTHER_KNOWN_ENV = {"ADAMAX_PS_TEST_DEVICES", "ADAMAX_PS_LOAD_PUSHES"}
_known_env: set[str] = set()


def env_name(flag: str) -> str:
    """``--tls-cert`` -> ``ADAMAX_PS_TLS_CERT``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, fallback: Any = None) -> Any:
    """The default of ``flag``: its environment variable if set, else ``fallback``."""
    name = env_name(flag)
    _known_env.add(name)
    return os.environ.get(name, fallback)


def env_bool(flag: str, fallback: bool = False) -> bool:
    value = env_default(flag)
    if value is None:
        return fallback
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{env_name(flag)} must be one of {_TRUE + _FALSE[:-1]}. Received: {value!r}")


def unknown_env(environ: Iterable[str] | None = None) -> list[str]:
    """``ADAMAX_PS_*`` variables set but read by no flag (typos, removed settings)."""
    names = os.environ if environ is None else environ
    return sorted(n for n in names if n.startswith(ENV_PREFIX) and n not in _known_env | _OTHER_KNOWN_ENV)


def _flag(parser: argparse.ArgumentParser, flag: str, fallback: Any = None, *, env: str | None = None,
          **kwargs: Any) -> None:
    """``parser.add_argument`` with the default taken from the flag's environment variable.

    ``env`` names the variable when it is not the flag's own (``ADAMAX_PS_HEALTH_TLS_CA``).
    Values from the environment go through the flag's ``type`` like command-line values.
    """
    help_text = kwargs.pop("help", "")
    name = env or env_name(flag)
    _known_env.add(name)
    parser.add_argument(flag, default=os.environ.get(name, fallback), help=f"{help_text} [env {name}]", **kwargs)


def _switch(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    parser.add_argument(flag, action="store_true", default=env_bool(flag), help=f"{help_text} [env {env_name(flag)}=1]")


def port_number(flag: str) -> Callable[[str], int]:
    """An argparse ``type``: a TCP port number 0-65535, from ``flag`` or its environment variable."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not 0 <= value <= 65535:
            raise argparse.ArgumentTypeError(
                f"must be a TCP port number 0-65535 (0 picks a free one), from {flag} or {env_name(flag)}. "
                f"Received: {text!r}"
            )
        return value

    parse.__name__ = "port number"
    return parse


def positive(kind: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse ``type``: a number > 0 of ``kind`` (int or float)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(
                f"must be a number > 0, from {flag} or {env_name(flag)}. Received: {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


# ---------------------------------------------------------------- flags


def add_tls_client_arguments(parser: argparse.ArgumentParser, *, env_scope: str = "", token: bool = True) -> None:
    """TLS and token flags of commands that call a server (status, health, checkpoint).

    ``env_scope="HEALTH"`` reads ``ADAMAX_PS_HEALTH_TLS_CA`` ... instead of ``ADAMAX_PS_TLS_CA``:
    in the server's own environment (the image's HEALTHCHECK) ``ADAMAX_PS_TLS_CA`` is the CA
    that verifies *clients*, not the one that verifies the server.
    """

    def env(flag: str) -> str | None:
        return f"{ENV_PREFIX}{env_scope}_{flag[2:].replace('-', '_').upper()}" if env_scope else None

    _flag(parser, "--tls-ca", env=env("--tls-ca"), help="CA bundle (PEM) that verifies the server; turns TLS on")
    _flag(parser, "--tls-client-cert", env=env("--tls-client-cert"), help="client certificate (PEM) for mutual TLS")
    _flag(parser, "--tls-client-key", env=env("--tls-client-key"), help="key of --tls-client-cert")
    _flag(parser, "--tls-server-name", env=env("--tls-server-name"),
          help="expected server name in its certificate (default: the host)")
    if token:
        _flag(parser, "--token-file", help="file holding the bearer token (else ADAMAX_PS_TOKEN)")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Security, limits and observability flags of ``serve``."""
    tls = parser.add_argument_group("TLS and authentication")
    _flag(tls, "--tls-cert", help="server certificate chain (PEM); with --tls-key turns TLS on")
    _flag(tls, "--tls-key", help="key of --tls-cert (PEM)")
    _flag(tls, "--tls-ca", help="CA bundle (PEM) that verifies client certificates")
    _switch(tls, "--tls-require-client-cert", "mutual TLS: refuse clients without a certificate signed by --tls-ca")
    _flag(tls, "--token-file", help="accepted bearer tokens, one a line, optionally followed by the optimizer names it may use")
    env_default("--token")  # ADAMAX_PS_TOKEN: one unscoped token (no flag: secrets stay out of `ps`)

    limits = parser.add_argument_group("limits")
    _flag(limits, "--max-message-mib", 64, type=int, help="largest gRPC message")
    _flag(limits, "--max-concurrent-rpcs", None, type=int, help="calls beyond this get RESOURCE_EXHAUSTED")
    _flag(limits, "--max-variables-per-optimizer", None, type=int, help="variables one optimizer may hold")
    _flag(limits, "--max-mib-per-optimizer", None, type=float, help="MiB of model variables one optimizer may hold")
    _switch(limits, "--no-reflection", "turn gRPC server reflection off (production)")
    _flag(limits, "--reserved-threads", None, type=int,
          help="RPC threads kept for unary (control) calls; streams share the rest (default: a quarter, 1 to 4)")
    _flag(limits, "--call-floor-seconds", 30.0, type=float,
          help="time every push (and pull reply) gets, plus its size at --min-transfer-mib")
    _flag(limits, "--min-transfer-mib", 1.0, type=float,
          help="MiB/s a push must keep up: its budget beyond the floor, and the pace a push holding "
               "the staging buffer must keep while others wait")
    _flag(limits, "--stall-seconds", 30.0, type=float, help="longest silence inside a push or pull")
    _flag(limits, "--max-wait-seconds", 600.0, type=float,
          help="longest a pull waits for a weights version (clients without a deadline)")

    transfer = parser.add_argument_group("bulk channel (push/pull bytes outside gRPC)")
    _switch(transfer, "--no-bulk", "serve tensors over gRPC only (the bulk channel is on by default, over TLS when TLS is on)")
    _flag(transfer, "--bulk-port", 0, type=port_number("--bulk-port"), help="TCP port of the bulk channel (0 picks one; workers learn it over gRPC)")
    _switch(transfer, "--no-shared-memory", "do not offer shared memory to workers on this host")

    observe = parser.add_argument_group("observability")
    _flag(observe, "--metrics-port", None, type=port_number("--metrics-port"),
          help="serve Prometheus /metrics on this port (0 picks one)")
    _flag(observe, "--metrics-host", None,
          help="address of the metrics endpoint (default: the --host the server binds; /metrics has no auth)")


# ---------------------------------------------------------------- objects from flags


def _token_from_env_or_file(path: str | None) -> str | None:
    if path:
        with open(path, encoding="utf-8") as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if words:
                    return words[0]
        raise ValueError(f"the token file {path!r} holds no token")
    return os.environ.get(ENV_PREFIX + "TOKEN") or None


def client_connection(args: argparse.Namespace) -> dict[str, Any]:
    """``Transport`` keyword arguments (credentials, token, options) from the client flags."""
    from adamax_client.security import tls_channel_credentials

    out: dict[str, Any] = {"token": _token_from_env_or_file(getattr(args, "token_file", None))}
    if args.tls_ca or args.tls_client_cert:
        out["credentials"] = tls_channel_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
        if args.tls_server_name:
            out["channel_options"] = [("grpc.ssl_target_name_override", args.tls_server_name)]
    return out


def server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``create_server`` keyword arguments from the ``serve`` flags (raises on a bad setup)."""
    from adamax_server.transport.security import (
        SecurityConfigError,
        TlsConfig,
        TokenTable,
        bulk_server_context,
        server_credentials,
    )
    from adamax_server.transport.budget import CallLimits
    from adamax_server.transport.validation import ResourceLimits

    out: dict[str, Any] = {}
    if args.tls_cert or args.tls_key or args.tls_require_client_cert:
        config = TlsConfig(args.tls_cert or "", args.tls_key or "", args.tls_ca, args.tls_require_client_cert)
        out["credentials"] = server_credentials(config)
        if not args.no_bulk:
            out["bulk_tls"] = bulk_server_context(config)  # the bulk channel speaks TLS too
    elif args.tls_ca:
        raise SecurityConfigError("--tls-ca was given without --tls-cert/--tls-key; TLS needs the server's certificate")
    env_token = os.environ.get(ENV_PREFIX + "TOKEN")
    if args.token_file:
        out["tokens"] = TokenTable.from_file(args.token_file)
    elif env_token:
        out["tokens"] = TokenTable.from_tokens({env_token.strip(): []})
    mib = args.max_mib_per_optimizer
    out["limits"] = ResourceLimits(
        max_variables_per_optimizer=args.max_variables_per_optimizer,
        max_bytes_per_optimizer=int(mib * 1024 * 1024) if mib else None,
    )
    out["max_message_bytes"] = args.max_message_mib * 1024 * 1024
    out["max_concurrent_rpcs"] = args.max_concurrent_rpcs
    out["reserved_threads"] = args.reserved_threads
    out["call_limits"] = CallLimits(  # ValueError on a bad value: refused at start-up
        floor=float(args.call_floor_seconds), min_rate=float(args.min_transfer_mib) * 2**20,
        stall=float(args.stall_seconds), max_wait=float(args.max_wait_seconds),
    )
    out["reflection"] = not args.no_reflection
    out["bulk"] = False if args.no_bulk else None  # None: on (TLS when the gRPC port is TLS)
    out["bulk_port"] = int(args.bulk_port)
    out["shared_memory"] = not args.no_shared_memory
    return out


# ---------------------------------------------------------------- shard index

_ORDINAL = re.compile(r"(?P<base>.+)-(?P<ordinal>0|[1-9][0-9]*)")


def shard_index_from_hostname(hostname: str | None = None) -> int:
    """The shard index of a StatefulSet pod: the ordinal its hostname ends with.

    Kubernetes names pod ``i`` of a StatefulSet ``<name>-<i>`` and makes that its hostname, so
    ``adamax-ps-2`` (or ``adamax-ps-2.adamax-ps.ml.svc.cluster.local``) is shard 2. Raises
    ``ValueError`` for a hostname without a trailing ``-<ordinal>``.
    """
    name = socket.gethostname() if hostname is None else hostname
    match = _ORDINAL.fullmatch(name.split(".", 1)[0])
    if match is None:
        raise ValueError(
            "`--shard-index-from-hostname` needs a hostname that ends with -<ordinal>, as a StatefulSet's "
            f"pods have (adamax-ps-0, adamax-ps-1, ...). Received: hostname={name!r}"
        )
    return int(match.group("ordinal"))


# ---------------------------------------------------------------- health check


def check_health(address: str, *, timeout: float = 3.0, service: str = "", connection: dict[str, Any] | None = None) -> str:
    """The health status name of ``service`` at ``address`` ("SERVING", ...); raises on failure."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    connection = connection or {}
    options = list(connection.get("channel_options", ()))
    credentials = connection.get("credentials")
    channel = grpc.secure_channel(address, credentials, options) if credentials else grpc.insecure_channel(address, options)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---------------------------------------------------------------- shutdown


class GracefulShutdown:
    """Waits for SIGTERM/SIGINT (or :meth:`request`), then stops the server; see the module docstring."""

    def __init__(
        self,
        server: grpc.Server,
        *,
        grace: float = 5.0,
        final_checkpoint: Callable[[], Any] | None = None,
        on_stopped: Iterable[Callable[[], Any]] = (),
    ) -> None:
        if not grace >= 0:
            raise ValueError(f"`grace` must be >= 0 seconds. Received: grace={grace!r}")
        self._server = server
        self._grace = grace
        self._final_checkpoint = final_checkpoint
        self._on_stopped = list(on_stopped)
        self._requested = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        """Route SIGTERM and SIGINT to :meth:`request` (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self._requested.set()

    def request(self) -> None:
        self._requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._requested.wait(timeout)

    def run(self) -> int:
        """Block until asked to stop, then stop; returns the exit status (0 unless the final checkpoint failed)."""
        while not self._requested.wait(1.0):  # wake now and then so signals are handled promptly
            pass
        return self.stop()

    def stop(self) -> int:
        started = time.monotonic()
        _log.info("shutting down (%s): health NOT_SERVING, %.3g s grace for calls in flight",
                  self.signal_name or "requested", self._grace)
        health = getattr(self._server, "health", None)
        if health is not None:
            health.enter_graceful_shutdown()
        coordinator = getattr(self._server, "coordinator", None)
        self._server.stop(self._grace).wait(self._grace + 1.0)
        bulk = getattr(self._server, "bulk", None)
        if bulk is not None:
            bulk.close()
        status = 0
        if self._final_checkpoint is not None:  # no call runs now: the state is final
            try:
                info = self._final_checkpoint()
                _log.info("final checkpoint written: %s", getattr(info, "checkpoint_id", info))
            except Exception:
                _log.exception("the final checkpoint failed")
                status = 1
        if coordinator is not None:
            coordinator.close()
        for hook in self._on_stopped:
            try:
                hook()
            except Exception:  # noqa: BLE001 - stopping must go on
                _log.exception("shutdown hook failed")
        _log.info("stopped after %.2f s", time.monotonic() - started)
        return status
