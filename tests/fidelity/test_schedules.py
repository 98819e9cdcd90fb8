"""Bitwise parity of adamax_server.optim.schedules with Keras 3's schedules.

Keras runs with its numpy backend (which itself needs ``jax`` installed); the
tests that compare against Keras are skipped when it cannot be imported.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

os.environ["KERAS_BACKEND"] = "numpy"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    from adamax_server.optim import schedules as S
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "server"))
    from adamax_server.optim import schedules as S

MODULE_PATH = Path(S.__file__)

STEPS = list(range(301)) + [
    1000,
    4096,
    10**6,
    10**6 + 1,
    2**24 + 1,
    10**7 + 3,
    2**31 - 1,
]


@pytest.fixture(scope="session")
def keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "numpy":
        pytest.skip(f"keras runs the {keras.backend.backend()!r} backend, not numpy")
    return keras


# (class name, args, kwargs): every configuration is checked against Keras.
CONFIGS = [
    # ExponentialDecay
    ("ExponentialDecay", (0.1, 10, 0.96), {}),
    ("ExponentialDecay", (0.1, 10, 0.96), {"staircase": True}),
    ("ExponentialDecay", (1e-3, 7, 0.5), {"staircase": True}),
    ("ExponentialDecay", (0.05, 1000, 0.9), {}),
    ("ExponentialDecay", (0.1, 2.5, 0.9), {"staircase": True}),
    ("ExponentialDecay", (np.float64(0.01), 20, 0.8), {}),
    ("ExponentialDecay", (np.float16(0.1), 30, 0.9), {}),
    ("ExponentialDecay", (2, 10, 0.5), {}),  # int lr: Keras computes in int32
    # PiecewiseConstantDecay
    ("PiecewiseConstantDecay", ([100, 200], [1.0, 0.5, 0.1]), {}),
    ("PiecewiseConstantDecay", ([10], [0.1, 0.01]), {}),
    ("PiecewiseConstantDecay", ((10, 20, 30), (0.4, 0.3, 0.2, 0.1)), {}),
    ("PiecewiseConstantDecay", ([50.5, 150.7], [1.0, 0.5, 0.25]), {}),
    ("PiecewiseConstantDecay", ([5, 50, 250], [3, 2, 1, 0]), {}),
    ("PiecewiseConstantDecay", ([5, 50], [1.0, 1, 0]), {}),
    ("PiecewiseConstantDecay", ([10, 20], [np.float32(0.1), 0.2, 0.3]), {}),
    ("PiecewiseConstantDecay", ([0, 1000], [0.3, 0.2, 0.1]), {"name": "pw"}),
    # PolynomialDecay
    ("PolynomialDecay", (0.1, 100), {}),
    ("PolynomialDecay", (0.1, 100, 0.01), {"power": 0.5}),
    ("PolynomialDecay", (0.1, 37, 0.001), {"power": 2.0, "cycle": True}),
    ("PolynomialDecay", (1.0, 50, 0.0), {"power": 3.0, "cycle": True}),
    ("PolynomialDecay", (0.5, 64, 0.05), {"power": 1.0, "cycle": False}),
    ("PolynomialDecay", (0.1, 12.5, 0.0), {"power": 1.5, "cycle": True}),
    ("PolynomialDecay", (0.1, 1000), {"name": None}),
    # InverseTimeDecay
    ("InverseTimeDecay", (0.1, 10, 0.5), {}),
    ("InverseTimeDecay", (0.1, 10, 0.5), {"staircase": True}),
    ("InverseTimeDecay", (0.01, 1.0, 0.5), {}),
    ("InverseTimeDecay", (0.2, 33, 2), {"staircase": True}),
    # CosineDecay
    ("CosineDecay", (0.1, 100), {}),
    ("CosineDecay", (0.1, 100), {"alpha": 0.1}),
    ("CosineDecay", (0.1, 1000, 0.01), {}),
    ("CosineDecay", (0.0, 200), {"warmup_target": 1e-3, "warmup_steps": 10}),
    ("CosineDecay", (0.01, 150),
     {"alpha": 0.2, "warmup_target": 0.2, "warmup_steps": 50}),
    ("CosineDecay", (0.1, 100), {"warmup_target": 0.2, "warmup_steps": 0}),
    ("CosineDecay", (0.1, 60, 0.0, "cos"),
     {"warmup_target": 0.05, "warmup_steps": 25.5}),
    ("CosineDecay", (0, 100), {"warmup_target": 0.1, "warmup_steps": 20}),  # int lr
    # alpha=0.33: float32(1 - alpha) != float32(1) - float32(alpha), which
    # pins down where each schedule computes `1 - alpha`.
    ("CosineDecay", (0.1, 90), {"alpha": 0.33}),
    # CosineDecayRestarts
    ("CosineDecayRestarts", (0.1, 20), {}),
    ("CosineDecayRestarts", (0.1, 20), {"t_mul": 1.0, "m_mul": 0.9}),
    ("CosineDecayRestarts", (0.1, 20), {"t_mul": 1.0, "alpha": 0.2}),
    ("CosineDecayRestarts", (0.1, 13), {"t_mul": 1.5, "m_mul": 0.5, "alpha": 0.1}),
    ("CosineDecayRestarts", (1e-3, 7), {"t_mul": 3.0, "m_mul": 0.8}),
    ("CosineDecayRestarts", (0.05, 100), {"t_mul": 2.0, "m_mul": 1.0, "alpha": 0.01}),
    ("CosineDecayRestarts", (0.1, 10), {"t_mul": 0.5}),  # NaN after the series' limit
    ("CosineDecayRestarts", (0.1, 30), {"t_mul": 1.0, "alpha": 0.33}),
]


def _config_id(config) -> str:
    name, args, kwargs = config
    return f"{name}{args!r}{kwargs!r}".replace(" ", "")


@pytest.fixture(params=CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def pair(request, keras):
    """(our schedule, the Keras schedule) for one configuration."""
    name, args, kwargs = request.param
    ours = getattr(S, name)(*args, **kwargs)
    theirs = getattr(keras.optimizers.schedules, name)(*args, **kwargs)
    return ours, theirs


def _callable_keras(schedule):
    """Keras fails at call time on a non-str name or one containing '/'
    (its name_scope); the name has no effect on the numbers, so compare
    against the same schedule with its default name."""
    config = schedule.get_config()
    if isinstance(config["name"], str) and "/" not in config["name"]:
        return schedule
    del config["name"]
    return type(schedule).from_config(config)


def _evaluate(fn, steps):
    with np.errstate(all="ignore"):
        return [np.asarray(fn(step)) for step in steps]


def _assert_bitwise(ours: list[np.ndarray], theirs: list[np.ndarray], steps) -> None:
    assert [a.dtype for a in ours] == [b.dtype for b in theirs]
    assert all(a.shape == () for a in ours)
    for a, b, step in zip(ours, theirs, steps):
        if a.tobytes() != b.tobytes():
            np.testing.assert_array_equal(a, b, err_msg=f"step={step}")
            pytest.fail(f"step={step}: {a!r} and {b!r} differ in their bits")


def _assert_same(ours, theirs, steps=STEPS) -> None:
    """Evaluate both schedules over `steps` and compare bitwise."""
    _assert_bitwise(_evaluate(ours, steps), _evaluate(theirs, steps), steps)


# --------------------------------------------------------------------------
# Numerics.
# --------------------------------------------------------------------------


def test_values_match_keras_bitwise(pair):
    ours, theirs = pair
    _assert_same(ours, _callable_keras(theirs))


@pytest.mark.parametrize(
    "config", CONFIGS[::4], ids=[_config_id(c) for c in CONFIGS[::4]]
)
def test_matches_keras_optimizer_learning_rate(keras, config):
    """What a Keras optimizer reports, with its own `iterations` variable."""
    name, args, kwargs = config
    ours = getattr(S, name)(*args, **kwargs)
    theirs = getattr(keras.optimizers.schedules, name)(*args, **kwargs)
    optimizer = keras.optimizers.Adamax(learning_rate=_callable_keras(theirs))
    steps = [0, 1, 2, 99, 100, 101, 1234, 2**31 - 1]
    expected = []
    for step in steps:
        optimizer.iterations.assign(step)
        with np.errstate(all="ignore"):
            expected.append(np.asarray(optimizer.learning_rate))
    _assert_bitwise(_evaluate(ours, steps), expected, steps)


@pytest.mark.parametrize(
    "step_type",
    [int, np.int64, np.int32, np.uint32, np.uint64, lambda s: np.array(s, np.int64)],
    ids=["int", "int64", "int32", "uint32", "uint64", "0d-array"],
)
def test_step_integer_types_are_equivalent(step_type):
    schedules = [
        S.CosineDecayRestarts(0.1, 20, t_mul=1.5),
        S.PiecewiseConstantDecay([10, 20], [0.3, 0.2, 0.1]),
        S.PolynomialDecay(0.1, 37, cycle=True),
    ]
    for schedule in schedules:
        for step in (0, 9, 10, 11, 20, 21, 123456):
            a = np.asarray(schedule(step))
            b = np.asarray(schedule(step_type(step)))
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bad", [1.0, np.float32(3), True, np.bool_(True), "3", None])
def test_non_integer_step_is_rejected(bad):
    with pytest.raises(TypeError, match="`step` must be an integer"):
        S.ExponentialDecay(0.1, 10, 0.9)(bad)


@pytest.mark.parametrize("name", [None, "a/b"])
def test_name_is_metadata_only(keras, name):
    """Keras raises on call (name_scope) for such names; we just compute."""
    ours = S.PolynomialDecay(0.1, 100, name=name)
    theirs = keras.optimizers.schedules.PolynomialDecay(0.1, 100, name=name)
    with pytest.raises(ValueError, match="Argument `name` must be a string"):
        theirs(5)
    assert ours(5) == keras.optimizers.schedules.PolynomialDecay(0.1, 100)(5)
    assert ours.get_config()["name"] == name


def test_steps_beyond_int32_keep_counting():
    """Keras's int32 counter overflows there; our int64 one does not."""
    schedule = S.PiecewiseConstantDecay([10, 2**31 - 2], [0.3, 0.2, 0.1])
    assert schedule(2**31 - 2) == np.float32(0.2)
    assert schedule(2**31 + 5) == np.float32(0.1)
    assert schedule(2**40) == np.float32(0.1)
    assert S.ExponentialDecay(0.1, 10, 0.9)(2**40) == np.float32(0.0)


