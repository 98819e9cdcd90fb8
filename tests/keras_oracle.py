"""Run the same calls on a real ``keras.optimizers.Adamax`` and on our engine, step by step.

``OraclePair`` owns one Keras optimizer (over ``keras.Variable``s named like our variables) and
one ``adamax_server.Adamax`` on a chosen backend. Every call goes to both, and after every call
``check`` compares the model variables, ``iterations``, the names of ``variables`` and the whole
``save_own_variables`` store (keys, dtypes, shapes, values).

Values are compared bitwise for the CPU backends (they run Keras's NumPy operations in the
same order) and with a tolerance for ``"gpu"`` (CuPy's kernels may contract to FMA and use
other division and ``pow`` code). Integers (the iteration counter) are always exact.

Gradients reach Keras in the variable's dtype: our documented semantics are that a gradient is
upcast to its variable's dtype on arrival, and a ``RowSparseGradient`` is applied as the
equivalent dense gradient.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "numpy")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from adamax_server import Adamax, RowSparseGradient  # noqa: E402
from adamax_server.optim import schedules as our_schedules  # noqa: E402

MISSING_GRADIENT_WARNING = "Gradients do not exist for variables"

GPU_RTOL = 1e-5
GPU_ATOL = 1e-6


def assert_same_array(actual: Any, expected: Any, backend: str, what: str) -> None:
    """Bitwise equality (CPU backends) or a scaled tolerance (gpu); dtype and shape always exact."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != Keras {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != Keras {expected.shape}"
    if backend != "gpu" or expected.dtype.kind not in "fc":
        np.testing.assert_array_equal(actual, expected, err_msg=what, strict=True)
        if expected.dtype.kind == "f":  # assert_array_equal takes -0.0 == 0.0; bits must agree
            numbers = ~np.isnan(expected)
            np.testing.assert_array_equal(
                np.signbit(actual[numbers]), np.signbit(expected[numbers]), err_msg=f"{what}: sign of zero"
            )
        return
    finite = np.isfinite(expected)
    scale = float(np.max(np.abs(expected[finite]), initial=1.0)) if finite.any() else 1.0
    np.testing.assert_allclose(
        actual, expected, rtol=GPU_RTOL, atol=GPU_ATOL * max(1.0, scale), equal_nan=True, err_msg=what
    )


