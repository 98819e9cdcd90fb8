"""The data path against what users would run instead and against the wire's floor, in one run.

    python benchmarks/bench_datapath.py [--parts async sync tls] [--json d.json] [--png d.png]
    adamax-ps bench datapath --quick

Three parts, each measured side by side on this machine (servers and workers are spawned
processes on 127.0.0.1):

* ``async``: W worker processes (default 4) push 1M-param float32 gradients to one ``mode="async"``
  optimizer as fast as they can, over gRPC streams, the bulk channel's TCP and shared memory.
  The floor: the same W processes sending the same bytes over raw TCP sockets to one receiver
  process (a thread per connection, ``recv_into`` a buffer, one byte back per message).
  ``x raw TCP`` = pushes/s over the floor's messages/s.
* ``sync``: a ``mode="sync"`` job of W worker processes (pull the weights, push a gradient) per
  path, against the data-parallel alternative with the same processes and sizes: torch's gloo
  ``all_reduce`` of the gradient (mean) and a local ``torch.optim.Adamax`` step (DDP-style).
  ``x gloo`` = our step time over gloo's. Needs torch (``pip install torch``); without it the
  gloo rows say so.
* ``tls``: one worker pushing and pulling 40 MB over the bulk channel with TLS, plain bulk TCP,
  and gRPC with TLS. ``x plain bulk`` = plain bulk time over this path's time (throughput ratio).

No timings are asserted anywhere; the figures depend on the machine and its load (the load
average is recorded with the results).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MB, SpawnedServer, Table, add_output_arguments, child_env  # noqa: E402

PATHS = {"off": "gRPC", "tcp": "bulk TCP", "auto": "shared memory"}

_ASYNC_WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from adamax_client import RemoteAdamax
    target, wid, n, warmup, seconds, bulk = sys.argv[1:7]
    n, warmup, seconds = int(n), int(warmup), float(seconds)
    grad = np.random.default_rng(int(wid)).standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    opt = RemoteAdamax(target, optimizer="async", worker_id=f"w{wid}", learning_rate=1e-4, timeout=600, bulk=bulk)
    if wid == "0":
        opt.build({"w": np.zeros(n, np.float32)})
    else:
        while not opt.built:
            time.sleep(0.05)
    for _ in range(warmup):
        opt.push([grad])
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    count = 0
    while time.perf_counter() - t0 < seconds:
        opt.push([grad])
        count += 1
    print(count, time.perf_counter() - t0, opt.transfer_path, flush=True)
    opt.close()
    """
)

_RAW_RECEIVER = textwrap.dedent(
    """
    import socket, sys, threading
    n, workers = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(workers)
    print(srv.getsockname()[1], flush=True)
    def serve(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(bytearray(n))
        while True:
            got = 0
            while got < n:
                k = conn.recv_into(view[got:])
                if not k:
                    return
                got += k
            conn.sendall(b"k")
    threads = []
    for _ in range(workers):
        conn, _ = srv.accept()
        t = threading.Thread(target=serve, args=(conn,)); t.start(); threads.append(t)
    for t in threads:
        t.join()
    """
)

_RAW_SENDER = textwrap.dedent(
    """
    import os, socket, sys, time
    port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    sock = socket.create_connection(("127.0.0.1", port)); sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(bytearray(os.urandom(1024) * (n // 1024 + 1))[:n])
    for _ in range(3):
        sock.sendall(view); sock.recv(1)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter(); count = 0
    while time.perf_counter() - t0 < seconds:
        sock.sendall(view); sock.recv(1); count += 1
    print(count, time.perf_counter() - t0, "raw", flush=True)
    sock.close()
    """
)

