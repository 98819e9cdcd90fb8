"""``RemoteAdamax.save_own_variables`` / ``load_own_variables`` against a real ``keras.optimizers.Adamax``.

For every option that changes the store (float or schedule learning rate, EMA, gradient
accumulation): run one side, move its store and model variables to the other, continue both
with the same gradients, and compare bit for bit.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest
from _ps_helpers import running_server
from keras_oracle import assert_same_array, keras_variables, schedule_pair

from adamax_client import RemoteAdamax

VALUES = {
    "dense": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3),
    "bias": np.full(3, 0.1, np.float32),
    "wide": np.linspace(0, 2, 300, dtype=np.float32),
}
CONFIGS = {
    "float_lr": dict(kwargs={}, lr=0.02),
    "schedule_lr": dict(kwargs={}, lr=("ExponentialDecay", dict(initial_learning_rate=0.02, decay_steps=2, decay_rate=0.7))),
    "ema": dict(kwargs=dict(use_ema=True, ema_overwrite_frequency=3), lr=0.02),
    "accumulation": dict(kwargs=dict(gradient_accumulation_steps=3), lr=0.02),
    "everything": dict(
        kwargs=dict(gradient_accumulation_steps=2, use_ema=True, ema_overwrite_frequency=2, clipnorm=1.0),
        lr=("CosineDecayRestarts", dict(initial_learning_rate=0.02, first_decay_steps=2)),
    ),
}


def gradients(steps: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(3)
    return [[rng.standard_normal(v.shape).astype(v.dtype) for v in VALUES.values()] for _ in range(steps)]


def _compare(remote: RemoteAdamax, kopt: Any, kvars: dict[str, Any], what: str) -> None:
    for name, value in remote.pull(min_version=0).items():
        assert_same_array(value, kvars[name].numpy(), "numba", f"{what}: {name}")
    ours: dict[str, Any] = {}
    remote.save_own_variables(ours)
    theirs: dict[str, Any] = {}
    kopt.save_own_variables(theirs)
    assert list(ours) == list(theirs), what
    for key in theirs:
        assert_same_array(ours[key], np.asarray(theirs[key]), "numba", f"{what}: store[{key}]")


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("direction", ["remote_to_keras", "keras_to_remote"])
def test_store_moves_between_remote_and_keras(config: dict[str, Any], direction: str) -> None:
    lr = config["lr"]
    keras_lr, our_lr = schedule_pair(*lr) if isinstance(lr, tuple) else (lr, lr)
    grads = gradients(9)
    kvars = keras_variables(VALUES)
    kopt = keras.optimizers.Adamax(learning_rate=keras_lr, name="kx", **config["kwargs"])
    kopt.build(list(kvars.values()))
    with running_server() as (target, _):
        with RemoteAdamax(target, name="kx", learning_rate=our_lr, **config["kwargs"]) as remote:
            remote.build(VALUES)
            for g in grads[:4]:  # 4 steps on one side only (not a multiple of the accumulation)
                if direction == "remote_to_keras":
                    remote.apply(g)
                else:
                    kopt.apply(g, list(kvars.values()))
            if direction == "remote_to_keras":
                store: dict[str, Any] = {}
                remote.save_own_variables(store)
                kopt.load_own_variables(store)
                for name, value in remote.pull().items():
                    kvars[name].assign(value)
            else:
                store = {}
                kopt.save_own_variables(store)
                remote.load_own_variables({k: np.asarray(v) for k, v in store.items()})
                for name, kv in kvars.items():
                    remote.assign(name, kv.numpy())
            _compare(remote, kopt, kvars, "after the store moved")
            for step, g in enumerate(grads[4:]):
                remote.apply(g)
                kopt.apply(g, list(kvars.values()))
                _compare(remote, kopt, kvars, f"step {step} after the move")
