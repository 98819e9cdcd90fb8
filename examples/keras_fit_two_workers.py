"""Two Keras 3 workers run ``model.fit`` (jit on) through adamax-ps: the optimizer is the only change.

    pip install -e '.[demo]'                                   # keras + jax
    python examples/keras_fit_two_workers.py                   # starts a server on 127.0.0.1
    python examples/keras_fit_two_workers.py --target HOST:50051 --backend torch

Each worker fits on its half of every batch of the digits data (scikit-learn, bundled); in sync
mode the server averages the two gradients and applies one Keras Adamax step, so both workers
end with the weights one local ``model.fit`` on whole batches would reach. A ModelCheckpoint
file of worker 0 holds the server's optimizer state and resumes the job exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os

from _local_server import local_server

WORKERS = 2


def digits():
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.75 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def my_half_of_every_batch(x, y, rank: int, batch: int):
    import numpy as np

    share = batch // WORKERS
    rows = np.concatenate(
        [np.arange(start + rank * share, start + (rank + 1) * share) for start in range(0, len(x) - batch + 1, batch)]
    )
    return x[rows], y[rows]


def worker(rank: int, target: str, backend: str, epochs: int, batch: int, out_dir: str) -> None:
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import keras

    from adamax_client.keras import RemoteAdamax

    x_train, y_train, x_test, y_test = digits()
    x, y = my_half_of_every_batch(x_train, y_train, rank, batch)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(
        optimizer=RemoteAdamax(target=target, optimizer="digits-keras", worker_id=f"worker-{rank}",
                               mode="sync", num_workers=WORKERS, learning_rate=0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = [keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "digits.keras"))] if rank == 0 else []
    model.fit(x, y, batch_size=batch // WORKERS, epochs=epochs, shuffle=False, verbose=2 if rank == 0 else 0,
              callbacks=callbacks)
    if rank == 0:
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        print(f"test accuracy {accuracy:.4f} after {int(model.optimizer.iterations)} server steps "
              f"(jit_compile={model.jit_compile}, backend {backend})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="host:port of a running server (default: start one here)")
    parser.add_argument("--backend", default="jax", choices=["jax", "torch"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out-dir", default=".", help="where worker 0 writes digits.keras")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with local_server() if args.target is None else contextlib.nullcontext(args.target) as target:
        procs = [
            ctx.Process(target=worker, args=(r, target, args.backend, args.epochs, args.batch, args.out_dir))
            for r in range(WORKERS)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit("a worker failed")


if __name__ == "__main__":
    main()
