"""Transport: push and pull of one gradient set against the raw-TCP floor and a naive unary call.

    python benchmarks/bench_transport.py [--mb 4 40 400] [--sweep-mb 40] [--json t.json] [--png t.png]
    adamax-ps bench transport --quick

Two tables, each measured in one run on 127.0.0.1 (servers in spawned subprocesses):

1. Sizes. For each total size: raw TCP ``sendall`` of the same bytes (the floor); one gRPC
   unary message holding everything (what a naive service does; benchmark-only service in
   ``_bytes_service.py``); the real service: ``RemoteAdamax.push`` end to end (it includes
   the server's apply, shown separately as measured in-process) and ``Pull`` served from
   the once-per-version copy, always transferring; each over gRPC streams, the bulk
   channel's TCP and shared memory (with one in-memory copy of the bytes beside it: the
   floor of the shared-memory path).
2. Sweep, at one size: chunk size 256 KiB to 8 MiB; one streaming call vs concurrent unary
   chunk calls (8 in flight) over 1 or 4 channels (benchmark-only service); and the real
   service's push (client ``chunk_bytes``) and pull (server ``--chunk-mib``, whole MiB only).

``x floor`` is time / raw-TCP time for the same bytes and direction: 1.0 is the floor.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MB, SpawnedServer, Table, add_output_arguments, median_seconds, raw_tcp_seconds  # noqa: E402

KIB = 1024
SWEEP_CHUNKS = [256 * KIB, 512 * KIB, 1024 * KIB, 2048 * KIB, 4096 * KIB, 8192 * KIB]


REPEATS: int | None = None  # --reps: the same count for every size


def _repeats(nbytes: int, quick: bool) -> int:
    if REPEATS is not None:
        return REPEATS
    if quick:
        return 2
    return 3 if nbytes >= 200 * MB else 5 if nbytes >= 20 * MB else 10


def _bytes_service(nbytes: int) -> SpawnedServer:
    return SpawnedServer([str(nbytes)], module="_bytes_service")


def _service_push_pull(target: str, n: int, reps: int, chunk_bytes: int | None = None,
                       name: str = "bench", bulk: str = "off") -> tuple[float, float]:
    """Median push (incl. the server's apply) and pull seconds of the real service.

    ``bulk``: "off" (gRPC streams), "tcp" or "shm" (the bulk channel). Pulls never send a
    known version, so every pull transfers (served from the server's per-version copy).
    """
    from adamax_wire import tensors as _wire
    from adamax_client import RemoteAdamax
    from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

    rng = np.random.default_rng(0)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    with RemoteAdamax(target, optimizer=name, worker_id=f"w-{chunk_bytes}-{bulk}", learning_rate=1e-6, timeout=300,
                      bulk=bulk, **kw) as remote:  # fmt: skip
        remote.build({"w": rng.standard_normal(n, dtype=np.float32)})
        push = median_seconds(lambda: remote.push([grad]), reps)
        if remote.transfer_path != ("grpc" if bulk == "off" else bulk):
            raise RuntimeError(f"asked for bulk={bulk!r} but pushes went over {remote.transfer_path}")
        request = pb.PullRequest(optimizer=name)  # no known_version: always transfers
        if bulk == "off":
            pull = median_seconds(lambda: remote._transport.unary_stream("Pull", request, _wire.decode_stream), reps)
        else:
            pull = median_seconds(lambda: remote._bulk.pull(request, timeout=300), reps)
    return push, pull


def _engine_apply(n: int, reps: int) -> float:
    """The server's share of a push: gradient statistics (non-finite check) and the update
    on a gradient already in the staging buffer (where the server receives it)."""
    from adamax_server import Adamax
    from adamax_server.optim.kernels.stats import gradient_stats

    engine = Adamax(learning_rate=1e-6, device="cpu")
    engine.build({"w": np.zeros(n, np.float32)})
    engine.gradient_buffer("w")[...] = np.float32(1e-3)

    def step() -> None:
        gradient_stats(engine.gradient_buffer("w"))
        engine.apply_staged()

    return median_seconds(step, reps)


def _memcpy_seconds(nbytes: int, reps: int) -> float:
    """One copy of the bytes in memory: the floor of the shared-memory path's each direction."""
    src = np.random.default_rng(2).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return median_seconds(lambda: np.copyto(dst, src), reps)


def size_table(sizes_mb: list[float], quick: bool) -> Table:
    from _bytes_service import BytesClient

    table = Table("Transport: one float32 gradient set on 127.0.0.1 (median ms; x floor = time / raw TCP)",
                  ["MB", "path", "push_ms", "pull_ms", "push_MB/s", "pull_MB/s", "push_x_floor", "pull_x_floor"])
    for mb in sizes_mb:
        nbytes = int(mb * MB) // 4 * 4
        n, reps = nbytes // 4, _repeats(nbytes, quick)
        tcp_push, tcp_pull = raw_tcp_seconds(nbytes, reps)
        rows: list[tuple[str, float, float]] = [("raw TCP (floor)", tcp_push, tcp_pull)]
        data = memoryview(np.random.default_rng(1).standard_normal(n, dtype=np.float32)).cast("B")
        with _bytes_service(nbytes) as srv:
            client = BytesClient(srv.target)
            out = memoryview(bytearray(nbytes))
            rows.append(("gRPC single unary message", median_seconds(lambda: client.push_unary(data), reps),
                         median_seconds(client.pull_unary, reps)))
            rows.append(("gRPC stream, 2 MiB chunks", median_seconds(lambda: client.push_stream(data, 2 << 20), reps),
                         median_seconds(lambda: client.pull_stream(out, 2 << 20), reps)))
            client.close()
        apply = _engine_apply(n, reps)
        copy = _memcpy_seconds(nbytes, reps)
        with SpawnedServer() as srv:
            for bulk, label in (("off", "gRPC stream"), ("tcp", "bulk TCP"), ("shm", "shared memory")):
                push, pull = _service_push_pull(srv.target, n, reps, name=f"bench-{bulk}", bulk=bulk)
                rows.append((f"adamax-ps {label}: push (incl. apply) / pull", push, pull))
                rows.append((f"adamax-ps {label}: push minus apply", max(push - apply, 1e-9), pull))
        rows.append(("  server apply + stats (in-process)", apply, float("nan")))
        rows.append(("  memcpy of the bytes (shm floor)", copy, copy))
        for path, p, q in rows:
            table.add(**{"MB": round(nbytes / MB, 1), "path": path, "push_ms": p * 1e3, "pull_ms": q * 1e3,
                         "push_MB/s": nbytes / MB / p, "pull_MB/s": nbytes / MB / q,
                         "push_x_floor": p / tcp_push, "pull_x_floor": q / tcp_pull})
    return table


def sweep_table(mb: float, quick: bool) -> Table:
    from _bytes_service import BytesClient

    nbytes = int(mb * MB) // 4 * 4
    n, reps = nbytes // 4, _repeats(nbytes, quick)
    chunks = [256 * KIB, 1024 * KIB] if quick else SWEEP_CHUNKS
    table = Table(f"Chunk sweep at {nbytes / MB:.0f} MB (median ms; x floor = time / raw TCP)",
                  ["chunk_KiB", "mode", "push_ms", "pull_ms", "push_x_floor", "pull_x_floor"])
    tcp_push, tcp_pull = raw_tcp_seconds(nbytes, reps)

    def add(chunk: int, mode: str, push: float, pull: float) -> None:
        table.add(chunk_KiB=chunk // KIB, mode=mode, push_ms=push * 1e3, pull_ms=pull * 1e3,
                  push_x_floor=push / tcp_push, pull_x_floor=pull / tcp_pull)

    data = memoryview(np.random.default_rng(1).standard_normal(n, dtype=np.float32)).cast("B")
    out = memoryview(bytearray(nbytes))
    with _bytes_service(nbytes) as srv:
        one, four = BytesClient(srv.target, 1), BytesClient(srv.target, 4)
        for chunk in chunks:
            add(chunk, "grpc stream, 1 channel", median_seconds(lambda: one.push_stream(data, chunk), reps),
                median_seconds(lambda: one.pull_stream(out, chunk), reps))
            add(chunk, "grpc unary chunks x8, 1 channel", median_seconds(lambda: one.push_chunks(data, chunk), reps),
                median_seconds(lambda: one.pull_chunks(out, chunk), reps))
            add(chunk, "grpc unary chunks x8, 4 channels",
                median_seconds(lambda: four.push_chunks(data, chunk), reps),
                median_seconds(lambda: four.pull_chunks(out, chunk), reps))
        one.close()
        four.close()
    # The real service: push chunking is the client's choice, pull chunking the server's (whole MiB).
    for chunk in chunks[-1:] if quick else chunks:
        mib = chunk // (1024 * KIB)
        with SpawnedServer(["--chunk-mib", str(max(mib, 1))]) as srv:
            push, pull = _service_push_pull(srv.target, n, reps, chunk_bytes=chunk)
        add(chunk, "adamax-ps push (incl. apply) / pull", push, pull if mib >= 1 else float("nan"))
    table.notes.append("adamax-ps pull chunk is the server's --chunk-mib (whole MiB): no pull figure below 1 MiB")
    table.notes.append(f"raw TCP floor: push {tcp_push * 1e3:.1f} ms, pull {tcp_pull * 1e3:.1f} ms")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", nargs="+", type=float, default=[4, 40, 400], help="total sizes, MB")
    ap.add_argument("--sweep-mb", type=float, default=40.0)
    ap.add_argument("--reps", type=int, default=None, help="repeats per figure (default: 10/5/3 by size)")
    ap.add_argument("--sweep-only", action="store_true", help="only the chunk sweep")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    global REPEATS
    REPEATS = args.reps
    sizes = [1.0] if args.quick else args.mb
    sweep_mb = 1.0 if args.quick else args.sweep_mb
    sizes_t = None if args.sweep_only else size_table(sizes, args.quick)
    if sizes_t is not None:
        print(sizes_t.format(), "\n", flush=True)
    sweep_t = sweep_table(sweep_mb, args.quick)
    print(sweep_t.format(), flush=True)
    if args.json:
        (sizes_t or sweep_t).write_json(args.json, sweep=sweep_t.__dict__)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = 2 if sizes_t is not None else 1
        fig, grid = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
        if sizes_t is not None:  # top: every path against the raw-TCP floor, by size
            for ax, direction in zip(grid[0], ("push", "pull")):
                for path in dict.fromkeys(r["path"] for r in sizes_t.rows):
                    pts = [(r["MB"], r[f"{direction}_x_floor"]) for r in sizes_t.rows
                           if r["path"] == path and r[f"{direction}_x_floor"] == r[f"{direction}_x_floor"]]
                    if pts and "apply +" not in path:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=path.strip())
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("MB per transfer")
                ax.set_ylabel("time / raw TCP (1 = floor)")
                ax.set_title(f"{direction}: time against raw TCP on 127.0.0.1")
                ax.axhline(1.0, color="k", lw=0.8)
                ax.axhline(1.25, color="k", lw=0.8, ls="--")
            grid[0][0].legend(fontsize=7)
        for ax, direction in zip(grid[-1], ("push", "pull")):
            for mode in dict.fromkeys(r["mode"] for r in sweep_t.rows):
                pts = [(r["chunk_KiB"], r[f"{direction}_x_floor"]) for r in sweep_t.rows if r["mode"] == mode]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("chunk KiB")
            ax.set_ylabel("time / raw TCP (1 = floor)")
            ax.set_title(f"gRPC chunk sweep, {direction}, {sweep_mb:.0f} MB")
            ax.axhline(1.0, color="k", lw=0.8)
        grid[-1][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
