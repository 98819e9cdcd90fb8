"""A server's cost per push without any transport: ``OptimizerHost.push`` in one process.

    python benchmarks/host_push_loop.py [--params 1e3 1e5 4e6] [--pushes 3000 1000 50]

Every optimizer of a plain server is a one-shard job (``sharding.single``): a push is staged on
the job's only shard and committed by its leader, called in process. This times that path
alone, one worker pushing one float32 gradient after another (async: each push is a step;
sync with one worker: each push closes a round), next to the engine's own step
(``Adamax.apply``, the floor: the update and a copy of the gradient in). The gradient is
"received" the way the transports receive it: written into the buffer the host lends.
Prints ms per push and the host's overhead over the engine, per size and mode. It runs on
commits before the one-shard server too (``PYTHONPATH`` at that tree), for before/after runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "server"))


def _host_ms(n: int, mode: str, pushes: int) -> float:
    from adamax_server.coordination.policy import Policy

    try:
        from adamax_server.sharding.coordinator import Coordinator
    except ImportError:  # a commit before the one-shard server (for before/after runs)
        from adamax_server.coordination.coordinator import Coordinator  # type: ignore[no-redef]

    coordinator = Coordinator(device="cpu")
    try:
        _, host = coordinator.create("m", {"learning_rate": 1e-4}, Policy(mode=mode))
        host.build([("w", np.zeros(n, np.float32)), ("b", np.zeros(10, np.float32))])
        items = [("w", _gradient(n)), ("b", np.ones(10, np.float32))]

        def receive(lookup):
            out = []
            for name, value in items:
                buf = lookup(name, value.dtype) if lookup is not None else None
                if buf is None:
                    out.append((name, value))
                    continue
                buf.reshape(-1)[...] = value
                out.append((name, buf.reshape(value.shape)))
            return out

        for k in range(5):
            host.push("w0", f"warm{k}", host.version, receive)
        start = time.perf_counter()
        for k in range(pushes):
            host.push("w0", f"r{k}", host.version, receive)
        return (time.perf_counter() - start) / pushes * 1e3
    finally:
        coordinator.close()


def _engine_ms(n: int, pushes: int) -> float:
    from adamax_server.optim.engine import Adamax

    engine = Adamax.from_config({"learning_rate": 1e-4}, device="cpu")
    engine.build({"w": np.zeros(n, np.float32), "b": np.zeros(10, np.float32)})
    grads = {"w": _gradient(n), "b": np.ones(10, np.float32)}
    for _ in range(5):
        engine.apply(grads)
    start = time.perf_counter()
    for _ in range(pushes):
        engine.apply(grads)
    return (time.perf_counter() - start) / pushes * 1e3


def _gradient(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(n).astype(np.float32) * np.float32(1e-3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", nargs="+", type=float, default=[1e3, 1e5, 4e6])
    ap.add_argument("--pushes", nargs="+", type=int, default=[3000, 1000, 50])
    args = ap.parse_args()
    pushes = args.pushes + args.pushes[-1:] * len(args.params)
    print(f"{'params':>8} {'mode':>5} {'host ms':>8} {'engine ms':>9} {'overhead ms':>11}   (load {os.getloadavg()[0]:.2f})")
    for n, count in zip([int(p) for p in args.params], pushes):
        floor = _engine_ms(n, count)
        for mode in ("async", "sync"):
            ms = _host_ms(n, mode, count)
            print(f"{n:8.0e} {mode:>5} {ms:8.3f} {floor:9.3f} {ms - floor:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
