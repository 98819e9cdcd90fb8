"""Port numbers and binds: refuse what the kernel or gRPC would silently accept.

gRPC servers set ``SO_REUSEPORT`` by default, so a second server on a port in use binds too and
the kernel spreads connections over both. ``create_server`` turns that off
(``grpc.so_reuseport=0``); :func:`ensure_free` additionally probes the address first, so the
user gets one clear sentence instead of gRPC's C-core log line and a bare ``RuntimeError``.
"""

from __future__ import annotations

import errno
import socket

MAX_PORT = 65535


class PortInUse(OSError):
    """The address is taken (another server, or another program)."""


def check_port_number(value: int, what: str = "port") -> int:
    """``value`` if it is a TCP port number 0-65535 (0: pick a free one), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PORT:
        raise ValueError(f"{what} must be a TCP port number 0-65535 (0 picks a free one). Received: {value!r}")
    return value


def _bind_targets(host: str, port: int) -> list[tuple[int, tuple]]:
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        return [(socket.AF_INET, ("0.0.0.0", port))]
    if host == "::":
        return [(socket.AF_INET6, ("::", port, 0, 0))]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return [(family, addr) for family, _, _, _, addr in infos if family in (socket.AF_INET, socket.AF_INET6)]


def ensure_free(host: str, port: int, what: str = "port") -> None:
    """Raise :class:`PortInUse` when ``host:port`` is taken (port 0 is never taken)."""
    if port == 0:
        return
    for family, addr in _bind_targets(host, port):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like gRPC: TIME_WAIT is no conflict
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        errno.EADDRINUSE,
                        f"{what} {port} on {host or '0.0.0.0'} is already in use (another adamax-ps serve, or "
                        f"another program); stop it or choose another port",
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise OSError(exc.errno, f"cannot bind {host}:{port}: {host} is no address of this host") from None
                raise
