"""Apply-step benchmark: this engine vs keras.optimizers.Adamax vs torch.optim.Adamax vs the floor.

Everything is measured side by side in one run, on the same machine, and printed as ratios.

The floor: one Adamax step must read g, m, u, w and write m, u, w: 28 bytes per float32
parameter. ``copy floor`` is the time a single-threaded ``memcpy`` takes to move the same
28 bytes per parameter (14 bytes read + 14 bytes written). ``ratio to floor`` below 1.0
means the step beat a single thread's copy of the same traffic.

Usage::

    python benchmarks/bench_engine.py [--sizes 1e6 1e7] [--reps 20] [--json out.json]
    python benchmarks/bench_engine.py --device gpu --sizes 1e7 1e8 1e9   # on a GPU machine
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "server")]


def split_sizes(total: int, parts: int) -> list[int]:
    """Variable sizes of a plausible model: uneven, summing to ``total``."""
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.2, 1.0, parts)
    sizes = np.floor(weights / weights.sum() * total).astype(np.int64)
    sizes[-1] += total - sizes.sum()
    return sizes.tolist()


def timeit(fn, reps: int, warmup: int = 2, sync=lambda: None) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_floor(n_params: int, reps: int) -> float:
    """Single-thread memcpy of 14 B/param (28 B/param of traffic)."""
    src = np.ones(n_params * 14 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return timeit(lambda: np.copyto(dst, src), reps)


def bench_engine(sizes: list[int], device: str, reps: int, **kw) -> dict[str, float]:
    from adamax_server import Adamax

    rng = np.random.default_rng(1)
    init = {f"v{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opt = Adamax(device=device, **kw)
    opt.build(init)
    be = opt._backend
    out = {"apply": timeit(lambda: opt.apply(grads), reps, sync=be.synchronize)}
    for name, g in zip(init, grads):
        be.write(opt.gradient_buffer(name), g)
    out["apply_staged"] = timeit(opt.apply_staged, reps, sync=be.synchronize)
    return out


def bench_keras(sizes: list[int], reps: int) -> float | None:
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    try:
        import keras
    except Exception:
        return None
    rng = np.random.default_rng(1)
    vs = [keras.Variable(rng.standard_normal(n).astype(np.float32), name=f"v{i}") for i, n in enumerate(sizes)]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    opt = keras.optimizers.Adamax()
    opt.build(vs)
    return timeit(lambda: opt.apply(grads), reps, warmup=1)


def bench_torch(sizes: list[int], reps: int) -> float | None:
    try:
        import torch
    except Exception:
        return None
    rng = np.random.default_rng(1)
    ps = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32))) for n in sizes]
    for p in ps:
        p.grad = torch.from_numpy(rng.standard_normal(p.numel()).astype(np.float32))
    opt = torch.optim.Adamax(ps, lr=0.001, foreach=True)
    with torch.no_grad():
        return timeit(opt.step, reps)


# (label, engine kwargs, bytes moved per param by one step). With EMA and accumulation, an
# accumulate-only step reads g, acc, w, avg and writes acc, avg (24 B); an update step reads
# g, acc, w, m, u, avg and writes acc, w, m, u, avg (44 B): 34 B on average over 2 steps.
GPU_OPTIONS = (
    ("plain", {}, 28),
    ("ema+acc2", {"use_ema": True, "gradient_accumulation_steps": 2}, 34),
)


def bench_gpu(sizes: list[int], reps: int, **kw) -> dict[str, float]:
    import cupy as cp

    from adamax_server import Adamax

    n = int(sum(sizes))
    opt = Adamax(device="gpu", **kw)
    init = {f"v{i}": np.zeros(k, dtype=np.float32) for i, k in enumerate(sizes)}
    opt.build(init)
    for name in init:
        opt.gradient_buffer(name)[...] = cp.random.standard_normal(
            opt.gradient_buffer(name).shape, dtype=cp.float32
        )
    start, end = cp.cuda.Event(), cp.cuda.Event()

    def device_time(fn) -> float:
        for _ in range(3):
            fn()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        return statistics.median(ts)

    # With accumulation, steps alternate between accumulate-only and update: time whole cycles
    # and report the mean per step (a median of single steps would pick one of the two modes).
    cycle = kw.get("gradient_accumulation_steps") or 1

    def one_cycle() -> None:
        for _ in range(cycle):
            opt.apply_staged()

    t_step = device_time(one_cycle) / cycle
    # The kernel alone: replay the last step's plan straight into the backend.
    # With accumulation over k steps, capture the k distinct plans (k-1 accumulate-only steps and
    # one update) and report their mean.
    captured = []
    be = opt._backend
    real_step = be.step
    be.step = lambda group, plan: (captured.append((group, plan)), real_step(group, plan))
    for _ in range(kw.get("gradient_accumulation_steps") or 1):
        opt.apply_staged()
    be.step = real_step
    t_kernel = statistics.mean(device_time(lambda gp=gp: real_step(*gp)) for gp in captured)
    src = cp.empty(n * 14 // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    t_copy = device_time(lambda: dst.__setitem__(Ellipsis, src))
    return {"apply_staged": t_step, "kernel": t_kernel, "copy": t_copy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--variables", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--gpu-variable-counts", nargs="+", type=int, default=[10, 16, 1000],
                    help="GPU runs: split each size over this many variables (one row each)")
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    if args.device == "gpu":
        print("GB/s count bytes read + written; 'copy' moves 28 B/param (14 read + 14 written).")
        print(f"{'params':>12} {'variables':>9} {'options':>10} {'apply ms':>9} {'kernel ms':>9} "
              f"{'copy ms':>9} {'GB/s kernel':>11} {'GB/s copy':>10} {'kernel % of copy':>16} "
              f"{'apply % of copy':>15}")
        for total in args.sizes:
            for nvars in args.gpu_variable_counts:
                sizes = split_sizes(int(total), nvars)
                for label, kw, traffic in GPU_OPTIONS:
                    r = bench_gpu(sizes, args.reps, **kw)
                    gbs = traffic * total / r["kernel"] / 1e9
                    app_gbs = traffic * total / r["apply_staged"] / 1e9
                    copy_gbs = 28 * total / r["copy"] / 1e9
                    print(f"{int(total):>12} {nvars:>9} {label:>10} {r['apply_staged']*1e3:>9.3f} "
                          f"{r['kernel']*1e3:>9.3f} {r['copy']*1e3:>9.3f} {gbs:>11.1f} {copy_gbs:>10.1f} "
                          f"{100*gbs/copy_gbs:>15.1f}% {100*app_gbs/copy_gbs:>14.1f}%")
                    rows.append({"params": int(total), "variables": nvars, "options": label, **r,
                                 "traffic_bytes_per_param": traffic, "gbs": gbs, "copy_gbs": copy_gbs})
    else:
        print(f"{'params':>10} {'copy floor':>10} {'engine apply':>12} {'engine staged':>13} "
              f"{'blocked numpy':>13} {'keras':>9} {'torch foreach':>13} {'apply/floor':>11} "
              f"{'staged/floor':>12} {'keras/apply':>11}")
        for total in args.sizes:
            total = int(total)
            sizes = split_sizes(total, args.variables)
            floor = copy_floor(total, args.reps)
            eng = bench_engine(sizes, "numba", args.reps)
            npy = bench_engine(sizes, "numpy", max(3, args.reps // 3))
            ker = bench_keras(sizes, max(3, args.reps // 5))
            tor = bench_torch(sizes, args.reps)
            fmt = lambda x: f"{x*1e3:.2f} ms" if x is not None else "n/a"
            print(f"{total:>10} {fmt(floor):>10} {fmt(eng['apply']):>12} {fmt(eng['apply_staged']):>13} "
                  f"{fmt(npy['apply']):>13} {fmt(ker):>9} {fmt(tor):>13} {eng['apply']/floor:>11.2f} "
                  f"{eng['apply_staged']/floor:>12.2f} "
                  f"{(ker / eng['apply']) if ker else float('nan'):>10.1f}x")
            rows.append({"params": total, "variables": args.variables, "copy_floor": floor,
                         "engine_apply": eng["apply"], "engine_apply_staged": eng["apply_staged"],
                         "blocked_numpy_apply": npy["apply"], "keras_apply": ker, "torch_foreach_step": tor})
        try:
            from adamax_server.optim.kernels.cpu import numba_threads
            print(f"numba threads: {numba_threads()}, cores: {os.cpu_count()}")
        except Exception:
            pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    gc.collect()


if __name__ == "__main__":
    main()