_SYNC_WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    target, job, wid, workers, n, warmup, rounds, bulk = sys.argv[1:9]
    workers, n, warmup, rounds = int(workers), int(n), int(warmup), int(rounds)
    grad = np.random.default_rng(int(wid)).standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    if bulk == "gloo":
        import torch, torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=target, rank=int(wid), world_size=workers)
        param = torch.nn.Parameter(torch.zeros(n))
        opt = torch.optim.Adamax([param], lr=1e-4)
        g = torch.from_numpy(grad.copy())
        def step():  # reduced in place (as DDP's buckets): no copy the baseline would not make
            dist.all_reduce(g)
            param.grad = g.div_(workers)
            opt.step()
        path = "gloo"
    else:
        from adamax_client import RemoteAdamax
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
    if bulk != "gloo":
        opt.pull()  # the last round's weights: the step is complete when they are back
        path = opt.transfer_path
    else:
        dist.barrier()
    print(rounds, time.perf_counter() - t0, path, flush=True)
    if bulk == "gloo":
        dist.destroy_process_group()
    else:
        opt.close()
    """
)


def _run_together(argvs: list[list[str]]) -> list[tuple[int, float, str]]:
    """Start the processes, wait until each says "ready", release them together; (count, s, path)."""
    procs = [subprocess.Popen([sys.executable, "-c", *a], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=child_env()) for a in argvs]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed: {line!r}")
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        out = []
        for p in procs:
            parts = p.stdout.readline().split()  # type: ignore[union-attr]
            if len(parts) != 3:
                raise RuntimeError(f"worker ended without a result: {parts}")
            out.append((int(parts[0]), float(parts[1]), parts[2]))
        for p in procs:
            p.wait(120)
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
        import torch.distributed as dist

        return dist.is_available() and dist.is_gloo_available()
    except Exception:
        return False


# ---------------------------------------------------------------- async


def raw_rate(nbytes: int, workers: int, seconds: float) -> float:
    receiver = subprocess.Popen([sys.executable, "-c", _RAW_RECEIVER, str(nbytes), str(workers)],
                                stdout=subprocess.PIPE, text=True)
    try:
        port = receiver.stdout.readline().strip()  # type: ignore[union-attr]
        results = _run_together([[_RAW_SENDER, port, str(nbytes), str(seconds)] for _ in range(workers)])
        return sum(c / s for c, s, _ in results)
    finally:
        receiver.wait(30)


def measure_async(table: Table, n: int, workers: int, seconds: float, paths: list[str]) -> None:
    """Each path is measured between two runs of the floor; its ratio is over their mean, so a
    change of the machine's load during the run moves both sides alike."""
    floor = raw_rate(4 * n, workers, seconds)
    table.add(part="async", params=n, workers=workers, path="raw TCP (floor)", value=floor, unit="msgs/s",
              ratio=1.0, ratio_is="x raw TCP", load=_load())
    for bulk in paths:
        with SpawnedServer(["--max-threads", str(8 + 4 * workers)]) as srv:
            argvs = [[_ASYNC_WORKER, srv.target, str(i), str(n), "5", str(seconds), bulk] for i in range(workers)]
            results = _run_together(argvs)  # worker 0 builds; the others wait until it has
        want = {"off": "grpc", "auto": "shm"}.get(bulk, bulk)
        if any(r[2] != want for r in results):
            raise RuntimeError(f"asked for bulk={bulk!r}, workers used {[r[2] for r in results]}")
        rate = sum(c / s for c, s, _ in results)
        after = raw_rate(4 * n, workers, seconds)
        table.add(part="async", params=n, workers=workers, path=PATHS[bulk], value=rate, unit="pushes/s",
                  ratio=rate / ((floor + after) / 2), ratio_is="x raw TCP (mean of the floor runs before and after)",
                  load=_load())
        table.add(part="async", params=n, workers=workers, path="raw TCP (floor)", value=after, unit="msgs/s",
                  ratio=1.0, ratio_is="x raw TCP", load=_load())
        floor = after


# ---------------------------------------------------------------- sync


def _sync_step(target: str, job: str, workers: int, n: int, warmup: int, rounds: int, bulk: str) -> float:
    results = _run_together([[_SYNC_WORKER, target, job, str(i), str(workers), str(n), str(warmup), str(rounds), bulk]
                             for i in range(workers)])
    want = {"off": "grpc", "auto": "shm"}.get(bulk, bulk)
    if any(r[2] != want for r in results):
        raise RuntimeError(f"asked for {bulk!r}, workers used {[r[2] for r in results]}")
    return max(s for _, s, _ in results) / rounds


