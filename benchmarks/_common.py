"""Shared pieces of the measurement suite: spawned servers, the raw-TCP floor, result tables.

Every benchmark prints one table of figures measured in the same run and can write it as
JSON (``--json``) and as a PNG bar chart (``--png``). Servers bind 127.0.0.1 on port 0 and
run in spawned subprocesses, so client and server never share a GIL and nothing forks a
process that already started gRPC.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "client"), str(ROOT / "wire"), str(ROOT / "server")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MB = 1_000_000


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"), str(ROOT / "wire"), str(ROOT / "benchmarks"),
                                         env.get("PYTHONPATH", "")])
    return env


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SpawnedServer:
    """``adamax-ps serve --port 0`` (or any module printing "listening on host:port") in a subprocess."""

    def __init__(self, argv: Sequence[str] = (), module: str = "adamax_server.cli") -> None:
        cmd = [sys.executable, "-m", module]
        if module == "adamax_server.cli":
            cmd += ["--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]
        self.proc = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, text=True, env=child_env())
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if line.startswith("listening on") or not line:
                break
        if not line.startswith("listening on"):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}")
        self.target = line.split()[-1]

    def peak_rss_bytes(self) -> int:
        """VmHWM of the server process (Linux): the peak resident set so far."""
        return _proc_status_kib(self.proc.pid, "VmHWM") * 1024

    def rss_bytes(self) -> int:
        return _proc_status_kib(self.proc.pid, "VmRSS") * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> SpawnedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


_RAW_PEER = textwrap.dedent(
    """
    import os, socket, sys
    n = int(sys.argv[1])
    # Real bytes: bytes(n) would be untouched zero pages, all backed by one physical page that
    # stays in cache, which makes the pull floor faster than any real payload can go.
    payload = (os.urandom(1 << 20) * (n // (1 << 20) + 1))[:n]
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(n); view = memoryview(buf)
    while True:
        op = conn.recv(1)
        if not op:
            break
        if op == b"P":
            got = 0
            while got < n:
                got += conn.recv_into(view[got:])
            conn.sendall(b"k")
        else:
            conn.sendall(payload)
    """
)


def raw_tcp_seconds(nbytes: int, repeats: int) -> tuple[float, float]:
    """Median seconds to send (push-like) and to receive (pull-like) ``nbytes`` over 127.0.0.1."""
    peer = subprocess.Popen([sys.executable, "-c", _RAW_PEER, str(nbytes)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(peer.stdout.readline())  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            view = memoryview(bytearray(os.urandom(1024) * (nbytes // 1024 + 1))[:nbytes])
            rview = memoryview(bytearray(nbytes))

            def push() -> None:
                sock.sendall(b"P")
                sock.sendall(view)
                sock.recv(1)

            def pull() -> None:
                sock.sendall(b"G")
                got = 0
                while got < nbytes:
                    got += sock.recv_into(rview[got:])

            return median_seconds(push, repeats), median_seconds(pull, repeats)
    finally:
        peer.wait(30)


@dataclass
class Table:
    """One benchmark's results: rows of named figures, printed side by side."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def format(self) -> str:
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1e5 else f"{v:.3e}"
            return str(v)

        body = [[cell(r.get(c, "")) for c in self.columns] for r in self.rows]
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(self.columns)]
        lines = [self.title, "  ".join(c.rjust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike[str], **meta: Any) -> None:
        payload = {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes,
                   "cpu_count": os.cpu_count(), **meta}
        Path(path).write_text(json.dumps(_finite(payload), indent=2, allow_nan=False))

    def write_png(self, path: str | os.PathLike[str], label: Sequence[str], value: str, ylabel: str,
                  log: bool = False, reference: tuple[float, str] | None = None) -> None:
        """A bar chart of column ``value``, one bar per row, labelled by the ``label`` columns."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [" ".join(str(r.get(k, "")) for k in label) for r in self.rows]
        values = [float(r.get(value) or 0.0) for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if reference is not None:
            ax.axhline(reference[0], color="k", ls="--", lw=1, label=reference[1])
            ax.legend(fontsize=8)
        ax.set_title(textwrap.fill(self.title, 90), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _finite(value: Any) -> Any:
    """NaN and infinities (figures not measured) as null, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _finite(value.item())
    return value


def add_output_arguments(parser: Any) -> None:
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    parser.add_argument("--png", default=None, help="write a plot (matplotlib) here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), seconds not minutes")