def test_known_values_without_keras():
    """A few hand-checked values, so the module is tested without Keras too."""
    f32 = np.float32
    assert S.ExponentialDecay(0.1, 10, 0.5)(10) == f32(0.1) * f32(0.5)
    assert S.ExponentialDecay(0.1, 10, 0.5, staircase=True)(19) == f32(0.05)
    assert S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])(10) == f32(1.0)
    assert S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])(11) == f32(0.5)
    assert S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])(21) == f32(0.1)
    assert S.PolynomialDecay(0.1, 100, 0.01)(100) == f32(0.01)
    assert S.PolynomialDecay(0.1, 100, 0.01)(10**6) == f32(0.01)
    assert S.InverseTimeDecay(0.1, 10, 1.0, staircase=True)(10) == f32(0.05)
    assert S.CosineDecay(0.1, 100)(0) == f32(0.1)
    assert S.CosineDecay(0.1, 100)(100) == f32(0.0)
    assert S.CosineDecay(0.0, 100, warmup_target=0.1, warmup_steps=10)(10) == f32(0.1)
    assert S.CosineDecayRestarts(0.1, 20, t_mul=1.0)(20) == f32(0.1)
    for schedule in (S.ExponentialDecay(0.1, 10, 0.9), S.CosineDecay(0.1, 100)):
        assert np.asarray(schedule(3)).dtype == np.float32


