"""The main job: train a small real model through adamax-ps and compare with local Keras Adamax.

A two-layer MLP (64 -> 64 -> 10, ReLU, softmax cross-entropy) on scikit-learn's bundled digits
data set (1797 8x8 images; nothing is downloaded).

* ``--mode server`` (default): starts an adamax-ps server on 127.0.0.1 (port 0) and ``--workers``
  worker processes (spawned, never forked). Each worker is plain Keras 3: ``model.compile(
  optimizer=adamax_client.keras.RemoteAdamax(...))`` then ``model.fit`` (jit on, JAX backend by
  default) on its share of every batch. In sync mode the server averages the workers' gradients
  and applies one Keras Adamax step per batch, so the run equals a local ``model.fit`` with
  ``keras.optimizers.Adamax`` on whole batches, which runs next for comparison.
* ``--mode inprocess``: the in-process engine, gradients computed in NumPy by hand, against a
  local ``keras.optimizers.Adamax`` fed the same gradients.
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
def share_of_batches(x: np.ndarray, y: np.ndarray, rank: int, workers: int, batch: int):
    """Worker ``rank``'s rows of every whole batch (the batches of a local fit, split in order)."""
    share = batch // workers
    rows = np.concatenate([np.arange(s + rank * share, s + (rank + 1) * share) for s in range(0, len(x) - batch + 1, batch)])
    return x[rows], y[rows]


def _keras_model(keras):
    keras.utils.set_random_seed(0)  # same initial weights in every process
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(HIDDEN, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])  # fmt: skip


def _fit_process(rank: int | None, job: dict, result_queue) -> None:
    """A Keras worker (``rank``) fitting through adamax-ps, or (None) the local Keras reference."""
    os.environ["KERAS_BACKEND"] = job["backend"]
    # One intra-op thread per worker: the workers and the server share this host's cores.
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    warnings.simplefilter("ignore")
    import keras

    xtr, ytr, xte, yte = load_digits_split()
    model = _keras_model(keras)
    if rank is None:
        batch = job["batch"]
        usable = len(xtr) // batch * batch
        x, y = xtr[:usable], ytr[:usable]
        optimizer = keras.optimizers.Adamax(learning_rate=job["lr"])
    else:
        from adamax_client.keras import RemoteAdamax

        batch = job["batch"] // job["workers"]
        x, y = share_of_batches(xtr, ytr, rank, job["workers"], job["batch"])
        optimizer = RemoteAdamax(
            target=job["target"], optimizer="digits", worker_id=f"worker-{rank}", mode="sync",
            num_workers=job["workers"], learning_rate=job["lr"],
        )  # fmt: skip
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=job["epochs"], shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    if rank == 0:
        losses = ", ".join(f"{v:.3f}" for v in history.history["loss"])
        print(f"  worker-0 loss per epoch: {losses}", flush=True)
    _, test_accuracy = model.evaluate(xte, yte, verbose=0)
    result_queue.put({
        "rank": rank, "accuracy": float(test_accuracy), "steps": int(model.optimizer.iterations),
        "seconds": seconds, "jit": bool(model.jit_compile), "weights": [np.asarray(w) for w in model.get_weights()],
    })  # fmt: skip


def run_distributed(args, data) -> tuple[dict, dict]:
    from adamax_server.transport.server import create_server, stop_server

    if args.batch % args.workers:
        raise SystemExit(f"--batch ({args.batch}) must be a multiple of --workers ({args.workers})")
    server, port = create_server("127.0.0.1:0", device=args.device)
    server.start()
    target = f"127.0.0.1:{port}"
    print(f"adamax-ps server listening on {target}; {args.workers} workers, sync mode, Keras "
          f"model.fit with adamax_client.keras.RemoteAdamax ({args.backend} backend)")
    job = {"target": target, "workers": args.workers, "batch": args.batch, "epochs": args.epochs,
           "lr": args.lr, "backend": args.backend}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    try:
        procs = [ctx.Process(target=_fit_process, args=(r, job, q)) for r in range(args.workers)]
        for p in procs:
            p.start()
        results = sorted((q.get(timeout=900) for _ in procs), key=lambda r: r["rank"])
        for p in procs:
            p.join(timeout=60)
    finally:
        stop_server(server, grace=2)
    local = ctx.Process(target=_fit_process, args=(None, job, q))
    local.start()
    reference = q.get(timeout=900)
    local.join(timeout=60)
    ours = results[0]
    ours["max_weight_difference"] = max(
        float(np.max(np.abs(a - b))) for r in results for a, b in zip(r["weights"], reference["weights"])
    )
    return ours, reference


def run_demo(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adamax-ps demo", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["server", "inprocess"], default="server")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--backend", default="jax", choices=["jax", "torch"],
                    help="the Keras backend of the workers (server mode)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                    help="where the server keeps the optimizer state")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    data = load_digits_split()
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, MLP 64-{HIDDEN}-10, "
          f"batch {args.batch}, {args.epochs} epochs, Adamax(learning_rate={args.lr})")

    if args.mode == "server":
        ours, reference = run_distributed(args, data)
        print(f"adamax-ps server, {args.workers} sync workers (model.fit, jit_compile={ours['jit']}): "
              f"test accuracy {ours['accuracy']:.4f} after {ours['steps']} steps ({ours['seconds']:.1f} s)")
        print(f"keras.optimizers.Adamax (local model.fit, same data, batches and initial weights): "
              f"test accuracy {reference['accuracy']:.4f} after {reference['steps']} steps "
              f"({reference['seconds']:.1f} s)")
        print(f"largest difference between the two runs' weights: {ours['max_weight_difference']:.2g}")
        return 0

    from adamax_server.optim.engine import Adamax

    opt = Adamax(learning_rate=args.lr, device=args.device)
    params = init_params()
    opt.build(params)
    t0 = time.perf_counter()
    params, losses = train_local(lambda g: (opt.apply(g), opt.trainable_variables)[1], params, data, args)
    print(f"adamax-ps (in-process engine): test accuracy {accuracy(params, data[2], data[3]):.4f} after "
          f"{opt.iterations} steps ({time.perf_counter() - t0:.1f} s)")
    ref = keras_baseline(data, args)
    if ref is None:
        print("keras.optimizers.Adamax: not installed (pip install 'adamax-ps[demo]')")
    else:
        print(f"keras.optimizers.Adamax (local, same data and initial weights): test accuracy {ref:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