def keras_variables(values: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``keras.Variable``s with the same names, values and dtypes as ``values``."""
    out = {}
    for name, value in values.items():
        value = np.asarray(value)
        out[name] = keras.Variable(value.copy(), name=name, dtype=str(value.dtype))
    return out


def dense_gradient(grad: Any, like: np.ndarray) -> np.ndarray | None:
    """What Keras gets for one of our gradients: dense, in the variable's dtype."""
    if grad is None:
        return None
    if isinstance(grad, RowSparseGradient):
        dense = np.zeros(like.shape, dtype=like.dtype)
        np.add.at(dense, np.asarray(grad.indices), np.asarray(grad.values).astype(like.dtype))
        return dense
    return np.asarray(grad).astype(like.dtype)


# ---------------------------------------------------------------------- schedules
# name -> (Keras class, our class); the constructor arguments are the same on both sides.
SCHEDULE_CLASSES: dict[str, tuple[Any, Any]] = {
    "ExponentialDecay": (keras.optimizers.schedules.ExponentialDecay, our_schedules.ExponentialDecay),
    "PiecewiseConstantDecay": (
        keras.optimizers.schedules.PiecewiseConstantDecay,
        our_schedules.PiecewiseConstantDecay,
    ),
    "PolynomialDecay": (keras.optimizers.schedules.PolynomialDecay, our_schedules.PolynomialDecay),
    "InverseTimeDecay": (keras.optimizers.schedules.InverseTimeDecay, our_schedules.InverseTimeDecay),
    "CosineDecay": (keras.optimizers.schedules.CosineDecay, our_schedules.CosineDecay),
    "CosineDecayRestarts": (
        keras.optimizers.schedules.CosineDecayRestarts,
        our_schedules.CosineDecayRestarts,
    ),
}


def schedule_pair(class_name: str, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """(Keras schedule object, our schedule object) built with the same arguments."""
    keras_cls, our_cls = SCHEDULE_CLASSES[class_name]
    return keras_cls(**kwargs), our_cls(**kwargs)


# ---------------------------------------------------------------------- the pair
@dataclass
class OraclePair:
    """A Keras Adamax and our Adamax driven by the same calls, compared after each one.

    Args:
        variables: name -> initial value (float32/float64), in build order.
        backend: our engine's backend ("reference", "numpy", "numba" or "gpu").
        kwargs: constructor arguments given to both (without ``learning_rate``).
        keras_lr / ours_lr: the learning rate for each side (a float, a schedule, a callable).
            ``ours_lr`` defaults to ``keras_lr`` (Keras schedule objects are converted by us).
        lr_via: "argument" passes ``ours_lr``; "from_config" builds ours with
            ``Adamax.from_config(keras_optimizer.get_config())``.
        exclude: ``{"var_list": [names], "var_names": [patterns]}`` for
            ``exclude_from_weight_decay``, called on both before building.
        loose: compare floats with the GPU tolerance even on a CPU backend (for the known
            differences listed in test_engine_fidelity, next to their strict xfail tests).
        check_warnings: compare the "Gradients do not exist" warnings of both sides.
    """

    variables: Mapping[str, np.ndarray]
    backend: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    keras_lr: Any = 0.001
    ours_lr: Any = None
    lr_via: str = "argument"
    exclude: Mapping[str, Any] | None = None
    name: str = "oracle_adamax"
    loose: bool = False  # compare floats with the GPU tolerance on every backend
    check_warnings: bool = True

    def __post_init__(self) -> None:
        self.values = {n: np.asarray(v) for n, v in self.variables.items()}
        self.kvars = keras_variables(self.values)
        self.keras = keras.optimizers.Adamax(learning_rate=self.keras_lr, name=self.name, **self.kwargs)
        if self.lr_via == "from_config":
            self.ours = Adamax.from_config(self.keras.get_config(), device=self.backend)
        else:
            lr = self.keras_lr if self.ours_lr is None else self.ours_lr
            self.ours = Adamax(learning_rate=lr, name=self.name, device=self.backend, **self.kwargs)
        assert self.ours.backend_name == {"gpu": "cupy"}.get(self.backend, self.backend)
        if self.exclude is not None:
            names = list(self.exclude.get("var_list") or [])
            self.keras.exclude_from_weight_decay(
                var_list=[self.kvars[n] for n in names] or None,
                var_names=self.exclude.get("var_names"),
            )
            self.ours.exclude_from_weight_decay(var_list=names or None, var_names=self.exclude.get("var_names"))
        self.keras.build(list(self.kvars.values()))
        self.ours.build(self.values)
        self.steps_done = 0
        self.check("after build")

    # -------------------------------------------------------------- calls
    def apply(self, grads: Mapping[str, Any], call: str = "list") -> None:
        """One ``apply`` on both sides; ``grads`` maps name -> gradient or None (absent = None).

        ``call`` chooses our entry point: "list" (aligned list with Nones), "mapping"
        (name -> gradient, present ones only), "pairs" (``apply_gradients`` with the present
        ones), "named" (``apply(grads, names)`` with the present ones). Keras gets the matching
        call of its own API.
        """
        ordered = [grads.get(n) for n in self.values]
        kgrads = [dense_gradient(g, self.values[n]) for n, g in zip(self.values, ordered)]
        present = [n for n, g in zip(self.values, ordered) if g is not None]

        with warnings.catch_warnings(record=True) as keras_warnings:
            warnings.simplefilter("always")
            if call in ("list", "mapping"):
                self.keras.apply(kgrads)
            elif call in ("pairs", "named"):
                pairs = [(kg, self.kvars[n]) for n, kg in zip(self.values, kgrads) if kg is not None]
                if call == "pairs":
                    self.keras.apply_gradients(pairs)
                else:
                    self.keras.apply([g for g, _ in pairs], [v for _, v in pairs])
            else:
                raise ValueError(f"unknown call {call!r}")

        with warnings.catch_warnings(record=True) as our_warnings:
            warnings.simplefilter("always")
            if call == "list":
                self.ours.apply(ordered)
            elif call == "mapping":
                self.ours.apply({n: grads[n] for n in present})
            elif call == "pairs":
                returned = self.ours.apply_gradients([(grads[n], n) for n in present])
                assert returned == int(self.keras._iterations.numpy())
            else:
                self.ours.apply([grads[n] for n in present], present)

        self.steps_done += 1
        label = f"step {self.steps_done} ({call})"
        if self.check_warnings:
            assert _missing_warnings(our_warnings) == _missing_warnings(keras_warnings), label
        self.check(label)

    def set_learning_rate(self, value: Any, ours_value: Any = None) -> None:
        self.keras.learning_rate = value
        self.ours.learning_rate = value if ours_value is None else ours_value
        self.check("after learning_rate setter")

    def finalize(self) -> None:
        self.keras.finalize_variable_values(list(self.kvars.values()))
        self.ours.finalize_variable_values()
        self.check("after finalize_variable_values")

    # -------------------------------------------------------------- comparison
    def keras_store(self) -> dict[str, Any]:
        store: dict[str, Any] = {}
        self.keras.save_own_variables(store)
        return store

    def our_store(self) -> dict[str, Any]:
        store: dict[str, Any] = {}
        self.ours.save_own_variables(store)
        return store

    @property
    def compare_as(self) -> str:
        return "gpu" if self.loose else self.backend

    def check(self, label: str) -> None:
        ours = self.ours.trainable_variables
        assert list(ours) == list(self.kvars), label
        for name, kv in self.kvars.items():
            assert_same_array(ours[name], kv.numpy(), self.compare_as, f"{label}: variable {name!r}")

        keras_names = [v.name for v in self.keras.variables]
        assert list(self.ours.variables) == keras_names, label
        assert self.ours.iterations == int(np.asarray(self.keras.iterations)), label

        expected, actual = self.keras_store(), self.our_store()
        assert list(actual) == list(expected), f"{label}: store keys"
        for key, value in expected.items():
            # Keras's NumPy backend creates a float64 variable's "zeros" slots as float32 arrays
            # (until the first assign); every other backend, and Keras's own declared dtype, say
            # float64. Compare against the declared dtype (the cast of zeros is exact).
            value = np.asarray(value).astype(self.keras.variables[int(key)].dtype)
            assert_same_array(
                actual[key], value, self.compare_as, f"{label}: store[{key!r}] ({keras_names[int(key)]})"
            )


def _missing_warnings(records: Iterable[warnings.WarningMessage]) -> list[str]:
    return [str(r.message) for r in records if MISSING_GRADIENT_WARNING in str(r.message)]


def run_steps(
    pair: OraclePair,
    gradients: Iterable[Mapping[str, Any]],
    call: str | Callable[[int], str] = "list",
    actions: Mapping[int, Callable[[OraclePair], None]] | None = None,
) -> OraclePair:
    """Apply each gradient mapping in turn; ``actions[k]`` runs before step ``k`` (0-based)."""
    actions = actions or {}
    for k, grads in enumerate(gradients):
        if k in actions:
            actions[k](pair)
        pair.apply(grads, call(k) if callable(call) else call)
    return pair
