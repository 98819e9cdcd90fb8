"""Quick transport benchmark: push/pull of one gradient vs. a raw TCP socket, on 127.0.0.1.

    python benchmarks/transport_quick.py [--mib 40] [--repeats 8]

The parameter server runs in a subprocess (``adamax-ps serve --port 0``), as it would in a
job, so client and server do not share a GIL. Reported:

* push: ``RemoteAdamax.push`` of one float32 gradient of the given size, end to end (the
  server applies it; the engine's own apply time is measured separately and shown);
* pull: ``Pull`` of the same variable, served from the once-per-version reply cache;
* raw TCP: ``sendall`` of the same bytes to a subprocess that reads them and answers one
  byte (push-like), and the reverse direction (pull-like).

Medians over ``--repeats`` runs, after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "client"), str(ROOT / "wire")]

from adamax_client import RemoteAdamax  # noqa: E402
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb  # noqa: E402
from adamax_client import _wire  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import raw_tcp_seconds  # noqa: E402

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"), str(ROOT / "wire"), env.get("PYTHONPATH", "")])
    return env


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_raw_tcp(nbytes: int, repeats: int) -> tuple[float, float]:
    """The floor: median push-like and pull-like seconds of raw TCP (shared with the suite)."""
    return raw_tcp_seconds(nbytes, repeats)


def bench_grpc(nbytes: int, repeats: int) -> tuple[float, float, float]:
    server = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "--log-level", "WARNING", "serve", "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        target = server.stdout.readline().split()[-1]
        n = nbytes // 4
        rng = np.random.default_rng(0)
        grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
        with RemoteAdamax(target, name="bench", learning_rate=1e-6, timeout=120) as remote:
            remote.build({"w": rng.standard_normal(n, dtype=np.float32)})
            push = _median_seconds(lambda: remote.push([grad], step=remote.version), repeats)
            remote.pull()
            request = pb.PullRequest(optimizer="bench")  # no known_version: always transfer
            pull = _median_seconds(
                lambda: remote._transport.unary_stream("Pull", request, _wire.decode_stream), repeats
            )
        from adamax_server import Adamax

        engine = Adamax(learning_rate=1e-6, device="cpu")
        engine.build({"w": np.zeros(n, np.float32)})
        apply = _median_seconds(lambda: engine.apply([grad]), repeats)
        return push, pull, apply
    finally:
        server.terminate()
        server.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    nbytes = int(args.mib * 1024 * 1024) // 4 * 4
    mb = nbytes / 1e6

    tcp_push, tcp_pull = bench_raw_tcp(nbytes, args.repeats)
    push, pull, apply = bench_grpc(nbytes, args.repeats)

    def row(label: str, seconds: float) -> str:
        return f"{label:<44} {seconds * 1e3:9.1f} ms {mb / seconds:9.0f} MB/s"

    print(f"{nbytes / 2**20:.0f} MiB float32 on 127.0.0.1, median of {args.repeats} ({os.cpu_count()} cores)")
    print(row("raw TCP send (push-like)", tcp_push))
    print(row("raw TCP receive (pull-like)", tcp_pull))
    print(row("gRPC push, end to end (incl. server apply)", push))
    print(row("  of which engine apply (in-process)", apply))
    print(row("gRPC push minus engine apply", max(push - apply, 1e-9)))
    print(row("gRPC pull (cached reply)", pull))


if __name__ == "__main__":
    main()
