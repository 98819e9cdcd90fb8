"""State and config interchange with a real ``keras.optimizers.Adamax``.

A store written by ``save_own_variables`` on one side loads into the other and both continue
identically; configs round-trip both ways (schedules included); ``variables``, ``set_weights``,
``iterations``, ``learning_rate``, ``stateless_apply``, ``assign*`` and ``add_variable*`` behave
as Keras's do.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import keras
import numpy as np
import pytest
from keras_oracle import OraclePair, assert_same_array, keras_variables, schedule_pair

from adamax_server import Adamax
from adamax_server.optim import schedules as our_schedules


def make_values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense": rng.standard_normal((4, 3)).astype(np.float32),
        "bias": rng.standard_normal(3).astype(np.float32),
        "big": rng.standard_normal(300).astype(np.float32),
        "scalar": np.float32(0.5) * np.ones((), np.float32),
    }


def gradients(values: dict[str, np.ndarray], steps: int, seed: int = 7) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{n: rng.standard_normal(v.shape).astype(v.dtype) for n, v in values.items()} for _ in range(steps)]


STORE_CONFIGS = {
    "float_lr": dict(kwargs={}, lr=0.02),
    "schedule_lr": dict(kwargs={}, lr=("ExponentialDecay", dict(initial_learning_rate=0.02, decay_steps=2, decay_rate=0.7))),
    "ema": dict(kwargs=dict(use_ema=True, ema_overwrite_frequency=3), lr=0.02),
    "accumulation": dict(kwargs=dict(gradient_accumulation_steps=3), lr=0.02),
    "accumulation_ema_schedule": dict(
        kwargs=dict(gradient_accumulation_steps=2, use_ema=True, ema_overwrite_frequency=2, clipnorm=1.0),
        lr=("CosineDecayRestarts", dict(initial_learning_rate=0.02, first_decay_steps=2)),
    ),
}


def _pair(config: dict[str, Any], backend: str, values: dict[str, np.ndarray]) -> OraclePair:
    lr = config["lr"]
    if isinstance(lr, tuple):
        keras_lr, our_lr = schedule_pair(*lr)
    else:
        keras_lr = our_lr = lr
    return OraclePair(values, backend, kwargs=config["kwargs"], keras_lr=keras_lr, ours_lr=our_lr)


@pytest.mark.parametrize("config", list(STORE_CONFIGS.values()), ids=list(STORE_CONFIGS))
@pytest.mark.parametrize("direction", ["ours_to_keras", "keras_to_ours"])
def test_store_interchange(config: dict[str, Any], direction: str, engine_backend: str) -> None:
    values = make_values()
    grads = gradients(values, 9)
    pair = _pair(config, engine_backend, values)
    # Run only one side for 4 steps (one not a multiple of the accumulation steps) ...
    for g in grads[:4]:
        if direction == "ours_to_keras":
            pair.ours.apply([g[n] for n in values])
        else:
            pair.keras.apply([g[n] for n in values])
    # ... then hand its state (store + model variables) to the other side.
    if direction == "ours_to_keras":
        store = pair.our_store()
        pair.keras.load_own_variables(store)
        for name, value in pair.ours.trainable_variables.items():
            pair.kvars[name].assign(value)
    else:
        store = pair.keras_store()
        pair.ours.load_own_variables(store)
        for name, kv in pair.kvars.items():
            pair.ours.assign(name, kv.numpy())
    pair.check("after the store moved")
    for g in grads[4:]:
        pair.apply(g)


def test_store_round_trip_through_a_fresh_engine(engine_backend: str) -> None:
    values = make_values()
    first = Adamax(learning_rate=0.02, use_ema=True, gradient_accumulation_steps=2, device=engine_backend)
    first.build(values)
    for g in gradients(values, 5):
        first.apply(g)
    store: dict[str, Any] = {}
    first.save_own_variables(store)
    second = Adamax(learning_rate=0.5, use_ema=True, gradient_accumulation_steps=2, device=engine_backend)
    second.build(first.trainable_variables)
    second.load_own_variables(store)
    assert second.iterations == first.iterations
    again: dict[str, Any] = {}
    second.save_own_variables(again)
    assert list(again) == list(store)
    for key in store:
        assert_same_array(again[key], store[key], "reference", key)  # a copy is always exact


# ---------------------------------------------------------------------- config
CONFIG_KWARGS = {
    "default": {},
    "everything": dict(
        learning_rate=0.25,
        beta_1=0.8,
        beta_2=0.95,
        epsilon=1e-5,
        weight_decay=0.01,
        clipnorm=2.0,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=4,
        loss_scale_factor=16.0,
        gradient_accumulation_steps=3,
    ),
    "global_clipnorm": dict(global_clipnorm=1.5),
    "clipvalue": dict(clipvalue=0.1),
}
CONFIG_SCHEDULES = {
    "ExponentialDecay": dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.9, staircase=True),
    "PiecewiseConstantDecay": dict(boundaries=[5, 10], values=[0.1, 0.05, 0.01]),
    "PolynomialDecay": dict(initial_learning_rate=0.1, decay_steps=20, cycle=True),
    "InverseTimeDecay": dict(initial_learning_rate=0.1, decay_steps=5, decay_rate=0.5),
    "CosineDecay": dict(initial_learning_rate=0.0, decay_steps=20, warmup_target=0.1, warmup_steps=5),
    "CosineDecayRestarts": dict(initial_learning_rate=0.1, first_decay_steps=5, t_mul=1.0),
}


def _config_pairs():
    for key, kwargs in CONFIG_KWARGS.items():
        yield pytest.param(kwargs, kwargs, id=key)
    for class_name, sched_kwargs in CONFIG_SCHEDULES.items():
        keras_schedule, our_schedule = schedule_pair(class_name, sched_kwargs)
        yield pytest.param(
            dict(learning_rate=keras_schedule, use_ema=True),
            dict(learning_rate=our_schedule, use_ema=True),
            id=f"schedule_{class_name}",
        )


@pytest.mark.parametrize(("keras_kwargs", "our_kwargs"), list(_config_pairs()))
def test_get_config_equals_keras_and_round_trips(keras_kwargs: dict, our_kwargs: dict) -> None:
    ours = Adamax(name="cfg", device="reference", **our_kwargs)
    theirs = keras.optimizers.Adamax(name="cfg", **keras_kwargs)
    assert ours.get_config() == theirs.get_config()

    # Keras accepts our config ...
    rebuilt = keras.optimizers.Adamax.from_config(copy.deepcopy(ours.get_config()))
    assert rebuilt.get_config() == theirs.get_config()
    # ... and we accept Keras's, serialized schedules included.
    ours_again = Adamax.from_config(copy.deepcopy(theirs.get_config()), device="reference")
    assert ours_again.get_config() == theirs.get_config()
    if isinstance(our_kwargs.get("learning_rate"), our_schedules.LearningRateSchedule):
        assert type(ours_again._learning_rate) is type(our_kwargs["learning_rate"])  # noqa: SLF001


def test_keras_schedule_object_is_converted() -> None:
    keras_schedule, _ = schedule_pair("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=7))
    ours = Adamax(learning_rate=keras_schedule, name="x", device="reference")
    assert ours.get_config() == keras.optimizers.Adamax(learning_rate=keras_schedule, name="x").get_config()


def test_auto_names_follow_keras_pattern() -> None:
    names = [Adamax(device="reference").name for _ in range(3)]
    assert all(n == "adamax" or n.startswith("adamax_") for n in names)
    assert len(set(names)) == 3


# ---------------------------------------------------------------------- variables, weights
def test_variables_order_and_names_match_keras(engine_backend: str) -> None:
    values = make_values()
    for kwargs, lr in [
        ({}, 0.01),
        (dict(use_ema=True, gradient_accumulation_steps=2), 0.01),
        (dict(use_ema=True), "schedule"),
    ]:
        keras_lr, our_lr = (
            schedule_pair("InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=5, decay_rate=0.5))
            if lr == "schedule"
            else (lr, lr)
        )
        pair = OraclePair(values, engine_backend, kwargs=kwargs, keras_lr=keras_lr, ours_lr=our_lr)
        assert list(pair.ours.variables) == [v.name for v in pair.keras.variables]
        assert ("learning_rate" in pair.ours.variables) == (lr != "schedule")


def test_set_weights_takes_keras_weights(engine_backend: str) -> None:
    values = make_values()
    pair = OraclePair(values, engine_backend, kwargs=dict(use_ema=True), keras_lr=0.03)
    for g in gradients(values, 3):
        pair.keras.apply([g[n] for n in values])
    pair.ours.set_weights([v.numpy() for v in pair.keras.variables])
    for name, kv in pair.kvars.items():
        pair.ours.assign(name, kv.numpy())
    pair.check("after set_weights")
    for g in gradients(values, 3, seed=9):
        pair.apply(g)


def test_iterations_with_accumulation_match_keras(engine_backend: str) -> None:
    values = make_values()
    pair = OraclePair(values, engine_backend, kwargs=dict(gradient_accumulation_steps=3), keras_lr=0.01)
    for k, g in enumerate(gradients(values, 7)):
        returned = pair.ours.apply_gradients([(g[n], n) for n in values])
        pair.keras.apply_gradients([(g[n], pair.kvars[n]) for n in values])
        assert returned == k + 1 == int(pair.keras._iterations.numpy())  # noqa: SLF001
        assert pair.ours.iterations == (k + 1) // 3 == int(np.asarray(pair.keras.iterations))
        pair.check(f"step {k + 1}")


def test_learning_rate_getter_evaluates_schedule_at_raw_step(engine_backend: str) -> None:
    values = make_values()
    keras_lr, our_lr = schedule_pair("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=1, decay_rate=0.5))
    pair = OraclePair(values, engine_backend, kwargs=dict(gradient_accumulation_steps=2), keras_lr=keras_lr, ours_lr=our_lr)
    for g in gradients(values, 5):
        expected = np.asarray(pair.keras.learning_rate)
        assert_same_array(np.asarray(pair.ours.learning_rate), expected, "reference", "learning_rate")
        pair.apply(g)


def test_learning_rate_getter_float_is_float32_variable_value() -> None:
    ours = Adamax(learning_rate=0.1, device="reference")
    theirs = keras.optimizers.Adamax(learning_rate=0.1)
    assert_same_array(np.asarray(ours.learning_rate), np.asarray(theirs.learning_rate), "reference", "lr")
    ours.learning_rate = 0.3
    theirs.learning_rate = 0.3
    assert_same_array(np.asarray(ours.learning_rate), np.asarray(theirs.learning_rate), "reference", "lr")


def _load_warnings(opt: Any, store: dict) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_own_variables(store)
    return [str(w.message) for w in caught]


def test_load_with_wrong_count_warns_like_keras_and_changes_nothing(engine_backend: str) -> None:
    values = make_values()
    pair = OraclePair(values, engine_backend, kwargs=dict(use_ema=True), keras_lr=0.01)
    pair.apply(gradients(values, 1)[0])
    bad_store = {str(i): np.zeros(()) for i in range(3)}
    before = pair.our_store()
    ours = _load_warnings(pair.ours, bad_store)
    theirs = _load_warnings(pair.keras, bad_store)
    assert ours == theirs and len(ours) == 1 and "Skipping variable loading" in ours[0]
    after = pair.our_store()
    for key in before:
        assert_same_array(after[key], before[key], "reference", key)
    pair.check("after the skipped load")


def test_load_before_build_warning_text_matches_keras() -> None:
    ours = Adamax(learning_rate=0.01, name="unbuilt", device="reference")
    theirs = keras.optimizers.Adamax(learning_rate=0.01, name="unbuilt")
    assert _load_warnings(ours, {"0": 1}) == _load_warnings(theirs, {"0": 1})


# ---------------------------------------------------------------------- stateless_apply
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(use_ema=True, ema_overwrite_frequency=2), dict(gradient_accumulation_steps=2, global_clipnorm=0.5)],
    ids=["plain", "ema", "accumulation"],
)
def test_stateless_apply_matches_keras_and_leaves_state(kwargs: dict, engine_backend: str) -> None:
    values = make_values()
    pair = OraclePair(values, engine_backend, kwargs=kwargs, keras_lr=0.05)
    steps = gradients(values, 6)
    for g in steps[:3]:
        pair.apply(g)
    opt_values = [v.numpy() for v in pair.keras.variables]
    model_values = [v.numpy() * np.float32(1.5) for v in pair.kvars.values()]
    grads = [steps[3][n] for n in values]
    before = pair.our_store()
    before_w = pair.ours.trainable_variables

    new_w, new_opt = pair.ours.stateless_apply(opt_values, grads, model_values)
    keras_w, keras_opt = pair.keras.stateless_apply(opt_values, grads, model_values)

    assert len(new_w) == len(keras_w) and len(new_opt) == len(keras_opt)
    for k, (a, e) in enumerate(zip(new_w, keras_w)):
        assert_same_array(a, np.asarray(e), engine_backend, f"trainable {k}")
    for k, (a, e) in enumerate(zip(new_opt, keras_opt)):
        assert_same_array(a, np.asarray(e), engine_backend, f"optimizer variable {k}")
    after = pair.our_store()
    for key in before:
        assert_same_array(after[key], before[key], "reference", f"store[{key}] untouched")
    for name, value in pair.ours.trainable_variables.items():
        assert_same_array(value, before_w[name], "reference", f"{name} untouched")
    pair.check("after stateless_apply")  # Keras's state is untouched too
    for g in steps[4:]:
        pair.apply(g)


def test_stateless_apply_equals_apply(engine_backend: str) -> None:
    values = make_values()
    opt = Adamax(learning_rate=0.05, use_ema=True, device=engine_backend)
    opt.build(values)
    g = gradients(values, 1)[0]
    store: dict[str, Any] = {}
    opt.save_own_variables(store)
    new_w, new_opt = opt.stateless_apply([store[str(i)] for i in range(len(store))], [g[n] for n in values], list(values.values()))
    opt.apply(g)
    for a, e in zip(new_w, opt.trainable_variables.values()):
        assert_same_array(a, e, "reference", "trainable")
    for a, e in zip(new_opt, opt.variables.values()):
        assert_same_array(a, e, "reference", "optimizer")


# ---------------------------------------------------------------------- assign, add_variable
def test_assign_ops_match_keras(engine_backend: str) -> None:
    values = make_values()
    pair = OraclePair(values, engine_backend, kwargs=dict(use_ema=True), keras_lr=0.01)
    pair.apply(gradients(values, 1)[0])
    kopt = {v.name: v for v in pair.keras.variables}
    three = np.full(3, 0.25, np.float32)
    ops = [
        ("assign", "bias", three),
        ("assign_add", "bias", three),
        ("assign_sub", "dense", np.ones((4, 3), np.float32)),
        ("assign", "bias_momentum", three),
        ("assign_add", "big_norm", np.full(300, 2.0, np.float32)),
        ("assign_sub", "scalar_average", np.float32(0.125)),
        ("assign", "learning_rate", np.float32(0.05)),
        ("assign_add", "iteration", np.int32(2)),
    ]
    for method, name, value in ops:
        target = pair.kvars[name] if name in pair.kvars else kopt[name]
        getattr(pair.keras, method)(target, value)
        getattr(pair.ours, method)(name, value)
        pair.check(f"{method}({name})")
    for g in gradients(values, 3, seed=11):
        pair.apply(g)


def test_add_variable_and_from_reference_follow_keras_order(engine_backend: str) -> None:
    values = make_values()
    pair = OraclePair(values, engine_backend, kwargs=dict(gradient_accumulation_steps=2), keras_lr=0.01)
    pair.keras.add_variable((2, 3), initializer="ones", dtype="float32", name="extra")
    pair.ours.add_variable((2, 3), initializer="ones", dtype="float32", name="extra")
    pair.keras.add_variable_from_reference(pair.kvars["dense"], name="slot")
    assert pair.ours.add_variable_from_reference("dense", name="slot") == "dense_slot"
    pair.keras.add_variable_from_reference(pair.kvars["scalar"])
    assert pair.ours.add_variable_from_reference("scalar") == "scalar_var"
    pair.check("after add_variable")
    for g in gradients(values, 3):
        pair.apply(g)
    pair.keras.assign(pair.keras.variables[-2], np.full((4, 3), 7.0, np.float32))
    pair.ours.assign("dense_slot", np.full((4, 3), 7.0, np.float32))
    pair.check("after assigning an added variable")


def test_unnamed_added_variables_are_addressable() -> None:
    ours = Adamax(device="reference")
    ours.build({"a": np.ones(2, np.float32)})
    first = ours.add_variable((2,))
    second = ours.add_variable((2,))
    assert first != second
    ours.assign("variable_1", np.full(2, 5.0, np.float32))
    np.testing.assert_array_equal(ours.variables["variable_1"], [5.0, 5.0])


def test_keras_variables_helper_keeps_names_and_dtypes() -> None:
    kv = keras_variables({"x": np.zeros(2, np.float64)})
    assert kv["x"].name == "x" and kv["x"].dtype == "float64"
