"""Shard scaling: one job over 1, 2 and 4 shards, 4 workers, where the network is the bottleneck.

    adamax-ps bench shards --net netns [--rate-mbit 1000] [--shards 1 2 4] [--workers 4] [--params 4e6]
    adamax-ps bench shards --net loopback [--params 1e5 4e6]        (no shaping: coordination overhead)
    adamax-ps bench shards --quick                                     (smoke test: loopback, tiny)

``--net netns``: every server shard and every worker is a host of its own, a Linux network
namespace with one link into a switch (``_netns.Switch``), shaped to ``--rate-mbit`` in each
direction (``tc tbf``): a cluster of one-NIC machines, on one box. Needs root; otherwise the
benchmark says why and exits 0 with no rows for that network. Addresses are private and exist
only inside the namespaces it creates and always deletes.

``--net loopback``: the same processes on 127.0.0.1 without shaping. Bytes are then nearly free,
so the step time over 1 shard vs S shards shows what the sharding costs by itself: the
leader's round decision, the norm exchange of clipping (``--clip global``), the ordered commit
of async pushes (``--modes async``).

Each worker process runs the README loop (``pull``, then ``push`` one float32 gradient; no model
compute) in one job (``mode="sync"``: ``num_workers=W``). After warm-up rounds all workers start
together; step time = the slowest worker's wall time / rounds. The sharded series uses the
sharded client for every S, one shard included (``RemoteAdamax([...], sharded=True)``: the same
code path for every row; a sharded job stages and pulls over every shard's bulk channel (TCP),
all shards in parallel). Two single-server references run alongside (``--reference``): the bulk channel's TCP
and gRPC streams (shared memory is off everywhere: the namespaces share one kernel, and the
point is the network). ``--shared-memory`` (loopback only) adds the same-host case: a single
server and the sharded series with shared memory on (``1 server, shm`` and ``S shard(s), shm``),
which is what a one-shard job costs next to one server when workers share its host.

* ``agg_MB/s``: bytes all workers pushed and pulled per second (W x 2 x 4 bytes/param / step);
* ``floor_ms`` (netns): the physical floor of a step: the pull phase moves W x n bytes out of the
  shards (W x n / S from each) and n into each worker, the push phase the reverse, so
  floor = 2 x max(W/S, 1) x n_bytes / link rate, with the link rate measured in this run by raw
  TCP between two hosts;
* ``speedup`` = t(1 shard) / t(S shards); ``efficiency`` = speedup / S (target >= 0.85 up to 4).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _netns  # noqa: E402
from _common import Table, add_output_arguments, child_env  # noqa: E402

_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from adamax_client import RemoteAdamax
    target, job, wid, workers, n, warmup, rounds, mode, clip, client = sys.argv[1:11]
    workers, n, warmup, rounds = int(workers), int(n), int(warmup), int(rounds)
    rng = np.random.default_rng(int(wid))
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    extra = {"global_clipnorm": 1e-3} if clip == "global" else {}
    if client.startswith("sharded"):  # the sharded client, also over one shard: the same code for every S
        extra["sharded"] = True
    else:  # one server: shared memory, the bulk channel over TCP, or gRPC streams
        extra["bulk"] = {"shm": "auto", "tcp": "tcp"}.get(client, "off")
    opt = RemoteAdamax(target.split(","), optimizer=job, worker_id=f"w{wid}", mode=mode,
                       num_workers=workers if mode == "sync" else 1, learning_rate=1e-4, timeout=600, **extra)
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
    opt.pull()  # the last step is complete when its weights are back
    print(json.dumps({"seconds": time.perf_counter() - t0, "path": opt.transfer_path}), flush=True)
    opt.close()
    """
)

# How a series of rows reaches the servers: a sharded job (its client over S shard servers), or
# one plain server over the bulk channel's TCP or over gRPC streams (the references).
# "-shm"/"shm": the servers offer shared memory (loopback only).
CLIENTS = {"sharded": "tcp", "sharded-shm": "shm", "tcp": "tcp", "grpc": "grpc", "shm": "shm"}  # client -> transfer path it must report


def sharding_available() -> bool:
    """Whether this checkout's ``serve`` takes ``--shards`` (one job over several servers)."""
    out = subprocess.run([sys.executable, "-m", "adamax_server.cli", "serve", "--help"], capture_output=True,
                         text=True, env=child_env(), timeout=120).stdout
    return "--shards" in out


@dataclass
class Placement:
    """Where the shards listen and where each process runs (a namespace host, or none)."""

    net: _netns.Switch | None
    shard_hosts: list[_netns.Host | None]
    shard_addresses: list[str]  # host:port, in shard order
    worker_hosts: list[_netns.Host | None]

    def command(self, host: _netns.Host | None, argv: Sequence[str]) -> list[str]:
        return self.net.command(host, argv) if self.net is not None and host is not None else list(argv)