# --------------------------------------------------------------------------
# Config and serialization.
# --------------------------------------------------------------------------


def test_get_config_matches_keras(pair):
    ours, theirs = pair
    assert repr(ours.get_config()) == repr(theirs.get_config())


def test_serialize_matches_keras(pair, keras):
    ours, theirs = pair
    expected = keras.optimizers.schedules.serialize(theirs)
    got = S.serialize(ours)
    assert got == expected
    # Same key order, same value types (tuple vs list, np.float64 vs float...).
    assert repr(got) == repr(expected)


def test_from_config_of_keras_config(pair):
    ours, theirs = pair
    rebuilt = type(ours).from_config(theirs.get_config())
    assert type(rebuilt) is type(ours)
    assert repr(rebuilt.get_config()) == repr(theirs.get_config())
    _assert_same(rebuilt, _callable_keras(theirs), STEPS[::7])


def test_from_keras_object(pair):
    ours, theirs = pair
    converted = S.from_keras_object(theirs)
    assert type(converted) is type(ours)
    assert repr(converted.get_config()) == repr(theirs.get_config())
    _assert_same(converted, _callable_keras(theirs), STEPS[::7])


def test_deserialize_round_trips(pair, keras):
    ours, theirs = pair
    serialized = S.serialize(ours)
    for blob in (
        serialized,
        keras.optimizers.schedules.serialize(theirs),
        {"class_name": serialized["class_name"], "config": serialized["config"]},
    ):
        rebuilt = S.deserialize(blob)
        assert type(rebuilt) is type(ours)
        _assert_same(rebuilt, ours, STEPS[::5])
    # Our serialized form also loads in Keras, and gives the same numbers.
    if "__tensor__" not in repr(serialized):  # Keras leaves those encoded
        back = keras.optimizers.schedules.deserialize(serialized)
        assert type(back).__name__ == type(ours).__name__
        _assert_same(ours, _callable_keras(back), STEPS[::5])


