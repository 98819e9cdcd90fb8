"""A training step through ``adamax_client.torch.RemoteAdamax`` against DDP with gloo, in one run.

    python benchmarks/bench_adapters.py [--params 1e6,1e7,5e7] [--procs 2,4] [--steps 6]
                                        [--json a.json] [--png a.png]
    adamax-ps bench adapters --quick

For each model size and process count, the same MLP (Linear layers of width 1024, batch 16 per
process, float32, CPU) trains for ``--steps`` measured steps (after 2 warm-up steps) four ways,
each in fresh processes on 127.0.0.1:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over gloo (default 25 MB buckets,
  all-reduce overlapped with backward) and a local ``torch.optim.Adamax`` on every rank: what
  users would run instead;
* ``ours``: ``RemoteAdamax`` in sync mode against ``adamax-ps serve`` on the same host (bulk
  channel, shared memory), gradients streamed in 4 MB buckets while backward runs, weights
  pulled into the parameters;
* ``ours_no_overlap``: the same with ``overlap=False`` (everything sent at ``step()``), which
  shows what overlapping with backward buys; ``default`` names the one ``overlap="auto"`` (the
  adapter's default) picks on this host, and ``ratio`` = its step / DDP's step;
* ``compute``: one process alone, forward + backward + local Adamax step with a worker's thread
  count, no communication: the floor.

``sent_in_bwd``: the share of gradient tensors the adapter had handed to the transport when
``backward()`` returned (the overlap itself); ``overlap_saves_s`` = ours_no_overlap - ours, which
is what it buys when there are cores left for communication (none on a 2-core host running 2+
single-threaded workers and the server: there it competes with backward).

Each worker uses ``max(1, cores // procs)`` intra-op threads (the adapter's default plan),
DDP ranks the same. Step time is the median over rank 0's measured steps; every rank waits for
the others each step in both systems (target: ratio <= 1.0 at 10M+ params).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SpawnedServer, Table, add_output_arguments, child_env  # noqa: E402

WIDTH = 1024
BATCH = 16


def layers_for(params: float) -> tuple[int, int]:
    """(width, depth) of an MLP of about ``params`` parameters (Linear(width, width) + bias each)."""
    width = WIDTH if params >= WIDTH * (WIDTH + 1) else max(8, int((params**0.5)))
    depth = max(1, round(params / (width * (width + 1))))
    return width, depth


def build_model(width: int, depth: int):
    import torch

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------------- worker processes

def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    width, depth = spec["width"], spec["depth"]
    model = build_model(width, depth)
    rank, world = spec["rank"], spec["world"]
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, width, generator=g)
    target = torch.randn(BATCH, width, generator=g)
    kind = spec["kind"]
    if kind == "ddp":
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-4)
    elif kind == "compute":
        opt = torch.optim.Adamax(model.parameters(), lr=1e-4)
    else:
        from adamax_client.torch import RemoteAdamax

        opt = RemoteAdamax(
            model.named_parameters(), spec["target"], optimizer=spec["job"], worker_id=f"w{rank}",
            mode="sync", num_workers=world, learning_rate=1e-4, overlap=kind == "ours", threads=None,
        )  # fmt: skip
    times, streamed = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        if kind == "ours":  # gradients already sent (or being sent) when backward returns
            streamed.append(opt.streamed_tensors / len(list(model.parameters())))
        opt.step()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    out = {"median_s": statistics.median(times), "times": times,
           "streamed_in_backward": statistics.median(streamed) if streamed else float("nan")}
    if kind in ("ours", "ours_no_overlap"):
        out["path"] = opt.remote.transfer_path
        opt.close()
    if kind == "ddp":
        import torch.distributed as dist

        dist.barrier()  # no rank tears gloo down while a peer still talks to it (it aborts: "terminate called")
        dist.destroy_process_group()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(kind: str, world: int, width: int, depth: int, steps: int, warmup: int, target: str = "",
              threads: int | None = None, timeout: float = 900) -> dict:
    """Start ``world`` worker processes of ``kind``; rank 0's result (all must succeed)."""
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    port = _free_port()
    job = f"bench-{kind}-{world}-{depth}x{width}-{time.monotonic_ns()}"
    procs = []
    for rank in range(world):
        spec = dict(kind=kind, rank=rank, world=world, width=width, depth=depth, steps=steps, warmup=warmup,
                    threads=threads, port=port, target=target, job=job)
        procs.append(subprocess.Popen([sys.executable, __file__, "--_worker", json.dumps(spec)],
                                      stdout=subprocess.PIPE, text=True, env=child_env()))
    results = []
    deadline = time.monotonic() + timeout
    for proc in procs:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            for p in procs:
                p.kill()
            raise RuntimeError(f"{kind} worker failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][7:]))
    return results[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="1e6,1e7,5e7", help="model sizes (comma list)")
    parser.add_argument("--procs", default="2,4", help="worker process counts (comma list)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args._worker is not None:
        print("RESULT " + json.dumps(_worker(json.loads(args._worker))), flush=True)
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench_adapters needs torch: pip install -e '.[torch]'", file=sys.stderr)
        return 2
    sizes = [float(s) for s in args.params.split(",")]
    procs = [int(p) for p in args.procs.split(",")]
    steps, warmup = args.steps, 2
    if args.quick:
        sizes, procs, steps, warmup = [2e5], [2], 3, 1
    load_before = os.getloadavg()
    table = Table(
        "Training step: torch adapter (sync, shared memory) vs DDP (gloo), 127.0.0.1, "
        f"batch {BATCH}/process, {os.cpu_count()} cores",
        ["params", "procs", "ddp_s", "ours_overlap_s", "ours_no_overlap_s", "compute_s", "default", "ratio",
         "overlap_saves_s", "sent_in_bwd", "path"],
    )
    with SpawnedServer() as server:
        for size in sizes:
            width, depth = layers_for(size)
            n_params = depth * width * (width + 1)
            for world in procs:
                threads = max(1, (os.cpu_count() or 1) // world)
                compute = run_group("compute", 1, width, depth, steps, warmup, threads=threads)["median_s"]
                ddp = run_group("ddp", world, width, depth, steps, warmup)["median_s"]
                ours = run_group("ours", world, width, depth, steps, warmup, server.target)
                plain = run_group("ours_no_overlap", world, width, depth, steps, warmup, server.target)
                # What RemoteAdamax(overlap="auto") picks here: overlap only with cores to spare.
                default = "overlap" if (os.cpu_count() or 1) > world * threads else "no_overlap"
                picked = ours if default == "overlap" else plain
                table.add(
                    params=n_params, procs=world, ddp_s=ddp, ours_overlap_s=ours["median_s"],
                    ours_no_overlap_s=plain["median_s"], compute_s=compute, default=default,
                    ratio=picked["median_s"] / ddp,
                    overlap_saves_s=plain["median_s"] - ours["median_s"],
                    sent_in_bwd=ours["streamed_in_backward"], path=ours.get("path", ""),
                )  # fmt: skip
                print(table.format().splitlines()[-1], flush=True)
    load_after = os.getloadavg()
    table.notes.append(
        f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; the machine may be shared"
    )
    table.notes.append("compute_s: one process alone with a worker's thread count, no communication (the floor)")
    print(table.format())
    if args.json:
        table.write_json(args.json, load_average=[load_before, load_after])
    if args.png:
        table.write_png(args.png, ["params", "procs"], "ratio", "ours / DDP step time",
                        reference=(1.0, "DDP"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
