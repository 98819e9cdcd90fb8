"""Apply inside the server while pushes arrive: does receiving overlap with applying?

    python benchmarks/bench_overlap.py [--params 1e7] [--seconds 2] [--json o.json] [--png o.png]
    adamax-ps bench overlap --quick

This process plays the server: a gRPC server (benchmark-only raw-bytes service, in-process,
gRPC's own threads) receives streamed float32 gradients from a spawned sender process while
a thread runs ``Adamax.apply`` (numba, ``nogil=True``) on the same number of parameters.
Three phases, each about ``--seconds`` long, measured in one run:

* receive alone, apply alone, both at once;
* a control where the "apply" is Python bytecode of the same duration (it holds the GIL).

``overlap`` = (alone_recv + alone_apply - together) / min(alone_recv, alone_apply): 1.0 means
the shorter one was completely hidden, 0 means they ran one after the other.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Table, add_output_arguments, child_env  # noqa: E402

_SENDER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from _bytes_service import BytesClient
    target, nbytes, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = memoryview(np.ones(nbytes // 4, np.float32)).cast("B")
    client = BytesClient(target)
    client.push_stream(data, chunk)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        count = int(line)
        if count <= 0:
            break
        t0 = time.perf_counter()
        for _ in range(count):
            client.push_stream(data, chunk)
        print(time.perf_counter() - t0, flush=True)
    """
)


class Sender:
    def __init__(self, target: str, nbytes: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SENDER, target, str(nbytes), str(2 << 20)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def start(self, count: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()

    def wait(self) -> float:
        assert self.proc.stdout is not None
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("0\n")
        self.proc.stdin.close()
        self.proc.wait(30)


def _python_busy(seconds: float) -> None:
    """Bytecode that holds the GIL for about ``seconds``."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        for i in range(1000):
            x += i


def measure(n: int, seconds: float) -> Table:
    from _bytes_service import serve

    from adamax_server import Adamax

    nbytes = n * 4
    server, port = serve(nbytes)
    server.start()
    sender = Sender(f"127.0.0.1:{port}", nbytes)
    try:
        engine = Adamax(learning_rate=1e-6, device="cpu")
        engine.build({"w": np.zeros(n, np.float32)})
        grad = np.full(n, 1e-3, np.float32)
        engine.apply([grad])  # compile / warm up
        t0 = time.perf_counter()
        engine.apply([grad])
        apply_one = time.perf_counter() - t0
        sender.start(1)
        recv_one = sender.wait()
        applies = max(1, math.ceil(seconds / apply_one))
        pushes = max(1, math.ceil(seconds / recv_one))

        def run_applies() -> None:
            for _ in range(applies):
                engine.apply([grad])

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def together(work) -> tuple[float, float]:
            t = time.perf_counter()
            worker = threading.Thread(target=work)
            worker.start()
            sender.start(pushes)
            recv = sender.wait()
            worker.join()
            return time.perf_counter() - t, recv

        sender.start(pushes)
        recv_alone = sender.wait()
        apply_alone = timed(run_applies)
        both, recv_during = together(run_applies)
        # One numba thread leaves the second core to the receiving threads.
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            apply1_alone = timed(run_applies)
            both1, recv_during1 = together(run_applies)
        finally:
            numba.set_num_threads(threads)
        busy_alone = timed(lambda: _python_busy(apply_alone))
        both_busy, recv_during_busy = together(lambda: _python_busy(apply_alone))
    finally:
        sender.close()
        server.stop(0)

    table = Table(f"Overlap in the server process: receive {pushes} x {nbytes / 1e6:.0f} MB gradients while "
                  f"applying {applies} steps on {n:.0e} params ({os.cpu_count()} cores)",
                  ["work beside receiving", "recv_alone_s", "work_alone_s", "serial_sum_s", "together_s",
                   "recv_during_s", "overlap"])
    for label, work_alone, tog, recv_d in ((f"Adamax.apply (numba nogil, {threads} threads)", apply_alone, both,
                                             recv_during),
                                            ("Adamax.apply (numba nogil, 1 thread)", apply1_alone, both1,
                                             recv_during1),
                                            ("Python bytecode (holds GIL)", busy_alone, both_busy, recv_during_busy)):
        serial = recv_alone + work_alone
        table.add(**{"work beside receiving": label, "recv_alone_s": recv_alone, "work_alone_s": work_alone,
                     "serial_sum_s": serial, "together_s": tog, "recv_during_s": recv_d,
                     "overlap": (serial - tog) / min(recv_alone, work_alone)})
    table.notes.append("overlap = (recv_alone + work_alone - together) / min(recv_alone, work_alone); "
                       "1 = the shorter is fully hidden, 0 = serial")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e7)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each phase")
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    n, seconds = (int(2e5), 0.2) if args.quick else (int(args.params), args.seconds)
    table = measure(n, seconds)
    print(table.format(), flush=True)
    if args.json:
        table.write_json(args.json)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [r["work beside receiving"] for r in table.rows]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [r["serial_sum_s"] for r in table.rows], 0.4, label="receive + work, one after the other")
        ax.bar(x + 0.2, [r["together_s"] for r in table.rows], 0.4, label="at the same time")
        ax.set_xticks(x, labels)
        ax.set_ylabel("seconds")
        ax.set_title("Receiving gradients while applying", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
