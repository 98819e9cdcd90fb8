"""What ``serve`` tells ``health`` on the same host: the port it bound and how to ask it.

``serve --health-file PATH`` (the image sets ``ADAMAX_PS_HEALTH_FILE``) writes, once it listens::

    {"pid": 7, "host": "0.0.0.0", "port": 50061, "tls": true, "local_health_port": 41234, ...}

and removes it on a clean stop. ``adamax-ps health`` without ``--target`` reads it, so Docker's
HEALTHCHECK checks the port ``serve`` really listens on (``serve --port N`` included) without
repeating the server's settings. With TLS on, the server's own ``ADAMAX_PS_TLS_*`` variables
describe the *server* side (``ADAMAX_PS_TLS_CA`` verifies clients), so they cannot verify the
server; the server then also answers the health service, and nothing else, in plaintext on a
loopback-only port recorded here. ``health`` uses that port unless it was given its own TLS
settings (``--tls-ca`` / ``ADAMAX_PS_HEALTH_TLS_CA`` ...), in which case it checks the real
port over TLS.

The file is written atomically (temporary file, then rename); a stale one from a killed
container points at a port nobody answers on, so ``health`` reports unhealthy until the new
server replaces it.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def write_health_file(path: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """Atomically write ``info`` (JSON) to ``path``; its directory is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_health_file(path: str | os.PathLike[str], pid: int | None = None) -> None:
    """Remove ``path`` if it is (still) this server's (``pid``), never another server's file."""
    try:
        if pid is not None and read_health_file(path).get("pid") != pid:
            return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def read_health_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The info ``serve`` wrote; OSError when missing, ValueError when it is no health file."""
    with open(path, encoding="utf-8") as f:
        try:
            info = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not a health file written by adamax-ps serve: {exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("port"), int):
        raise ValueError(f"{path} is not a health file written by adamax-ps serve")
    return info


def local_address(host: str, port: int) -> str:
    """Where a process on the same host reaches a server bound to ``host:port``."""
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def start_local_health_server(health_servicer: Any) -> tuple[grpc.Server, int]:
    """The health service alone, plaintext, on 127.0.0.1 (a free port); returns (server, port).

    It shares ``health_servicer`` with the main server, so it answers exactly what the main
    server's health service answers (NOT_SERVING during a graceful stop).
    """
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adamax-health"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class HealthAnnouncement:
    """What ``serve`` (one server or one shard) does for ``--health-file``, in one place.

    ``prepare`` (before the server starts) opens the loopback plaintext health port when TLS is on
    and returns the callbacks that undo everything on a stop; ``publish`` (once it listens) writes
    the file. Without a health file both do nothing.
    """

    def __init__(self, path: str | None, health_servicer: Any, *, tls: bool) -> None:
        self.path = path
        self.tls = tls
        self._servicer = health_servicer
        self._local: tuple[grpc.Server, int] | None = None

    def prepare(self) -> list[Any]:
        if not self.path:
            return []
        stopped: list[Any] = []
        if self.tls:  # plaintext health only, loopback only: HEALTHCHECK needs no certificates
            self._local = start_local_health_server(self._servicer)
            local = self._local[0]
            stopped.append(lambda: local.stop(None))
        path, pid = self.path, os.getpid()
        stopped.append(lambda: remove_health_file(path, pid))
        return stopped

    def publish(self, host: str, port: int, **extra: Any) -> None:
        if not self.path:
            return
        info = {"pid": os.getpid(), "host": host, "port": port, "tls": self.tls,
                "local_health_port": self._local[1] if self._local else None, **extra}
        try:
            write_health_file(self.path, info)
        except OSError as exc:
            import logging

            logging.getLogger("adamax_server").error(
                "cannot write the health file %s: %s; `adamax-ps health` will not find this server", self.path, exc)
