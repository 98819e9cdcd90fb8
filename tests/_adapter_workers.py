"""Worker processes for tests/integration/test_adapter_workers.py (multiprocessing spawn).

Only the client package (and the framework) is imported, as on a real worker machine. Keras
workers choose their backend before importing keras, so this module imports neither at the top.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("client", "wire"):
    if (_ROOT / _sub).is_dir() and str(_ROOT / _sub) not in sys.path:
        sys.path.insert(0, str(_ROOT / _sub))


# ---------------------------------------------------------------------- torch

def torch_net(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def torch_batches(rank: int, steps: int, n: int = 16):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def torch_worker(target: str, job: str, rank: int, steps: int, kwargs: dict) -> dict:
    """Train ``steps`` steps through the torch adapter; returns gradients and weights per step."""
    import torch

    from adamax_client.torch import RemoteAdamax

    torch.set_num_threads(1)
    model = torch_net()
    log: dict = {"grads": [], "weights": [], "outcomes": [], "paths": set()}
    with RemoteAdamax(model.named_parameters(), target, optimizer=job, worker_id=f"w{rank}", **kwargs) as opt:
        for x, y in torch_batches(rank, steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            log["grads"].append([p.grad.numpy().copy() for p in model.parameters()])
            opt.step()
            log["outcomes"].append(opt.last_result.outcome)
            log["weights"].append([p.detach().numpy().copy() for p in model.parameters()])
            log["paths"].add(opt.remote.transfer_path)
        log["iterations"] = opt.remote.status()["iterations"]
    return log


# ---------------------------------------------------------------------- keras

def keras_shards(rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Worker ``rank``'s half of the data; None: both halves interleaved batch by batch (8 + 8)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((96, 10)).astype("float32")
    y = (x[:, :4].argmax(axis=1)).astype("int64")
    halves = [(x[:48], y[:48]), (x[48:], y[48:])]
    if rank is not None:
        return halves[rank]
    xs, ys = [], []
    for i in range(0, 48, 8):
        for hx, hy in halves:
            xs.append(hx[i : i + 8])
            ys.append(hy[i : i + 8])
    return np.concatenate(xs), np.concatenate(ys)


def keras_model():
    import keras

    keras.utils.set_random_seed(3)
    # Named layers: a pool process builds several models, and Keras's automatic names
    # (dense, dense_1, ...) count per process.
    return keras.Sequential([
        keras.Input((10,)), keras.layers.Dense(16, activation="relu", name="hidden"), keras.layers.Dense(4, name="out"),
    ])  # fmt: skip


def keras_worker(target: str, job: str, rank: int, backend: str, kwargs: dict) -> list[np.ndarray]:
    """``model.fit`` (jit on) on this worker's shard through the Keras adapter; final weights."""
    os.environ["KERAS_BACKEND"] = backend
    import keras

    from adamax_client.keras import RemoteAdamax

    x, y = keras_shards(rank)
    model = keras_model()
    model.compile(
        optimizer=RemoteAdamax(target=target, optimizer=job, worker_id=f"w{rank}", threads=None, **kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def keras_local_fit(backend: str, learning_rate: float) -> list[np.ndarray]:
    """The reference: a local Adamax fit on both shards, each batch the two workers' batches."""
    os.environ["KERAS_BACKEND"] = backend
    import keras

    x, y = keras_shards(None)
    model = keras_model()
    model.compile(
        optimizer=keras.optimizers.Adamax(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]