def measure_sync(table: Table, sizes: list[int], worker_counts: list[int], quick: bool, paths: list[str]) -> None:
    torch_ok = _have_torch()
    if not torch_ok:
        table.notes.append("sync: torch is not installed (pip install torch), so the gloo DDP-style rows are missing")
    for n in sizes:
        rounds = 3 if quick else max(5, min(20, int(2e8 // (4 * n * max(worker_counts)))))
        warmup = 1 if quick else 2
        for w in worker_counts:
            gloo = float("nan")
            if torch_ok:
                with tempfile.TemporaryDirectory() as tmp:
                    init = "file://" + str(Path(tmp) / "rendezvous")
                    gloo = _sync_step(init, "gloo", w, n, warmup, rounds, "gloo")
                table.add(part="sync", params=n, workers=w, path="gloo all_reduce + torch Adamax", value=gloo * 1e3,
                          unit="ms/step", ratio=1.0, ratio_is="x gloo", load=_load())
            for bulk in paths:
                with SpawnedServer(["--max-threads", str(8 + 4 * w)]) as srv:
                    t = _sync_step(srv.target, f"s{n}-{w}", w, n, warmup, rounds, bulk)
                table.add(part="sync", params=n, workers=w, path=PATHS[bulk], value=t * 1e3, unit="ms/step",
                          ratio=t / gloo, ratio_is="x gloo", load=_load())


# ---------------------------------------------------------------- TLS


def _pki(directory: Path) -> dict[str, str]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
        "-subj", "/CN=bench-ca", "-days", "1", "-out", "ca.pem")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key",
        "-subj", "/CN=localhost", "-out", "server.csr")
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "server.ext", "-out", "server.pem")
    return {k: str(directory / f) for k, f in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


def measure_tls(table: Table, nbytes: int, repeats: int) -> None:
    import numpy as np
    from adamax_client import RemoteAdamax, tls_channel_credentials

    import shutil

    if shutil.which("openssl") is None:
        table.notes.append("tls: the openssl command is needed to make the benchmark's certificates; rows missing")
        return
    n = nbytes // 4
    grad = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        pki = _pki(Path(tmp))
        tls_args = ["--tls-cert", pki["cert"], "--tls-key", pki["key"]]
        # All three clients stay connected and take turns, one push + pull each per round, so
        # they see the same load; the figure is each one's median.
        plain, secure = SpawnedServer([]), SpawnedServer(tls_args)
        try:
            cases = [("plain bulk TCP", plain, "tcp", None), ("TLS bulk TCP", secure, "tcp", pki["ca"]),
                     ("TLS gRPC", secure, "off", pki["ca"])]
            clients = []
            for label, srv, bulk, ca in cases:
                opt = RemoteAdamax(srv.target, optimizer=f"tls-{bulk}", worker_id="w0", learning_rate=1e-4,
                                   timeout=600, bulk=bulk, credentials=tls_channel_credentials(ca) if ca else None)
                opt.build({"w": np.zeros(n, np.float32)})
                for _ in range(2):
                    opt.push([grad])
                    opt.pull()
                assert opt.transfer_path == {"off": "grpc"}.get(bulk, bulk)
                clients.append((label, opt, []))
            for _ in range(repeats):
                for _, opt, times in clients:
                    t0 = time.perf_counter()
                    opt.push([grad])
                    opt.pull()
                    times.append(time.perf_counter() - t0)
            base = None
            for label, opt, times in clients:
                opt.close()
                t = sorted(times)[len(times) // 2]
                base = base or t
                table.add(part="tls", params=n, workers=1, path=label, value=2 * nbytes / t / MB,
                          unit="MB/s (push+pull)", ratio=base / t, ratio_is="x plain bulk", load=_load())
        finally:
            plain.stop()
            secure.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["async", "sync", "tls"], default=["async", "sync", "tls"])
    ap.add_argument("--async-params", type=float, default=1e6)
    ap.add_argument("--async-workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per async path")
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 5e7], help="sync sizes")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="sync worker counts")
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    ap.add_argument("--tls-mb", type=float, default=40.0)
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    table = Table(f"Data path, {os.cpu_count()} cores, 127.0.0.1: async pushes vs raw TCP, sync step vs gloo, TLS bulk",
                  ["part", "params", "workers", "path", "value", "unit", "ratio", "ratio_is", "load"])
    if "async" in args.parts:
        n = 10_000 if args.quick else int(args.async_params)
        measure_async(table, n, 2 if args.quick else args.async_workers, 0.5 if args.quick else args.seconds,
                      args.paths)
    if "sync" in args.parts:
        sizes = [10_000] if args.quick else [int(p) for p in args.params]
        measure_sync(table, sizes, [2] if args.quick else args.workers, args.quick, args.paths)
    if "tls" in args.parts:
        measure_tls(table, int((0.4 if args.quick else args.tls_mb) * MB), 3 if args.quick else 7)
    table.notes.append("load = the 1, 5 and 15 minute load averages when the row was measured (shared machine)")
    print(table.format(), flush=True)
    if args.json:
        table.write_json(args.json, argv=sys.argv[1:] if argv is None else list(argv))
    if args.png:
        table.write_png(args.png, ["part", "params", "workers", "path"], "ratio", "ratio (see ratio_is)", log=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
