"""One worker's push -> apply -> pull round through a real server, per device, side by side.

For each server device (``cpu``, and ``gpu`` when CuPy sees one) and each size, an in-process
server on 127.0.0.1 (port 0) hosts one async optimizer; one client pushes a full float32
gradient set and pulls the new weights. Printed: median ms per phase and per round, and the
round's effective rate (gradient bytes in + weight bytes out per second).

Usage::

    python benchmarks/bench_round.py [--mib 40 400] [--reps 10] [--devices cpu gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), "..", "server"),
    os.path.join(os.path.dirname(__file__), "..", "client"),
    os.path.join(os.path.dirname(__file__), "..", "wire"),
]


def run(device: str, mib: float, reps: int, variables: int = 8) -> dict[str, float]:
    from adamax_client import RemoteAdamax
    from adamax_server.transport.server import create_server

    n = int(mib * (1 << 20) / 4)
    sizes = [n // variables] * variables
    sizes[-1] += n - sum(sizes)
    rng = np.random.default_rng(0)
    init = {f"layer{i}": rng.standard_normal(k).astype(np.float32) for i, k in enumerate(sizes)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
    server, port = create_server("127.0.0.1:0", device=device)
    server.start()
    try:
        opt = RemoteAdamax(f"127.0.0.1:{port}", optimizer=f"bench-{device}", worker_id="w0", timeout=300)
        opt.build(init)
        push, pull, total = [], [], []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            opt.push(grads)
            t1 = time.perf_counter()
            opt.pull()
            t2 = time.perf_counter()
            if i >= 2:  # warm-up: kernel compilation, first allocations
                push.append(t1 - t0)
                pull.append(t2 - t1)
                total.append(t2 - t0)
        opt.close()
    finally:
        server.stop(grace=1).wait()
    med = statistics.median
    return {
        "device": device,
        "mib": mib,
        "push_ms": med(push) * 1e3,
        "pull_ms": med(pull) * 1e3,
        "round_ms": med(total) * 1e3,
        "round_gbs": 2 * n * 4 / med(total) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", nargs="+", type=float, default=[40, 400])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--devices", nargs="+", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = args.devices
    if devices is None:
        from adamax_server.optim.kernels import gpu_available

        devices = ["cpu"] + (["gpu"] if gpu_available() else [])
    rows = []
    print(f"{'device':>6} {'MiB':>6} {'push+apply ms':>13} {'pull ms':>8} {'round ms':>9} {'round GB/s':>10}")
    for mib in args.mib:
        for device in devices:
            r = run(device, mib, args.reps)
            rows.append(r)
            print(f"{device:>6} {mib:>6.0f} {r['push_ms']:>13.1f} {r['pull_ms']:>8.1f} "
                  f"{r['round_ms']:>9.1f} {r['round_gbs']:>10.2f}")
        if len(devices) > 1:
            cpu = next(r for r in rows if r["device"] == "cpu" and r["mib"] == mib)
            gpu = next(r for r in rows if r["device"] == "gpu" and r["mib"] == mib)
            print(f"{'':>6} {mib:>6.0f} gpu/cpu round time: {gpu['round_ms'] / cpu['round_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
