"""Hosts in Linux network namespaces on one shaped switch, for bandwidth-bound benchmarks.

    with Switch(rate_mbit=1000) as net:
        a, b = net.host("s0"), net.host("w0")
        net.popen(b, [sys.executable, "-c", "..."])      # a process "on" host w0
        print(a.address)                                 # 10.<x>.0.2, private, this switch only

Each host is a namespace with one interface ``eth0`` (a veth pair) plugged into a Linux bridge
that lives in a namespace of its own (the switch), so nothing touches the machine's own network
namespace, routes or firewall, and the private addresses exist only inside these namespaces.
Every link is shaped in both directions with a token bucket (``tc tbf``) at ``rate_mbit``:
the host's egress on its ``eth0``, its ingress on the switch's port towards it. A host therefore
has a full-duplex NIC of that rate, as on a real switch.

Needs root (``ip netns``, ``tc``); :func:`netns_problem` says why not where it cannot run. All
namespaces carry this process's id in their name and are deleted on exit (``close``, ``atexit``,
SIGTERM), which also deletes their veths and qdiscs; :func:`remove_stale` deletes those of runs
of this module whose process is gone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PREFIX = "adxps"  # namespace names: adxps<pid>-<name>


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _tc(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, check=True, timeout=30)


def netns_problem() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces and tc shaping need root (run as root, or use --net loopback)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> list[str]:
    """Delete namespaces left by runs of this module whose process no longer exists."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ", 1)[0]
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str


class Switch:
    """A bridge in its own namespace; :meth:`host` plugs in a new host with a shaped link."""

    def __init__(self, rate_mbit: float | None = 1000.0, subnet: int = 77) -> None:
        problem = netns_problem()
        if problem is not None:
            raise RuntimeError(problem)
        remove_stale()
        self.rate_mbit = rate_mbit
        self._tag = f"{PREFIX}{os.getpid()}"
        self._subnet = subnet
        self._namespaces: list[str] = []
        self.hosts: list[Host] = []
        self._closed = False
        atexit.register(self.close)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.namespace = self._add_namespace("sw")
        self._in(self.namespace, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.namespace, "ip", "link", "set", "br0", "up")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def _add_namespace(self, name: str) -> str:
        ns = f"{self._tag}-{name}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        self._in(ns, "ip", "link", "set", "lo", "up")
        return ns

    @staticmethod
    def _in(ns: str, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=True, timeout=30)

    def _shape(self, ns: str, dev: str) -> None:
        if self.rate_mbit is None:
            return
        # burst: at least one 64 KiB GSO segment and ~1 ms of traffic at this rate, so the
        # bucket, not the timer granularity, sets the rate; latency bounds the queue (bufferbloat).
        burst = max(256 * 1024, int(self.rate_mbit * 1e6 / 8 / 1000))
        _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
            "burst", str(burst), "latency", "20ms")

    def host(self, name: str) -> Host:
        index = len(self.hosts) + 2
        if index > 250:
            raise ValueError("at most 249 hosts on one switch")
        ns = self._add_namespace(name)
        port = f"p{index}"
        self._in(self.namespace, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._in(self.namespace, "ip", "link", "set", port, "master", "br0", "up")
        address = f"10.{self._subnet}.0.{index}"
        self._in(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        self._in(ns, "ip", "link", "set", "eth0", "up")
        self._shape(ns, "eth0")  # host -> switch (upload)
        self._shape(self.namespace, port)  # switch -> host (download)
        host = Host(name, ns, address)
        self.hosts.append(host)
        return host

    @staticmethod
    def command(host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.namespace, *argv]

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in reversed(self._namespaces):  # deleting a namespace deletes its veths and qdiscs
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        try:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        except (ValueError, TypeError):  # not the main thread, or a handler we cannot restore
            pass
        atexit.unregister(self.close)

    def __enter__(self) -> Switch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SINK = textwrap.dedent(
    """
    import socket, sys
    srv = socket.socket(); srv.bind((sys.argv[1], 0)); srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    buf = bytearray(1 << 20)
    while conn.recv_into(buf):
        pass
    conn.sendall(b"k")
    """
)

_SOURCE = textwrap.dedent(
    """
    import os, socket, sys, time
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    payload = os.urandom(1 << 20)
    with socket.create_connection((host, port), timeout=120) as s:
        t0 = time.perf_counter()
        for _ in range(n // len(payload)):
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        print(time.perf_counter() - t0, flush=True)
    """
)


def link_mb_per_s(net: Switch, src: Host, dst: Host, nbytes: int = 64 << 20) -> float:
    """Measured one-way TCP throughput from ``src`` to ``dst`` (MB/s): the physical floor's rate."""
    sink = net.popen(dst, [sys.executable, "-c", _SINK, dst.address], stdout=subprocess.PIPE, text=True)
    try:
        port = sink.stdout.readline().strip()  # type: ignore[union-attr]
        out = subprocess.run(net.command(src, [sys.executable, "-c", _SOURCE, dst.address, port, str(nbytes)]),
                             capture_output=True, text=True, timeout=300, check=True).stdout
        seconds = float(out.split()[0])
        return (nbytes // (1 << 20)) * (1 << 20) / seconds / 1e6
    finally:
        sink.wait(30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(net: Switch | None, host: Host | None, address: str, port: int, timeout: float = 60.0) -> None:
    """Wait until something accepts TCP connections at ``address:port`` (seen from ``host``)."""
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=2).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        argv = [sys.executable, "-c", probe]
        cmd = net.command(host, argv) if net is not None and host is not None else argv
        if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {address}:{port} after {timeout} s")
