"""``update_step(gradient, variable, learning_rate)``: Keras's per-variable update, exactly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from adamax_server import Adamax  # noqa: E402


def _same(a: np.ndarray, b: np.ndarray, backend: str) -> None:
    if backend == "gpu":
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, {"use_ema": True, "weight_decay": 0.1}, {"gradient_accumulation_steps": 2}])
def test_update_step_matches_keras_between_applies(engine_backend: str, kwargs: dict) -> None:
    rng = np.random.default_rng(0)
    init = {"a": rng.standard_normal((5, 3)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    kvars = [keras.Variable(v.copy(), name=k) for k, v in init.items()]
    theirs = keras.optimizers.Adamax(**kwargs)
    theirs.build(kvars)
    ours = Adamax(device=engine_backend, **kwargs)
    ours.build({k: v.copy() for k, v in init.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            grads = [rng.standard_normal(v.shape).astype(np.float32) for v in init.values()]
            theirs.apply(grads)
            ours.apply(grads)
            g = rng.standard_normal(init["a"].shape).astype(np.float32)
            theirs.update_step(g, kvars[0], 0.05)
            ours.update_step(g, "a", 0.05)
    assert ours.iterations == int(theirs.iterations)
    for var, name in zip(kvars, init):
        _same(ours.trainable_variables[name], var.numpy(), engine_backend)
    store_k: dict = {}
    store_o: dict = {}
    theirs.save_own_variables(store_k)
    ours.save_own_variables(store_o)
    for key in store_k:
        _same(store_o[key], store_k[key], engine_backend)


def test_update_step_validates_its_inputs() -> None:
    opt = Adamax(device="reference")
    opt.build({"a": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="Unknown variable"):
        opt.update_step(np.zeros(3, np.float32), "nope", 0.1)
    with pytest.raises(ValueError, match="has shape"):
        opt.update_step(np.zeros(4, np.float32), "a", 0.1)
