"""One worker's step (pull, then push) against one server and against a one-shard job.

    python benchmarks/one_shard_vs_server.py [--params 1e5 4e6] [--steps 60 20]

What a job pays for running as one shard of a sharded job instead of on a plain server, on one
host: both are ``adamax-ps serve`` processes on 127.0.0.1 (the shard with ``--shard-index 0
--shards`` its own address), the same client code (``RemoteAdamax(target)`` finds out which it
is), over shared memory and over the bulk channel's TCP. Prints ms per step, one row per
(params, mode, server, transfer path), each measured after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import child_env  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(sharded: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [sys.executable, "-m", "adamax_server.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu"]
    if sharded:
        argv += ["--shard-index", "0", "--shards", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.startswith("listening on"):
            return proc, f"127.0.0.1:{port}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def _step_ms(target: str, n: int, mode: str, steps: int, bulk: str) -> tuple[float, str]:
    from adamax_client import RemoteAdamax

    grad = np.random.default_rng(0).standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    with RemoteAdamax(target, optimizer="j", worker_id="w0", mode=mode, learning_rate=1e-4, timeout=120, bulk=bulk) as opt:
        opt.build({"w": np.zeros(n, np.float32)})
        for _ in range(3):
            opt.pull()
            opt.push([grad])
        start = time.perf_counter()
        for _ in range(steps):
            opt.pull()
            opt.push([grad])
        return (time.perf_counter() - start) / steps * 1e3, opt.transfer_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", nargs="+", type=float, default=[1e5, 4e6])
    ap.add_argument("--steps", nargs="+", type=int, default=[60, 20], help="timed steps per size")
    args = ap.parse_args()
    print(f"{'params':>8} {'mode':>5} {'server':>9} {'path':>5} {'ms/step':>8}   (load {os.getloadavg()[0]:.2f} at start)")
    for n, steps in zip([int(p) for p in args.params], args.steps + args.steps[-1:] * len(args.params)):
        for mode in ("async", "sync"):
            for bulk in ("auto", "tcp"):
                for label, sharded in (("1 server", False), ("1 shard", True)):
                    proc, target = _start(sharded)
                    try:
                        ms, path = _step_ms(target, n, mode, steps, bulk)
                    finally:
                        proc.terminate()
                        proc.wait(20)
                    print(f"{n:8.0e} {mode:>5} {label:>9} {path:>5} {ms:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
