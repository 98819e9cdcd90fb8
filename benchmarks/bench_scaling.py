"""End to end: synchronous rounds with 1, 2, 4 and 8 worker processes against one server.

    python benchmarks/bench_scaling.py [--params 1e6 1e7] [--workers 1 2 4 8] [--json s.json] [--png s.png]
    adamax-ps bench scaling --quick

Each worker is a spawned process running the README's loop (``pull`` the weights, ``push`` a
float32 gradient; no model compute, so the figures are the parameter server's own cost) in a
``mode="sync"`` job with ``num_workers=W``. After warm-up rounds all workers start together;
the step time is the slowest worker's wall time over the timed rounds. Each transfer path
(gRPC streams, the bulk channel's TCP, shared memory) runs on its own server.

* ``floor/worker``: the bytes one worker must move per step (gradient up + weights down,
  4 bytes/param each way) at the raw-TCP throughput measured in this run on 127.0.0.1;
* ``floor/server``: W times that, since every byte passes through the one server;
* ``efficiency``: t(1 worker) / t(W workers) on the same size (weak scaling: 1.0 means adding
  workers costs nothing per step; the job then processes W times the samples per second).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SpawnedServer, Table, add_output_arguments, child_env, raw_tcp_seconds  # noqa: E402

_WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from adamax_client import RemoteAdamax
    target, job, wid, workers, n, warmup, rounds, bulk = sys.argv[1:9]
    workers, n, warmup, rounds = int(workers), int(n), int(warmup), int(rounds)
    rng = np.random.default_rng(int(wid))
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    opt = RemoteAdamax(target, optimizer=job, worker_id=f"w{wid}", mode="sync", num_workers=workers,
                       learning_rate=1e-4, timeout=600, bulk=bulk)
    opt.build({"w": np.zeros(n, np.float32)})
    def step():
        opt.pull()
        opt.push([grad])
    for _ in range(warmup):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    for _ in range(rounds):
        step()
    opt.pull()  # the last round's weights: the step is complete when they are back
    print(time.perf_counter() - t0, opt.transfer_path, flush=True)
    opt.close()
    """
)


def run_job(target: str, job: str, workers: int, n: int, warmup: int, rounds: int, bulk: str = "auto") -> float:
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, target, job, str(i), str(workers), str(n),
                               str(warmup), str(rounds), bulk], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=child_env()) for i in range(workers)]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed: {line!r}")
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        replies = [p.stdout.readline().split() for p in procs]  # type: ignore[union-attr]
        elapsed = [float(r[0]) for r in replies]
        want = {"off": "grpc", "auto": "shm"}.get(bulk, bulk)
        if any(r[1] != want for r in replies):
            raise RuntimeError(f"asked for bulk={bulk!r}, workers used {[r[1] for r in replies]}")
        for p in procs:
            p.wait(60)
        return max(elapsed) / rounds
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


PATHS = {"off": "gRPC", "tcp": "bulk TCP", "shm": "shared memory"}


def measure(sizes: list[int], worker_counts: list[int], quick: bool, paths: list[str]) -> Table:
    table = Table(f"Sync rounds, W worker processes, one server, 127.0.0.1 ({os.cpu_count()} cores)",
                  ["params", "path", "workers", "step_ms", "steps/s", "server_MB/s", "floor/worker_ms",
                   "x floor/worker", "x floor/server", "efficiency"])
    for n in sizes:
        nbytes = 4 * n
        tcp_push, tcp_pull = raw_tcp_seconds(nbytes, 3 if quick else 5)
        floor = tcp_push + tcp_pull
        rounds = 3 if quick else max(5, min(30, int(3e8 // (nbytes * max(worker_counts)))))
        for path in paths:
            base = None
            with SpawnedServer(["--max-threads", str(8 + 4 * max(worker_counts))]) as srv:
                for w in worker_counts:
                    t = run_job(srv.target, f"scale-{n}-{w}-{path}", w, n, 1 if quick else 2, rounds, path)
                    base = t if base is None else base
                    table.add(**{"params": f"{n:.0e}", "path": PATHS[path], "workers": w, "step_ms": t * 1e3,
                                 "steps/s": 1 / t, "server_MB/s": w * 2 * nbytes / 1e6 / t,
                                 "floor/worker_ms": floor * 1e3, "x floor/worker": t / floor,
                                 "x floor/server": t / (w * floor), "efficiency": base / t})
    table.notes.append("floor/worker = raw TCP send + receive time of 4 bytes/param (gradient up, weights down), "
                       "measured in this run; x floor/server divides by W x that (every byte passes the one server)")
    table.notes.append("efficiency = t(first worker count) / t(W); server_MB/s = W x (gradient + weights) / step")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                    help="transfer paths (RemoteAdamax bulk=...)")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    sizes = [int(1e4)] if args.quick else [int(p) for p in args.params]
    workers = [1, 2] if args.quick else args.workers
    table = measure(sizes, workers, args.quick, args.paths)
    print(table.format(), flush=True)
    if args.json:
        table.write_json(args.json)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        series = dict.fromkeys((r["params"], r["path"]) for r in table.rows)
        for k, (size, path) in enumerate(series):
            rows = [r for r in table.rows if (r["params"], r["path"]) == (size, path)]
            ws = [r["workers"] for r in rows]
            color = f"C{k}"
            axes[0].plot(ws, [r["x floor/worker"] for r in rows], marker="o", color=color, label=f"{size}, {path}")
            axes[1].plot(ws, [r["efficiency"] for r in rows], marker="o", color=color, label=f"{size}, {path}")
        axes[0].axhline(1.3, color="k", lw=0.8, ls="--", label="target 1.3x")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("workers")
        axes[0].set_ylabel("step time / transfer floor per worker")
        axes[1].set_xlabel("workers")
        axes[1].set_ylabel("t(1) / t(W)")
        axes[1].set_ylim(0, 1.1)
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
