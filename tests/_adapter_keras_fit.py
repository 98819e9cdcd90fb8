"""Run by tests/fidelity/test_adapter_keras.py in a subprocess whose KERAS_BACKEND is jax or torch.

``python _adapter_keras_fit.py TARGET WORKDIR JIT`` trains the same model twice, with a local
``keras.optimizers.Adamax`` and with ``adamax_client.keras.RemoteAdamax`` (same seed, same
batches, same callbacks), then resumes the remote run from a ``ModelCheckpoint`` file on a job
it deleted first, and prints one JSON line of measurements for the test to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

from adamax_client.keras import RemoteAdamax, variable_names

ADAMAX_ARGS = {"learning_rate": 0.01, "clipnorm": 1.0, "beta_1": 0.8}
EPOCHS = 3


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 10)).astype("float32")
    y = (x[:, :4].argmax(axis=1) + (x[:, 4] > 1)).astype("int64") % 4
    return x, y


def make_model() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)]
    )


def halve_after_first(epoch: int, lr: float) -> float:
    return lr * 0.5 if epoch >= 1 else lr


def loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))) for u, v in zip(a, b))


def main() -> None:
    target, workdir, jit = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    x, y = data()
    fit_args = {"batch_size": 16, "shuffle": False, "verbose": 0}
    out: dict = {"backend": keras.backend.backend()}

    local = make_model()
    local.compile(optimizer=keras.optimizers.Adamax(**ADAMAX_ARGS), loss=loss(), jit_compile=jit)
    local.fit(x, y, epochs=EPOCHS, callbacks=[keras.callbacks.LearningRateScheduler(halve_after_first)], **fit_args)

    model = make_model()
    opt = RemoteAdamax(target=target, optimizer="fit_job", mode="sync", num_workers=1, **ADAMAX_ARGS)
    model.compile(optimizer=opt, loss=loss(), jit_compile=jit)
    checkpoint = keras.callbacks.ModelCheckpoint(str(workdir / "ckpt-{epoch}.keras"))
    model.fit(
        x, y, epochs=EPOCHS,
        callbacks=[keras.callbacks.LearningRateScheduler(halve_after_first), checkpoint], **fit_args,
    )  # fmt: skip
    out["jit_compile"] = bool(model.jit_compile)
    out["names"] = [s[0] for s in opt.remote.variable_specs]
    out["expected_names"] = variable_names(model.trainable_variables)
    out["fit_max_diff"] = max_diff(model.get_weights(), local.get_weights())
    out["iterations"] = [int(opt.iterations), int(local.optimizer.iterations), opt.remote.status()["iterations"]]
    out["learning_rate"] = [float(opt.learning_rate), float(local.optimizer.learning_rate), float(opt.remote.learning_rate)]
    ours_store: dict = {}
    local_store: dict = {}
    opt.save_own_variables(ours_store)
    local.optimizer.save_own_variables(local_store)
    out["store_keys"] = [sorted(ours_store), sorted(local_store)]
    out["store_max_diff"] = max_diff([ours_store[k] for k in sorted(local_store)], [local_store[k] for k in sorted(local_store)])
    reference = [np.array(w) for w in model.get_weights()]

    # Resume from the epoch-2 checkpoint on a job that no longer exists: the file holds it all.
    out["deleted"] = opt.delete()
    restored = keras.models.load_model(workdir / f"ckpt-{EPOCHS - 1}.keras")
    out["restored_type"] = type(restored.optimizer).__name__
    out["restored_iterations"] = int(restored.optimizer.iterations)
    restored.fit(
        x, y, epochs=EPOCHS, initial_epoch=EPOCHS - 1,
        callbacks=[keras.callbacks.LearningRateScheduler(halve_after_first)], **fit_args,
    )  # fmt: skip
    out["resume_max_diff"] = max_diff(restored.get_weights(), reference)
    out["resume_iterations"] = int(restored.optimizer.iterations)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
