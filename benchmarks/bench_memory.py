"""Memory: the server's peak RSS with a large optimizer against the bytes of state it must hold.

    python benchmarks/bench_memory.py [--params 1e8] [--steps 4] [--json m.json] [--png m.png]
    adamax-ps bench memory --quick

A spawned server (``adamax-ps serve --port 0 --device cpu``) hosts one optimizer with
``use_ema=True`` and ``gradient_accumulation_steps=2``; this process builds it, pushes float32
gradients and pulls the weights. After each phase the server's resident set (VmRSS) and its
peak so far (VmHWM, from /proc) are read.

The state the server must hold is 5 float32 copies of the parameters (weights, m, u, EMA,
accumulator); everything is also shown in multiples of one copy (``S`` = 4 bytes x params).
Besides the state, one gradient staging buffer (receiving a push) and one serialized pull
reply (kept per version, served to every worker) are expected, so about 7 S. Growth of the
peak across repeated pushes or pulls would be a hidden copy per call. Each transfer path
(gRPC streams, bulk TCP, shared memory) runs on its own fresh server.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SpawnedServer, Table, add_output_arguments  # noqa: E402

STATE_COPIES = 5  # weights, m (momentum), u (norm), EMA, gradient accumulator


PATHS = {"off": "gRPC", "tcp": "bulk TCP", "shm": "shared memory"}


def measure(n: int, steps: int, paths: list[str]) -> Table:
    from adamax_client import RemoteAdamax

    s = 4 * n
    table = Table(f"Server memory, {n:.0e} params (S = one float32 copy = {s / 2**20:.0f} MiB), "
                  f"use_ema + gradient_accumulation_steps=2",
                  ["path", "phase", "rss_MiB", "peak_MiB", "rss_minus_idle_in_S", "peak_minus_idle_in_S",
                   "peak_over_state"])
    for path in paths:
        with SpawnedServer() as srv:
            # Warm up on a tiny optimizer first, so code loaded lazily (numba kernels, thread
            # pools, the bulk channel) counts as idle rather than as state.
            with RemoteAdamax(srv.target, optimizer="warm-up", worker_id="w0", use_ema=True,
                              gradient_accumulation_steps=2, timeout=60, bulk=path) as tiny:
                tiny.build({"w": np.zeros(1024, np.float32)})
                for _ in range(2):
                    tiny.push([np.ones(1024, np.float32)])
                    tiny.pull()
            idle = srv.peak_rss_bytes()

            def record(phase: str) -> None:
                peak, rss = srv.peak_rss_bytes(), srv.rss_bytes()
                table.add(path=PATHS[path], phase=phase, rss_MiB=rss / 2**20, peak_MiB=peak / 2**20,
                          rss_minus_idle_in_S=(rss - idle) / s, peak_minus_idle_in_S=(peak - idle) / s,
                          peak_over_state=(peak - idle) / (STATE_COPIES * s))

            record("idle (after a tiny warm-up job)")
            rng = np.random.default_rng(0)
            with RemoteAdamax(srv.target, optimizer="mem", worker_id="w0", learning_rate=1e-4, use_ema=True,
                              gradient_accumulation_steps=2, timeout=600, bulk=path) as opt:
                opt.build({"w": rng.standard_normal(n, dtype=np.float32)})
                record("after build")
                grad = rng.standard_normal(n, dtype=np.float32)
                for i in range(steps):
                    opt.push([grad])
                record(f"after {steps} pushes")
                for i in range(steps):
                    opt.push([grad])
                    opt.pull()
                record(f"after {steps} x (push, pull)")
    table.notes.append(f"state the server must hold: {STATE_COPIES} S = {STATE_COPIES * s / 2**20:.0f} MiB "
                       "(weights, m, u, EMA, accumulator); peak_over_state = (peak - idle) / that")
    table.notes.append("besides the state: the gradient being applied (1 S staging: a push is applied only once "
                       "complete, for exactly-once) and the weights of the current version kept for pulls (1 S); "
                       "shared memory: the worker's push segment and the pull segment are mapped too (counted in RSS)")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    n, steps = (int(1e6), 2) if args.quick else (int(args.params), args.steps)
    table = measure(n, steps, args.paths)
    print(table.format(), flush=True)
    if args.json:
        table.write_json(args.json, params=n)
    if args.png:
        table.write_png(args.png, ["path", "phase"], "peak_minus_idle_in_S", "server peak RSS above idle, in S",
                        reference=(float(STATE_COPIES), "state the server must hold"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
