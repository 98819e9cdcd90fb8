"""Error inputs, as data: what the engine rejects, with which exception and message.

Constructor arguments are checked against Keras: where Keras raises for the same kwargs, we raise
the same type with the same message (and where Keras accepts, we accept). Engine call errors are
``(setup, call, exception, regex)`` rows; every rejected call must leave all state (store, model
variables, iterations) bitwise unchanged.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest
from keras_oracle import keras_variables, schedule_pair

from adamax_server import Adamax, RowSparseGradient

# ---------------------------------------------------------------------- constructor
ONLY_ONE_CLIP = r"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set"
LR_TYPE = r"Argument `learning_rate` should be float, or an instance of LearningRateSchedule"

# (id, kwargs, exception type, regex)
CONSTRUCTOR_ERRORS = [
    ("clipnorm_and_clipvalue", dict(clipnorm=1.0, clipvalue=1.0), ValueError, ONLY_ONE_CLIP),
    ("clipnorm_and_global", dict(clipnorm=1.0, global_clipnorm=1.0), ValueError, ONLY_ONE_CLIP),
    ("clipvalue_and_global", dict(clipvalue=1.0, global_clipnorm=1.0), ValueError, ONLY_ONE_CLIP),
    ("all_three_clips", dict(clipnorm=1.0, clipvalue=1.0, global_clipnorm=1.0), ValueError, ONLY_ONE_CLIP),
    ("accumulation_1", dict(gradient_accumulation_steps=1), ValueError, r"`gradient_accumulation_steps` must be an integer >= 2"),
    ("accumulation_negative", dict(gradient_accumulation_steps=-3), ValueError, r"Received: gradient_accumulation_steps=-3"),
    ("ema_momentum_above_1", dict(use_ema=True, ema_momentum=1.5), ValueError, r"`ema_momentum` must be in the range \[0, 1\]"),
    ("ema_momentum_negative", dict(use_ema=True, ema_momentum=-0.01), ValueError, r"Received: ema_momentum=-0.01"),
    ("ema_frequency_float", dict(use_ema=True, ema_overwrite_frequency=2.5), ValueError, r"`ema_overwrite_frequency` must be an integer >= 1 or None"),
    ("ema_frequency_negative", dict(use_ema=True, ema_overwrite_frequency=-1), ValueError, r"Received: ema_overwrite_frequency=-1"),
    ("ema_frequency_string", dict(use_ema=True, ema_overwrite_frequency="3"), ValueError, r"`ema_overwrite_frequency` must be"),
    ("lr_int", dict(learning_rate=1), ValueError, LR_TYPE),
    ("lr_string", dict(learning_rate="0.1"), ValueError, LR_TYPE + r".*Received instead: learning_rate=0.1"),
    ("lr_numpy_float32", dict(learning_rate=np.float32(0.1)), ValueError, LR_TYPE),
    ("lr_none", dict(learning_rate=None), ValueError, LR_TYPE),
    ("unknown_kwarg", dict(foo=1), ValueError, r"Argument\(s\) not recognized: \{'foo': 1\}"),
    ("unknown_kwargs_with_decay", dict(decay=0.1, bar=2), ValueError, r"Argument\(s\) not recognized: \{'bar': 2\}"),
]

# Accepted by Keras, so accepted here too (Keras checks these only loosely).
CONSTRUCTOR_ACCEPTED = [
    ("ema_frequency_zero", dict(use_ema=True, ema_overwrite_frequency=0)),
    ("ema_checks_off_without_ema", dict(use_ema=False, ema_momentum=5.0, ema_overwrite_frequency=-1)),
    ("accumulation_zero", dict(gradient_accumulation_steps=0)),
    ("lr_numpy_float64", dict(learning_rate=np.float64(0.1))),
    ("ema_momentum_edges", dict(use_ema=True, ema_momentum=1.0)),
    ("callable_lr", dict(learning_rate=lambda: 0.1)),
]


@pytest.mark.filterwarnings("ignore:Argument `decay` is no longer supported")
@pytest.mark.parametrize(("kwargs", "error", "regex"), [pytest.param(*row[1:], id=row[0]) for row in CONSTRUCTOR_ERRORS])
def test_constructor_rejects_like_keras(kwargs: dict, error: type, regex: str) -> None:
    with pytest.raises(error, match=regex) as ours:
        Adamax(device="reference", **kwargs)
    with pytest.raises(error) as theirs:
        keras.optimizers.Adamax(**kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kwargs", [pytest.param(row[1], id=row[0]) for row in CONSTRUCTOR_ACCEPTED])
def test_constructor_accepts_what_keras_accepts(kwargs: dict) -> None:
    keras.optimizers.Adamax(**kwargs)
    Adamax(device="reference", **kwargs)


def test_decay_kwarg_warns_like_keras() -> None:
    with pytest.warns(UserWarning, match=r"Argument `decay` is no longer supported and will be ignored\.") as ours:
        opt = Adamax(decay=0.5, device="reference")
    with pytest.warns(UserWarning) as theirs:
        keras.optimizers.Adamax(decay=0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert "decay" not in opt.get_config()


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"`device` must be one of"):
        Adamax(device="tpu")


# ---------------------------------------------------------------------- engine calls
F32 = np.float32


def _values() -> dict[str, np.ndarray]:
    return {
        "table": np.arange(12, dtype=F32).reshape(4, 3) / 7,
        "bias": np.linspace(-1, 1, 3, dtype=F32),
        "scalar": np.ones((), F32),
    }


def _good() -> dict[str, np.ndarray]:
    return {n: np.full(v.shape, 0.5, v.dtype) for n, v in _values().items()}


def _built(**kwargs: Any) -> Callable[[str], Adamax]:
    """Setup: a built optimizer that has taken three steps (state is not all zeros)."""

    def make(backend: str) -> Adamax:
        kwargs.setdefault("learning_rate", 0.01)
        opt = Adamax(device=backend, **kwargs)
        opt.build(_values())
        for k in range(3):
            opt.apply({n: g * (k + 1) for n, g in _good().items()})
        return opt

    return make


def _unbuilt(**kwargs: Any) -> Callable[[str], Adamax]:
    return lambda backend: Adamax(device=backend, **kwargs)


def _with(**changes: Any) -> list[Any]:
    """The good gradient list with some entries replaced."""
    g = _good()
    g.update(changes)
    return [g[n] for n in _values()]


FULL = dict(use_ema=True, ema_overwrite_frequency=2, gradient_accumulation_steps=2, clipnorm=1.0, weight_decay=0.1)
SCHEDULED = dict(learning_rate=schedule_pair("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=2, decay_rate=0.5))[1])


@dataclass(frozen=True)
class ErrorCase:
    id: str
    setup: Callable[[str], Adamax]
    call: Callable[[Adamax], Any]
    error: type[BaseException]
    regex: str
    marks: tuple[Any, ...] = ()


ERROR_CASES = [
    ErrorCase("apply_before_build", _unbuilt(), lambda o: o.apply([np.ones(3, F32)]), ValueError, r"must already be built"),
    ErrorCase("apply_mapping_before_build", _unbuilt(), lambda o: o.apply({"bias": np.ones(3, F32)}), ValueError, r"must already be built"),
    ErrorCase("apply_names_before_build", _unbuilt(), lambda o: o.apply([np.ones(3, F32)], ["bias"]), ValueError, r"pass `trainable_variables` as a mapping"),
    ErrorCase("too_few_gradients", _built(), lambda o: o.apply([np.ones((4, 3), F32)]), ValueError, r"Received a list of 1 gradients, but the optimizer is tracking 3"),
    ErrorCase("too_many_gradients", _built(), lambda o: o.apply(_with() + [np.ones(3, F32)]), ValueError, r"one-to-on"),
    ErrorCase("grads_names_length_mismatch", _built(), lambda o: o.apply([np.ones(3, F32)], ["bias", "scalar"]), ValueError, r"Received 1 gradients for 2 variables"),
    ErrorCase("mapping_and_names", _built(), lambda o: o.apply({"bias": np.ones(3, F32)}, ["bias"]), ValueError, r"not both"),
    ErrorCase("unknown_name_mapping", _built(), lambda o: o.apply({"bias": np.ones(3, F32), "nope": np.ones(3, F32)}), KeyError, r"Unknown variable\(s\): \['nope'\]"),
    ErrorCase("unknown_name_list", _built(), lambda o: o.apply([np.ones(3, F32)], ["nope"]), KeyError, r"Unknown variable: 'nope'"),
    ErrorCase("unknown_name_pairs", _built(), lambda o: o.apply_gradients([(np.ones(3, F32), "bias"), (np.ones(3, F32), "nope")]), KeyError, r"'nope'"),
    ErrorCase("wrong_shape", _built(**FULL), lambda o: o.apply(_with(bias=np.ones(4, F32))), ValueError, r"Gradient for variable 'bias' has shape \(4,\), but the variable has shape \(3,\)"),
    ErrorCase("wrong_shape_last", _built(**FULL), lambda o: o.apply(_with(scalar=np.ones(1, F32))), ValueError, r"'scalar' has shape \(1,\)"),
    ErrorCase("transposed_shape", _built(), lambda o: o.apply(_with(table=np.ones((3, 4), F32))), ValueError, r"'table' has shape \(3, 4\)"),
    ErrorCase("int_gradient", _built(**FULL), lambda o: o.apply(_with(bias=np.ones(3, np.int32))), ValueError, r"dtype int32; gradients must be float16, bfloat16, float32 or float64"),
    ErrorCase("bool_gradient", _built(), lambda o: o.apply(_with(bias=np.ones(3, bool))), ValueError, r"dtype bool"),
    ErrorCase("complex_gradient", _built(), lambda o: o.apply(_with(bias=np.ones(3, np.complex64))), ValueError, r"dtype complex64"),
    ErrorCase("object_gradient", _built(), lambda o: o.apply(_with(bias=np.array([1.0, "x", None], dtype=object))), ValueError, r"dtype object"),
    ErrorCase("all_none_list", _built(**FULL), lambda o: o.apply([None, None, None]), ValueError, r"^No gradients provided for any variable\.$"),
    ErrorCase("all_none_mapping", _built(), lambda o: o.apply({"bias": None}), ValueError, r"No gradients provided for any variable"),
    ErrorCase("sparse_index_too_large", _built(**FULL), lambda o: o.apply(_with(table=RowSparseGradient([0, 4], np.ones((2, 3), F32)))), ValueError, r"row indices must be in \[0, 4\)\. Received min=0, max=4"),
    ErrorCase("sparse_index_negative", _built(), lambda o: o.apply(_with(table=RowSparseGradient([-1], np.ones((1, 3), F32)))), ValueError, r"Received min=-1"),
    ErrorCase("sparse_values_shape", _built(), lambda o: o.apply(_with(table=RowSparseGradient([0, 1], np.ones((2, 4), F32)))), ValueError, r"values must have shape \(2, 3\)"),
    ErrorCase("sparse_float_indices", _built(), lambda o: o.apply(_with(table=RowSparseGradient(np.array([0.0]), np.ones((1, 3), F32)))), ValueError, r"indices must be a 1-D integer array"),
    ErrorCase("sparse_2d_indices", _built(), lambda o: o.apply(_with(table=RowSparseGradient(np.zeros((1, 1), np.int64), np.ones((1, 3), F32)))), ValueError, r"1-D integer array"),
    ErrorCase("sparse_on_scalar", _built(), lambda o: o.apply(_with(scalar=RowSparseGradient([0], np.ones(1, F32)))), ValueError, r"Sparse gradient for 'scalar'"),
    ErrorCase("sparse_int_values", _built(), lambda o: o.apply(_with(table=RowSparseGradient([0], np.ones((1, 3), np.int64)))), ValueError, r"dtype int64"),
    ErrorCase("exclude_after_build", _built(weight_decay=0.1), lambda o: o.exclude_from_weight_decay(var_names=["bias"]), ValueError, r"can only be configured before the optimizer is built"),
    ErrorCase("set_lr_with_schedule", _built(**SCHEDULED), lambda o: setattr(o, "learning_rate", 0.5), TypeError, r"created with a `LearningRateSchedule`.*not settable"),
    ErrorCase("set_lr_callable_to_float", _built(learning_rate=lambda: 0.01), lambda o: setattr(o, "learning_rate", 0.5), TypeError, r"callable"),
    ErrorCase("set_weights_before_build", _unbuilt(), lambda o: o.set_weights([np.int32(0)]), ValueError, r"has not yet been built"),
    ErrorCase("set_weights_wrong_shape", _built(**FULL), lambda o: o.set_weights([v[:1] if n == "bias_momentum" else v for n, v in o.variables.items()]), ValueError, r"bias_momentum has shape \(3,\) not compatible with provided weight shape \(1,\)"),
    ErrorCase("set_weights_wrong_scalar", _built(), lambda o: o.set_weights([np.zeros(2, np.int32)]), ValueError, r"Optimizer variable iteration has shape \(\) not compatible"),
    ErrorCase("load_wrong_shape", _built(use_ema=True), lambda o: o.load_own_variables({str(i): np.zeros(7) for i in range(len(o.variables))}), ValueError, r"has shape \(7,\); expected \(\)"),
    ErrorCase("assign_unknown", _built(), lambda o: o.assign("nope", 1.0), KeyError, r"Unknown variable: 'nope'"),
    ErrorCase("assign_wrong_shape", _built(), lambda o: o.assign("bias", np.ones(4, F32)), ValueError, r"variable.shape=\(3,\), Received: value.shape=\(4,\)"),
    ErrorCase("assign_slot_wrong_shape", _built(), lambda o: o.assign_add("bias_momentum", np.ones(2, F32)), ValueError, r"must match|could not be broadcast"),
    ErrorCase("stateless_apply_before_build", _unbuilt(), lambda o: o.stateless_apply([], [], []), ValueError, r"must be built"),
    ErrorCase("stateless_apply_opt_length", _built(), lambda o: o.stateless_apply([0], _with(), list(_values().values())), ValueError, r"Received list with length 1, but expected 8 variables"),
    ErrorCase("stateless_apply_model_length", _built(), lambda o: o.stateless_apply(list(o.variables.values()), _with(), [1]), ValueError, r"len\(trainable_variables\) == 1"),
    ErrorCase("stateless_apply_bad_gradient", _built(**FULL), lambda o: o.stateless_apply(list(o.variables.values()), _with(bias=np.ones(2, F32)), list(_values().values())), ValueError, r"'bias' has shape \(2,\)"),
    ErrorCase("finalize_wrong_count", _built(use_ema=True), lambda o: o.finalize_variable_values(["bias"]), ValueError, r"The length of model variables \(1\) to override does not match"),
    ErrorCase(
        "finalize_unknown",
        _built(use_ema=True),
        lambda o: o.finalize_variable_values(["bias", "table", "nope"]),
        KeyError,
        r"'nope'",
    ),
    ErrorCase("add_variable_from_unknown", _built(), lambda o: o.add_variable_from_reference("nope"), KeyError, r"'nope'"),
    ErrorCase("add_variable_bad_initializer", _built(), lambda o: o.add_variable((2,), initializer="glorot"), ValueError, r"Unknown initializer"),
    ErrorCase("apply_staged_unknown", _built(), lambda o: o.apply_staged(["nope"]), KeyError, r"'nope'"),
    ErrorCase("apply_staged_none_present", _built(), lambda o: o.apply_staged([]), ValueError, r"No gradients provided"),
    ErrorCase("gradient_buffer_unknown", _built(), lambda o: o.gradient_buffer("nope"), KeyError, r"'nope'"),
    ErrorCase("build_int_variable", _unbuilt(), lambda o: o.build({"i": np.ones(3, np.int32)}), ValueError, r"must be float32 or float64"),
    ErrorCase("build_float16_variable", _unbuilt(), lambda o: o.build({"h": np.ones(3, np.float16)}), ValueError, r"must be float32 or float64"),
    ErrorCase("build_non_mapping", _unbuilt(), lambda o: o.build([np.ones(3, F32)]), TypeError, r"ordered mapping"),
    ErrorCase("build_empty_name", _unbuilt(), lambda o: o.build({"": np.ones(3, F32)}), ValueError, r"non-empty strings"),
]


def snapshot(opt: Adamax) -> dict[str, Any]:
    state: dict[str, Any] = {"built": opt.built, "iterations": opt.iterations, "config": opt.get_config()}
    if opt.built:
        store: dict[str, Any] = {}
        opt.save_own_variables(store)
        state["store"] = store
        state["model"] = opt.trainable_variables
        state["names"] = list(opt.variables)
    return state


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in ("built", "iterations", "config", "names"):
        if key in before:
            assert before[key] == after[key], key
    for key in ("store", "model"):
        if key in before:
            assert list(before[key]) == list(after[key])
            for name, value in before[key].items():
                np.testing.assert_array_equal(after[key][name], value, err_msg=f"{key}[{name}]", strict=True)
                assert np.asarray(value).tobytes() == np.asarray(after[key][name]).tobytes(), name


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in ERROR_CASES])
def test_rejected_call_raises_and_changes_nothing(case: ErrorCase, engine_backend: str) -> None:
    opt = case.setup(engine_backend)
    before = snapshot(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-gradient warning of a partial list
        with pytest.raises(case.error, match=case.regex):
            case.call(opt)
    assert_unchanged(before, snapshot(opt))
    if opt.built:  # and the optimizer still works afterwards
        opt.apply(_with())


def test_error_case_ids_are_unique() -> None:
    assert len({c.id for c in ERROR_CASES}) == len(ERROR_CASES)


# ---------------------------------------------------------------------- the same call on Keras
def _keras_built(**kwargs: Any) -> tuple[Any, dict[str, Any]]:
    kvars = keras_variables(_values())
    opt = keras.optimizers.Adamax(**kwargs)
    opt.build(list(kvars.values()))
    return opt, kvars


# (id, our call, Keras call) for situations where Keras raises too: the same type and message.
SAME_AS_KERAS = [
    (
        "apply_before_build",
        lambda: Adamax(device="reference").apply([np.ones(3, F32)]),
        lambda: keras.optimizers.Adamax().apply([np.ones(3, F32)]),
    ),
    (
        "wrong_gradient_count",
        lambda: _built()("reference").apply([np.ones(3, F32)]),
        lambda: _keras_built()[0].apply([np.ones(3, F32)]),
    ),
    (
        "all_none",
        lambda: _built()("reference").apply([None, None, None]),
        lambda: _keras_built()[0].apply([None, None, None]),
    ),
    (
        "set_lr_with_schedule",
        lambda: setattr(_unbuilt(**SCHEDULED)("reference"), "learning_rate", 0.5),
        lambda: setattr(
            keras.optimizers.Adamax(
                learning_rate=schedule_pair("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=2, decay_rate=0.5))[0]
            ),
            "learning_rate",
            0.5,
        ),
    ),
    (
        "set_weights_before_build",
        lambda: Adamax(device="reference").set_weights([np.int32(0)]),
        lambda: keras.optimizers.Adamax().set_weights([np.int32(0)]),
    ),
    (
        "stateless_apply_opt_length",
        lambda: _built()("reference").stateless_apply([0], _with(), list(_values().values())),
        lambda: _keras_built()[0].stateless_apply([0], _with(), list(_values().values())),
    ),
    (
        "finalize_wrong_count",
        lambda: _built(use_ema=True)("reference").finalize_variable_values(["bias"]),
        lambda: _keras_built(use_ema=True)[0].finalize_variable_values([_keras_built()[1]["bias"]]),
    ),
]


@pytest.mark.parametrize(("ours", "theirs"), [pytest.param(o, t, id=i) for i, o, t in SAME_AS_KERAS])
def test_same_error_as_keras(ours: Callable[[], Any], theirs: Callable[[], Any]) -> None:
    with pytest.raises(Exception) as keras_error:
        theirs()
    with pytest.raises(type(keras_error.value)) as our_error:
        ours()
    assert str(our_error.value) == str(keras_error.value)


def test_set_weights_wrong_shape_is_a_value_error_in_keras_too() -> None:
    keras_opt, _ = _keras_built()
    weights = [v.numpy() for v in keras_opt.variables]
    weights[3] = weights[3][:1]
    expected = re.escape("has shape (4, 3) not compatible with provided weight shape (1, 3).")
    with pytest.raises(ValueError, match=expected):
        keras_opt.set_weights(weights)
    ours = _built()("reference")
    with pytest.raises(ValueError, match="Optimizer variable table_norm " + expected):
        ours.set_weights(weights)


def test_keras_accepts_exclude_after_build_but_we_refuse() -> None:
    """A deliberate difference: Keras checks ``self._built`` (never set), so it silently accepts
    exclusions after build and applies them from the next step; the engine fixes its weight
    decay flags at build and refuses."""
    keras_opt, kvars = _keras_built(weight_decay=0.5)
    keras_opt.exclude_from_weight_decay(var_names=["bias"])  # no error in Keras
    ours = _built(weight_decay=0.5)("reference")
    with pytest.raises(ValueError, match="before the optimizer is built"):
        ours.exclude_from_weight_decay(var_names=["bias"])


def test_missing_gradient_warning_names_the_variables_like_keras() -> None:
    keras_opt, _ = _keras_built()
    ours = _built()("reference")
    grads = [np.ones((4, 3), F32), None, None]
    with pytest.warns(UserWarning) as theirs:
        keras_opt.apply(grads)
    with pytest.warns(UserWarning, match=r"Gradients do not exist for variables \['bias', 'scalar'\]") as our_warnings:
        ours.apply(grads)
    assert [str(w.message) for w in our_warnings] == [str(w.message) for w in theirs]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_not_errors(bad: float, engine_backend: str) -> None:
    opt = _built()(engine_backend)
    with np.errstate(all="ignore"):
        opt.apply(_with(bias=np.array([bad, 0.0, 1.0], F32)))
    bias = opt.trainable_variables["bias"]
    assert not np.isfinite(bias[0])  # inf / inf or NaN: the element is lost, as in Keras
    assert np.isfinite(bias[1:]).all()
