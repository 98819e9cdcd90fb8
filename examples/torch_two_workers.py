"""Two PyTorch workers train one model through adamax-ps: the optimizer is the only change.

    pip install -e '.[demo,torch]'
    python examples/torch_two_workers.py                      # starts a server on 127.0.0.1
    python examples/torch_two_workers.py --target HOST:50051  # or uses yours (adamax-ps serve)

Each worker trains on its half of every batch of the digits data (scikit-learn, bundled); in
sync mode the server averages the two gradients and applies one Keras Adamax step, so the run
equals one process training on whole batches. Gradients leave in buckets while backward runs.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp

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


def worker(rank: int, target: str, epochs: int, batch: int) -> None:
    import torch

    from adamax_client.torch import RemoteAdamax

    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in digits())
    torch.manual_seed(0)  # same initial weights everywhere (the first worker's are kept anyway)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    opt = RemoteAdamax(
        model.named_parameters(), target=target, optimizer="digits-torch", worker_id=f"worker-{rank}",
        mode="sync", num_workers=WORKERS, learning_rate=0.01,
    )
    share = batch // WORKERS
    for epoch in range(epochs):
        for start in range(0, len(x_train) - batch + 1, batch):
            rows = slice(start + rank * share, start + (rank + 1) * share)  # my half of the batch
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[rows]), y_train[rows])
            loss.backward()
            opt.step()
        if rank == 0:
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}  test accuracy {accuracy:.4f}  "
                  f"(server iterations {opt.iterations}, via {opt.remote.transfer_path})", flush=True)
    opt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="host:port of a running server (default: start one here)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with local_server() if args.target is None else contextlib.nullcontext(args.target) as target:
        procs = [ctx.Process(target=worker, args=(r, target, args.epochs, args.batch)) for r in range(WORKERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit("a worker failed")


if __name__ == "__main__":
    main()