@pytest.mark.parametrize("config", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
def test_json_round_trip(config):
    name, args, kwargs = config
    schedule = getattr(S, name)(*args, **kwargs)
    blob = json.loads(json.dumps(S.serialize(schedule), default=float))
    rebuilt = S.deserialize(blob)
    assert type(rebuilt) is type(schedule)
    assert set(rebuilt.get_config()) == set(schedule.get_config())
    steps = STEPS[::5]
    if not any(isinstance(a, np.generic) and a.dtype != np.float32 for a in args):
        _assert_same(rebuilt, schedule, steps)


def test_tensor_values_are_encoded_and_decoded():
    schedule = S.PiecewiseConstantDecay([10, 20], [np.float32(0.1), 0.2, 0.3])
    blob = S.serialize(schedule)
    assert blob["config"]["values"][0] == {
        "class_name": "__tensor__",
        "config": {"value": float(np.float32(0.1)), "dtype": "float32"},
    }
    rebuilt = S.deserialize(blob)
    value = rebuilt.get_config()["values"][0]
    assert isinstance(value, np.ndarray) and value.dtype == np.float32
    assert rebuilt(3) == schedule(3)


def test_legacy_config_with_defaults():
    schedule = S.deserialize(
        {
            "class_name": "PolynomialDecay",
            "config": {"initial_learning_rate": 0.1, "decay_steps": 10},
        }
    )
    assert schedule.get_config() == {
        "initial_learning_rate": 0.1,
        "decay_steps": 10,
        "end_learning_rate": 0.0001,
        "power": 1.0,
        "cycle": False,
        "name": "PolynomialDecay",
    }


@pytest.mark.parametrize(
    "name,args,default",
    [
        ("ExponentialDecay", (0.1, 10, 0.5), "ExponentialDecay"),
        ("PiecewiseConstantDecay", ([1], [0.1, 0.2]), "PiecewiseConstant"),
        ("PolynomialDecay", (0.1, 10), "PolynomialDecay"),
        ("InverseTimeDecay", (0.1, 10, 0.5), "InverseTimeDecay"),
        ("CosineDecay", (0.1, 10), "CosineDecay"),
        ("CosineDecayRestarts", (0.1, 10), "SGDRDecay"),
    ],
)
def test_default_names(name, args, default):
    assert getattr(S, name)(*args).name == default


def test_keras_constructor_signatures_match(keras):
    import inspect

    for name in S.SUPPORTED_SCHEDULES:
        ours = inspect.signature(getattr(S, name).__init__)
        theirs = inspect.signature(getattr(keras.optimizers.schedules, name).__init__)
        assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == [
            (p.name, p.default, p.kind) for p in theirs.parameters.values()
        ]


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------

ERRORS = [
    ("ExponentialDecay", (0.1, 0, 0.9), {}, ValueError,
     "Argument `decay_steps` must be > 0. Received: decay_steps=0"),
    ("ExponentialDecay", (0.1, -3, 0.9), {"staircase": True}, ValueError,
     "Argument `decay_steps` must be > 0. Received: decay_steps=-3"),
    ("ExponentialDecay", (0.1, None, 0.9), {}, TypeError, "'<=' not supported"),
    ("PolynomialDecay", (0.1, 0), {}, ValueError,
     "Argument `decay_steps` must be > 0. Received: decay_steps=0"),
    ("InverseTimeDecay", (0.1, 0.0, 0.5), {}, ValueError,
     "Argument `decay_steps` must be > 0. Received: decay_steps=0.0"),
    ("CosineDecay", (0.1, -1), {"warmup_target": 0.2, "warmup_steps": 5}, ValueError,
     "Argument `decay_steps` must be > 0. Received: decay_steps=-1"),
    ("CosineDecayRestarts", (0.1, 0), {}, ValueError,
     "Argument `first_decay_steps` must be > 0. Received: first_decay_steps=0"),
    ("PiecewiseConstantDecay", ([10, 20], [1.0, 0.5]), {}, ValueError,
     "The length of boundaries should be 1 less than the length of values. "
     "Received: boundaries=[10, 20] of length 2, and values=[1.0, 0.5] of length 2."),
    ("PiecewiseConstantDecay", ([], []), {}, ValueError,
     "Received: boundaries=[] of length 0, and values=[] of length 0."),
    ("PiecewiseConstantDecay", (None, [1.0]), {}, TypeError, "has no len()"),
    ("ExponentialDecay", (0.1, 10), {}, TypeError, "decay_rate"),
    ("CosineDecay", (0.1, 10), {"bogus": 1}, TypeError, "bogus"),
]


def _error_id(e) -> str:
    return f"{e[0]}{e[1]!r}{e[2]!r}".replace(" ", "")


ERROR_IDS = [_error_id(e) for e in ERRORS]


@pytest.mark.parametrize("name,args,kwargs,exc,message", ERRORS, ids=ERROR_IDS)
def test_constructor_errors(name, args, kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        getattr(S, name)(*args, **kwargs)


@pytest.mark.parametrize("name,args,kwargs,exc,message", ERRORS, ids=ERROR_IDS)
def test_constructor_errors_match_keras(keras, name, args, kwargs, exc, message):
    with pytest.raises(exc) as ours:
        getattr(S, name)(*args, **kwargs)
    with pytest.raises(exc) as theirs:
        getattr(keras.optimizers.schedules, name)(*args, **kwargs)
    if exc is ValueError:
        assert str(ours.value) == str(theirs.value)


def test_piecewise_int_then_float_values_fail_like_keras(keras):
    """values[0] fixes the accumulator dtype; int then float cannot be added."""
    ours = S.PiecewiseConstantDecay([10, 20], [1, 0.5, 0.1])
    theirs = keras.optimizers.schedules.PiecewiseConstantDecay([10, 20], [1, 0.5, 0.1])
    with pytest.raises(Exception) as a:
        ours(3)
    with pytest.raises(Exception) as b:
        theirs(3)
    assert type(a.value) is type(b.value)
    assert str(a.value) == str(b.value)


@pytest.mark.parametrize(
    "blob,exc,pattern",
    [
        ({"class_name": "Foo", "config": {}}, ValueError,
         r"Unknown learning rate schedule 'Foo'\. Supported schedules: "
         r"ExponentialDecay, "
         r"PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay, CosineDecay, "
         r"CosineDecayRestarts\."),
        ({"class_name": "LearningRateSchedule", "config": {}}, ValueError, "Unknown"),
        ({"config": {}}, ValueError, "needs a 'class_name' key"),
        ({"class_name": "CosineDecay"}, TypeError,
         "'config' of a serialized CosineDecay"),
        ({"class_name": "CosineDecay", "config": {"decay_steps": 3}}, TypeError,
         "Invalid config for learning rate schedule CosineDecay"),
        ({"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1,
                                                  "decay_steps": 0}},
         ValueError, "Argument `decay_steps` must be > 0"),
        ("ExponentialDecay", TypeError, "must be a dict"),
        ([], TypeError, "must be a dict"),
    ],
)
def test_deserialize_errors(blob, exc, pattern):
    with pytest.raises(exc, match=pattern):
        S.deserialize(blob)


def test_from_keras_object_errors():
    with pytest.raises(ValueError, match="Unknown learning rate schedule 'object'"):
        S.from_keras_object(object())

    class ExponentialDecay:  # right name, no get_config
        pass

    with pytest.raises(TypeError, match="no callable get_config"):
        S.from_keras_object(ExponentialDecay())


def test_serialize_errors():
    with pytest.raises(TypeError, match="must be a LearningRateSchedule"):
        S.serialize({"class_name": "ExponentialDecay"})

    class Custom(S.LearningRateSchedule):
        def __call__(self, step):
            return np.float32(0.1)

        def get_config(self):
            return {}

    with pytest.raises(ValueError, match="not one of the supported schedules"):
        S.serialize(Custom())

    class Named(S.ExponentialDecay):
        pass

    assert S.serialize(Named(0.1, 10, 0.9))["class_name"] == "ExponentialDecay"


def test_base_class_contract():
    base = S.LearningRateSchedule()
    with pytest.raises(NotImplementedError, match="must override `__call__"):
        base(0)
    with pytest.raises(NotImplementedError, match="must override `get_config"):
        base.get_config()
    text = repr(S.ExponentialDecay(0.1, 10, 0.9))
    assert text.startswith("ExponentialDecay(initial_learning_rate=0.1, ")


# --------------------------------------------------------------------------
# Module hygiene.
# --------------------------------------------------------------------------


def test_module_imports_only_numpy_and_stdlib():
    roots = set()
    for path in sorted(MODULE_PATH.parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                roots.add(node.module or "")
    ours = {r for r in roots if r.split(".")[0] == "adamax_server"}
    assert all(r.startswith("adamax_server.optim.schedules") for r in ours), ours
    third_party = {r.split(".")[0] for r in roots - ours} - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy"}
