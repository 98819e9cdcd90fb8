"""Wire compression: float32 vs bfloat16 vs float16 gradients on the wire (the server keeps float32).

    python benchmarks/bench_wire.py [--throughput-params 1e7] [--params 1e6] [--steps 100]
    adamax-ps bench wire --quick

Two tables from one spawned server (``adamax-ps serve --port 0 --device cpu``):

1. Throughput: ``RemoteAdamax(gradient_wire_dtype=...).push`` of one gradient set, end to end
   (includes the server's upcast and apply). ``effective MB/s`` counts the float32 bytes the
   gradient stands for, so it shows what the halved wire buys.
2. Results: the same training run three times, ``--steps`` steps of pull -> gradient -> push on
   a least-squares toy problem (gradient ``w - target + noise``, noise fixed per step), once
   per wire dtype. Compared with the float32 run: max |w - w_f32|, the difference relative
   to how far float32 moved the weights, and the final loss.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MB, SpawnedServer, Table, add_output_arguments, median_seconds  # noqa: E402

WIRES = [("float32", None), ("bfloat16", "bfloat16"), ("float16", "float16")]


def throughput(target: str, n: int, reps: int) -> Table:
    from adamax_client import RemoteAdamax

    from adamax_wire import tensors as _wire

    table = Table(f"Push throughput by wire dtype, {n:.0e} params ({4 * n / MB:.0f} MB as float32)",
                  ["wire", "wire_MB", "push_ms", "effective_MB/s", "speedup_vs_f32", "client_encode_ms",
                   "numpy_upcast_ms"])
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    base = None
    for label, wire in WIRES:
        with RemoteAdamax(target, optimizer=f"tp-{label}", worker_id="w0", learning_rate=1e-6,
                          gradient_wire_dtype=wire, timeout=300) as opt:
            opt.build({"w": np.zeros(n, np.float32)})
            t = median_seconds(lambda: opt.push([grad]), reps)
        base = t if base is None else base
        # Parts of the push measured in this process: the client's narrowing, and a NumPy upcast
        # back to float32 like the server's (the server's own path may differ).
        encode = median_seconds(lambda: _wire._as_wire_array(grad, "g", wire), reps)
        narrow = _wire._as_wire_array(grad, "g", wire)[1]
        upcast = (lambda: _wire.from_bfloat16_bits(narrow)) if wire == "bfloat16" else \
            (lambda: narrow.astype(np.float32))
        table.add(wire=label, wire_MB=n * (4 if wire is None else 2) / MB, push_ms=t * 1e3,
                  client_encode_ms=encode * 1e3 if wire else 0.0,
                  numpy_upcast_ms=median_seconds(upcast, reps) * 1e3 if wire else 0.0,
                  **{"effective_MB/s": 4 * n / MB / t, "speedup_vs_f32": base / t})
    return table


def fidelity(target: str, n: int, steps: int) -> Table:
    from adamax_client import RemoteAdamax

    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(n, dtype=np.float32)
    goal = rng.standard_normal(n, dtype=np.float32)
    finals: dict[str, np.ndarray] = {}
    for label, wire in WIRES:
        noise_rng = np.random.default_rng(2)  # the same noise sequence for every run
        with RemoteAdamax(target, optimizer=f"fid-{label}", worker_id="w0", learning_rate=1e-2,
                          gradient_wire_dtype=wire, timeout=300) as opt:
            opt.build({"w": w0})
            for _ in range(steps):
                w = opt.pull()["w"]
                noise = noise_rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)
                opt.push([w - goal + noise])
            finals[label] = np.array(opt.pull()["w"])
    ref = finals["float32"]
    moved = float(np.linalg.norm(ref - w0))
    table = Table(f"Effect on results after {steps} steps, {n:.0e} params (server state float32 throughout)",
                  ["wire", "max_abs_diff", "rel_diff_to_f32_update", "final_loss", "loss_ratio_vs_f32"])
    ref_loss = 0.5 * float(np.mean((ref - goal) ** 2))
    for label, _ in WIRES:
        w = finals[label]
        loss = 0.5 * float(np.mean((w - goal) ** 2))
        table.add(wire=label, max_abs_diff=float(np.max(np.abs(w - ref))),
                  rel_diff_to_f32_update=float(np.linalg.norm(w - ref)) / moved, final_loss=loss,
                  loss_ratio_vs_f32=loss / ref_loss)
    table.notes.append("rel_diff_to_f32_update = ||w - w_f32|| / ||w_f32 - w_0||; "
                       f"initial loss {0.5 * float(np.mean((w0 - goal) ** 2)):.4g}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--throughput-params", type=float, default=1e7)
    ap.add_argument("--params", type=float, default=1e6)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        tp_n, n, steps, reps = int(1e5), int(1e4), 5, 2
    else:
        tp_n, n, steps, reps = int(args.throughput_params), int(args.params), args.steps, args.reps
    with SpawnedServer() as srv:
        tp = throughput(srv.target, tp_n, reps)
        print(tp.format(), "\n", flush=True)
        fid = fidelity(srv.target, n, steps)
        print(fid.format(), flush=True)
    if args.json:
        tp.write_json(args.json, fidelity=fid.__dict__)
    if args.png:
        tp.write_png(args.png, ["wire"], "effective_MB/s", "effective MB/s (float32 bytes / push time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