def _serve_argv(address: str, index: int, shards: list[str], workers: int, sharded: bool, shm: bool = False) -> list[str]:
    host, port = address.rsplit(":", 1)
    argv = [sys.executable, "-m", "adamax_server.cli", "--log-level", "WARNING", "serve", "--host", host,
            "--port", port, "--device", "cpu", "--max-threads", str(8 + 4 * workers)]
    if not shm:
        argv.append("--no-shared-memory")
    if sharded:
        argv += ["--shard-index", str(index), "--shards", ",".join(shards)]
    return argv


class Shards:
    """The server processes of one job, started together and stopped together."""

    def __init__(self, where: Placement, workers: int, sharded: bool, shm: bool = False) -> None:
        self.procs: list[subprocess.Popen] = []
        try:
            for i, (host, address) in enumerate(zip(where.shard_hosts, where.shard_addresses)):
                argv = where.command(host, _serve_argv(address, i, where.shard_addresses, workers, sharded, shm))
                self.procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=child_env()))
            for proc in self.procs:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                if not line.startswith("listening on"):
                    raise RuntimeError(f"a shard did not start: {line!r}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run_job(where: Placement, job: str, n: int, warmup: int, rounds: int, mode: str, clip: str, client: str) -> float:
    """Seconds per step of W workers (the slowest one) in one job over the placement's shards."""
    import json

    target = ",".join(where.shard_addresses)
    workers = len(where.worker_hosts)
    procs = [
        subprocess.Popen(where.command(host, [sys.executable, "-c", _WORKER, target, job, str(i), str(workers),
                                              str(n), str(warmup), str(rounds), mode, clip, client]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
        for i, host in enumerate(where.worker_hosts)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed: {line!r}")
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        replies = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        if any(r["path"] != CLIENTS[client] for r in replies):
            raise RuntimeError(f"{client} workers used {[r['path'] for r in replies]}, not {CLIENTS[client]}")
        for p in procs:
            p.wait(60)
        return max(r["seconds"] for r in replies) / rounds
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _rounds(n: int, quick: bool, shaped: bool) -> tuple[int, int]:
    if quick:
        return 1, 3
    if n <= 1_000_000:
        return 5, 40
    return (2, 5) if shaped else (2, 10)


SERVERS = {"sharded": "{s} shard(s)", "sharded-shm": "{s} shard(s), shm", "tcp": "1 server, bulk TCP",
           "grpc": "1 server, gRPC", "shm": "1 server, shm"}


def measure(net: str, series: list[tuple[str, int]], workers: int, sizes: list[int], modes: list[str],
            clips: list[str], rate_mbit: float, quick: bool, table: Table) -> None:
    shaped = net == "netns"
    switch = _netns.Switch(rate_mbit=rate_mbit) if shaped else None
    try:
        worker_hosts: list[_netns.Host | None] = [switch.host(f"w{i}") for i in range(workers)] if switch else [None] * workers
        shard_hosts: list[_netns.Host | None] = ([switch.host(f"s{i}") for i in range(max(s for _, s in series))]
                                                 if switch else [None] * max(s for _, s in series))
        link = _netns.link_mb_per_s(switch, worker_hosts[0], shard_hosts[0]) if switch else float("nan")
        if switch:
            table.notes.append(f"netns: raw TCP between two hosts measured {link:.1f} MB/s "
                               f"(links shaped to {rate_mbit:g} Mbit/s = {rate_mbit / 8:.1f} MB/s)")
        for n in sizes:
            nbytes = 4 * n
            warmup, rounds = _rounds(n, quick, shaped)
            for mode in modes:
                for clip in clips:
                    base: dict[str, float] = {}  # per sharded series: its 1-shard time
                    for client, s in series:
                        if shaped and client in ("shm", "sharded-shm"):
                            continue  # the namespaces share one /dev/shm: shared memory would skip the links
                        if switch:
                            addresses = [f"{h.address}:50051" for h in shard_hosts[:s]]  # type: ignore[union-attr]
                        else:
                            addresses = [f"127.0.0.1:{_netns.free_port()}" for _ in range(s)]
                        where = Placement(switch, shard_hosts[:s], addresses, worker_hosts)
                        shards = Shards(where, workers, sharded=client.startswith("sharded"),
                                        shm=client in ("shm", "sharded-shm"))
                        try:
                            t = run_job(where, f"shards-{n}-{s}-{mode}-{clip}-{client}", n, warmup, rounds, mode,
                                        clip, client)
                        finally:
                            shards.stop()
                        sharded = client.startswith("sharded")
                        if sharded:
                            base.setdefault(client, t)
                        floor = 2 * max(workers / s, 1) * nbytes / (link * 1e6) if switch else float("nan")
                        speedup = base[client] / t if sharded else float("nan")
                        table.add(**{"net": f"{net} {rate_mbit:g}M" if shaped else net, "params": f"{n:.0e}",
                                     "mode": mode, "clip": clip, "servers": SERVERS[client].format(s=s),
                                     "shards": s, "workers": workers, "step_ms": t * 1e3,
                                     "agg_MB/s": workers * 2 * nbytes / 1e6 / t, "floor_ms": floor * 1e3,
                                     "x floor": t / floor if switch else float("nan"),
                                     "overhead_ms": (t - base[client]) * 1e3 if sharded else float("nan"),
                                     "speedup": speedup, "efficiency": speedup / s})
                        print(table.format().splitlines()[1 + len(table.rows)], flush=True)  # the new row
    finally:
        if switch is not None:
            switch.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", nargs="+", choices=("netns", "loopback"), default=["netns", "loopback"])
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="link rate of every netns host, each way")
    ap.add_argument("--shards", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--params", nargs="+", type=float, default=None,
                    help="parameters (float32) of the job; default 4e6 on netns, 1e5 and 4e6 on loopback")
    ap.add_argument("--modes", nargs="+", choices=("sync", "async"), default=["sync"])
    ap.add_argument("--clip", nargs="+", choices=("none", "global"), default=["none"],
                    help="global: global_clipnorm, so every step exchanges the shards' sums of squares")
    ap.add_argument("--reference", nargs="*", choices=("tcp", "grpc"), default=["tcp", "grpc"],
                    help="single-server rows measured alongside: bulk channel over TCP, gRPC streams")
    ap.add_argument("--shared-memory", action="store_true",
                    help="loopback: also a single server and the sharded series with shared memory on")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    nets = ["loopback"] if args.quick else args.net
    shard_counts = sorted(set(args.shards) | {1})  # 1 shard: the base of speedup and efficiency
    if args.quick:
        shard_counts = shard_counts[:2]
    series = [(client, 1) for client in args.reference]
    if args.shared_memory:
        series.append(("shm", 1))
    if sharding_available():
        series += [("sharded", s) for s in shard_counts]
        if args.shared_memory:
            series += [("sharded-shm", s) for s in shard_counts]
    else:
        print("sharded series skipped: this checkout's `adamax-ps serve` has no --shards (one job over several "
              "servers); measuring the single-server references only", flush=True)
    workers = 2 if args.quick else args.workers
    load = os.getloadavg()
    table = Table(f"Shard scaling: {workers} workers, one job over S shards "
                  f"({os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start)",
                  ["net", "params", "mode", "clip", "servers", "workers", "step_ms", "agg_MB/s", "floor_ms",
                   "x floor", "overhead_ms", "speedup", "efficiency"])
    for net in nets:
        if net == "netns":
            problem = _netns.netns_problem()
            if problem is not None:
                print(f"netns benchmark skipped: {problem}", flush=True)
                table.notes.append(f"netns skipped: {problem}")
                continue
        sizes = ([int(1e4)] if args.quick else [int(p) for p in args.params] if args.params
                 else [int(4e6)] if net == "netns" else [int(1e5), int(4e6)])
        measure(net, series, workers, sizes, args.modes, args.clip,
                args.rate_mbit, args.quick, table)
    table.notes.append("step = slowest worker's (pull + push) wall time / rounds; agg_MB/s = W x 2 x 4 B/param / step; "
                       "floor (netns) = 2 x max(W/S, 1) x bytes / measured link rate; overhead_ms = t(S) - t(1 shard); "
                       "efficiency = t(1) / (S x t(S))")
    end = os.getloadavg()
    table.notes.append(f"load average at the end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    print(table.format(), flush=True)
    if args.json:
        table.write_json(args.json)
    if args.png:
        _plot(table, args.png)
    return 0


def _plot(table: Table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows_sharded = [r for r in table.rows if r["servers"].endswith("shard(s)")]
    series = dict.fromkeys((r["net"], r["params"], r["mode"], r["clip"]) for r in rows_sharded)
    for k, key in enumerate(series):
        rows = [r for r in rows_sharded if (r["net"], r["params"], r["mode"], r["clip"]) == key]
        ss = [r["shards"] for r in rows]
        label = " ".join(str(x) for x in key)
        axes[0].plot(ss, [r["step_ms"] for r in rows], marker="o", color=f"C{k}", label=label)
        axes[1].plot(ss, [r["speedup"] for r in rows], marker="o", color=f"C{k}", label=label)
    top = max([r["shards"] for r in rows_sharded] or [1])
    axes[1].plot([1, top], [1, top], color="k", lw=0.8, ls=":", label="ideal")
    axes[1].plot([1, top], [0.85, 0.85 * top], color="k", lw=0.8, ls="--", label="0.85 x shards")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("shards")
    axes[0].set_ylabel("sync step (ms)")
    axes[1].set_xlabel("shards")
    axes[1].set_ylabel("t(1 shard) / t(S)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(table.title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    print(f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
