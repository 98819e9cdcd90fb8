"""The main job: train a small real model through adamax-ps and compare with local Keras Adamax.

A two-layer MLP (64 -> 64 -> 10, ReLU, softmax cross-entropy) on scikit-learn's bundled digits
data set (1797 8x8 images; nothing is downloaded). Gradients are computed in NumPy by hand.

* ``--mode server`` (default): starts an adamax-ps server on 127.0.0.1 (port 0) and ``--workers``
  worker processes (spawned, never forked). In sync mode each step, every worker computes the
  gradient of its shard of the batch and pushes it; the server averages the K pushes and applies
  one Keras Adamax step; workers pull the new weights.
* ``--mode inprocess``: the same training with the in-process engine.

Both end with the test accuracy next to a local ``keras.optimizers.Adamax`` run on the same data,
batches and initial weights (when keras is installed).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np

HIDDEN = 64


def load_digits_split(seed: int = 0):
    """Standardised digits, 75/25 train/test split, fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.75 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense_kernel": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
        "dense_bias": np.zeros(HIDDEN, np.float32),
        "out_kernel": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(1 / HIDDEN)).astype(np.float32),
        "out_bias": np.zeros(10, np.float32),
    }


def forward(params: Mapping[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(x @ params["dense_kernel"] + params["dense_bias"], 0)
    return h, h @ params["out_kernel"] + params["out_bias"]


def loss_and_grads(params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Mean softmax cross-entropy over the batch and its gradients."""
    h, logits = forward(params, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    d = p
    d[np.arange(n), y] -= 1
    d /= n
    grads = {
        "out_kernel": h.T @ d,
        "out_bias": d.sum(axis=0),
    }
    dh = (d @ params["out_kernel"].T) * (h > 0)
    grads["dense_kernel"] = x.T @ dh
    grads["dense_bias"] = dh.sum(axis=0)
    return loss, {k: grads[k].astype(np.float32) for k in params}


def accuracy(params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((forward(params, x)[1].argmax(axis=1) == y).mean())


def batches(n: int, batch: int, epochs: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for k in range(0, n - batch + 1, batch):
            yield order[k : k + batch]


def train_local(step: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], params, data, args):
    """Single-process loop: ``step(grads) -> new params``."""
    xtr, ytr, _, _ = data
    losses = []
    for i, idx in enumerate(batches(len(xtr), args.batch, args.epochs)):
        loss, g = loss_and_grads(params, xtr[idx], ytr[idx])
        params = step(g)
        losses.append(loss)
    return params, losses


def keras_baseline(data, args) -> float | None:
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    try:
        import keras
    except Exception:
        return None
    params = init_params()
    names = list(params)
    kvars = [keras.Variable(params[k], name=k) for k in names]
    opt = keras.optimizers.Adamax(learning_rate=args.lr)
    opt.build(kvars)

    def step(g):
        opt.apply([g[k] for k in names])
        return {k: v.numpy() for k, v in zip(names, kvars)}

    params, _ = train_local(step, params, data, args)
    return accuracy(params, data[2], data[3])


# ---------------------------------------------------------------------- distributed mode
def _worker(rank: int, target: str, args_dict: dict, result_queue) -> None:
    """One training worker: computes the gradient of its shard of each batch and pushes it."""
    warnings.simplefilter("ignore")
    from adamax_client import RemoteAdamax

    data = load_digits_split()
    xtr, ytr = data[0], data[1]
    n_workers = args_dict["workers"]
    # Same job config as the chief: creating an existing optimizer with it attaches.
    opt = RemoteAdamax(
        target, worker_id=f"worker-{rank}", optimizer=args_dict["job"], mode="sync",
        num_workers=n_workers, learning_rate=args_dict["lr"],
    )  # fmt: skip
    opt.attach()
    last_loss = float("nan")
    for i, idx in enumerate(batches(len(xtr), args_dict["batch"], args_dict["epochs"])):
        params = opt.pull()
        shard = np.array_split(idx, n_workers)[rank]
        last_loss, g = loss_and_grads(params, xtr[shard], ytr[shard])
        # The mean of shard gradients equals the batch gradient when shards are equal-sized;
        # np.array_split keeps them within one row of each other.
        opt.apply(g)
        if rank == 0 and i % 50 == 0:
            print(f"  step {i:4d}  worker-0 shard loss {last_loss:.4f}", flush=True)
    result_queue.put((rank, last_loss))
    opt.close()


def run_distributed(args, data) -> dict[str, float]:
    from adamax_client import RemoteAdamax

    from adamax_server.transport.server import create_server, stop_server

    server, port = create_server("127.0.0.1:0", device=args.device)
    server.start()
    target = f"127.0.0.1:{port}"
    print(f"adamax-ps server listening on {target}; {args.workers} workers, sync mode")
    try:
        params = init_params()
        chief = RemoteAdamax(
            target, optimizer="digits", worker_id="chief", mode="sync",
            num_workers=args.workers, learning_rate=args.lr,
        )  # fmt: skip
        chief.build(params)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        job = {"job": "digits", "workers": args.workers, "batch": args.batch,
               "epochs": args.epochs, "lr": args.lr}
        procs = [ctx.Process(target=_worker, args=(r, target, job, q)) for r in range(args.workers)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [q.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        elapsed = time.perf_counter() - t0
        final = chief.pull()
        steps = chief.iterations
        chief.close()
    finally:
        stop_server(server, grace=2)
    if sorted(r for r, _ in results) != list(range(args.workers)):
        raise RuntimeError(f"workers reported {results}")
    return {
        "accuracy": accuracy(final, data[2], data[3]),
        "steps": steps,
        "seconds": elapsed,
    }


def run_demo(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adamax-ps demo", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["server", "inprocess"], default="server")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                    help="where the server keeps the optimizer state")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    data = load_digits_split()
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, MLP 64-{HIDDEN}-10, "
          f"batch {args.batch}, {args.epochs} epochs, Adamax(learning_rate={args.lr})")

    if args.mode == "inprocess":
        from adamax_server.optim.engine import Adamax

        opt = Adamax(learning_rate=args.lr, device=args.device)
        params = init_params()
        opt.build(params)
        t0 = time.perf_counter()
        params, losses = train_local(lambda g: (opt.apply(g), opt.trainable_variables)[1], params, data, args)
        ours = {"accuracy": accuracy(params, data[2], data[3]), "steps": opt.iterations,
                "seconds": time.perf_counter() - t0}
        label = "adamax-ps (in-process engine)"
    else:
        ours = run_distributed(args, data)
        label = f"adamax-ps server, {args.workers} sync workers"
    print(f"{label}: test accuracy {ours['accuracy']:.4f} after {ours['steps']} steps "
          f"({ours['seconds']:.1f} s)")
    ref = keras_baseline(data, args)
    if ref is None:
        print("keras.optimizers.Adamax: not installed (pip install 'adamax-ps[demo]')")
    else:
        print(f"keras.optimizers.Adamax (local, same data and initial weights): test accuracy {ref:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
