"""Keras-exact learning rate schedules, implemented with numpy only.

This module re-implements the six built-in learning rate schedules of Keras 3
(``keras.optimizers.schedules``) so that the parameter server can evaluate a
schedule for a given optimizer step *without* importing Keras, and obtain the
very same bits that Keras computes with its numpy backend
(``KERAS_BACKEND=numpy``):

* :class:`ExponentialDecay`
* :class:`PiecewiseConstantDecay`
* :class:`PolynomialDecay`
* :class:`InverseTimeDecay`
* :class:`CosineDecay` (optionally with a linear warmup)
* :class:`CosineDecayRestarts` (SGDR)

Bit-exactness is obtained by reproducing, operation by operation, what the
Keras numpy backend does:

* Python scalars are turned into 0-d arrays by ``convert_to_tensor``, whose
  dtype comes from Keras's JAX-like type promotion lattice (a Python ``float``
  becomes ``float32``, a Python ``int`` becomes ``int32``, and 64-bit dtypes
  are narrowed to 32 bits: ``float64 -> float32``, ``int64 -> int32``).
* Binary ``keras.ops`` functions (``add``, ``multiply``, ``power``, ...)
  promote both operands with the same lattice before calling numpy; plain
  Python operators used by Keras (``a / b``, ``1.0 - x``) are plain numpy
  operators (NEP 50 promotion), so we use plain operators at those places.
* ``floor``/``ceil``/``cos``/``log`` compute in a floating dtype derived from
  the input dtype.

Keras's ``floatx`` is assumed to be ``"float32"`` (the default).

``name`` is metadata only. Keras opens a name scope with it when called, so a
Keras schedule whose name is ``None`` or contains ``"/"`` raises
``ValueError`` on every call; these schedules accept such names and compute
as usual.

The optimizer step may be any Python or numpy integer; it is converted to a
0-d ``int64`` array (the server's step counter) and used the way Keras uses
its optimizer's ``iterations`` variable.  Keras keeps that counter in
``int32`` with the numpy backend, which gives identical results for every
step below ``2**31`` (all integer comparisons and int -> float conversions
agree); beyond that Keras's counter would overflow while ours keeps counting.

Configuration and serialization are compatible with Keras:
``schedule.get_config()`` returns the same dict as Keras's ``get_config()``,
:func:`serialize` returns what ``keras.optimizers.schedules.serialize``
returns, :func:`deserialize` accepts that dict (and the legacy
``{"class_name": ..., "config": ...}`` form), and :func:`from_keras_object`
converts a live Keras schedule object (duck typed, Keras is never imported).

Only numpy and the standard library are used.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np

__all__ = [
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "SUPPORTED_SCHEDULES",
    "deserialize",
    "from_keras_object",
    "serialize",
]

#: A Python or numpy real number, as accepted by the schedule constructors.
Number = Union[int, float, np.number]
#: An optimizer step: a Python int, a numpy integer or a 0-d integer array.
Step = Union[int, np.integer, np.ndarray]

#: The Keras module under which the built-in schedules are exported.
KERAS_MODULE = "keras.optimizers.schedules"

# Keras's default ``floatx``; it decides how weakly typed Python scalars are
# resolved ("int" -> int32, "float" -> float32).
_FLOATX = "float32"
_PRECISION = _FLOATX[-2:]


# ---------------------------------------------------------------------------
# Keras dtype promotion (numpy backend flavour).
# ---------------------------------------------------------------------------

# Each node lists the nodes immediately above it. "int" and "float" are the
# weak types of Python ints and floats. Complex types are left out: no
# schedule input can produce them, and leaving them out changes no least
# upper bound between real types.
_PROMOTION_EDGES: dict[str, tuple[str, ...]] = {
    "bool": ("int",),
    "int": ("uint8", "int8"),
    "uint8": ("uint16", "int16"),
    "uint16": ("uint32", "int32"),
    "uint32": ("uint64", "int64"),
    "uint64": ("float",),
    "int8": ("int16",),
    "int16": ("int32",),
    "int32": ("int64",),
    "int64": ("float",),
    "float": ("float16", "bfloat16"),
    "float16": ("float32",),
    "bfloat16": ("float32",),
    "float32": ("float64",),
    "float64": (),
}


def _upper_bounds(node: str) -> frozenset[str]:
    seen = {node}
    todo = [node]
    while todo:
        for above in _PROMOTION_EDGES[todo.pop()]:
            if above not in seen:
                seen.add(above)
                todo.append(above)
    return frozenset(seen)


_UPPER_BOUNDS: dict[str, frozenset[str]] = {
    node: _upper_bounds(node) for node in _PROMOTION_EDGES
}
_STRONG_TYPES = frozenset(_PROMOTION_EDGES) - {"int", "float"}
# Keras's numpy backend narrows 64-bit results to 32 bits (as JAX does).
_NARROW_64 = {"int64": "int32", "uint64": "uint32", "float64": "float32"}


def _least_upper_bound(nodes: set[str]) -> str:
    common = frozenset.intersection(*(_UPPER_BOUNDS[n] for n in nodes))
    least = [c for c in common if common <= _UPPER_BOUNDS[c]]
    if len(least) != 1:  # pragma: no cover - the lattice is well formed
        raise TypeError(f"No dtype promotion path for {sorted(nodes)}.")
    return least[0]


def _dtype_token(value: Any) -> tuple[str, bool]:
    """Return ``(dtype name, is weakly typed)`` for a value or a dtype.

    Mirrors ``getattr(x, "dtype", type(x))`` followed by Keras's
    ``standardize_dtype``: Python ints/floats are weak ``int32``/``float32``,
    Python bools are strong ``bool``, anything with a ``dtype`` is strong.
    """
    if value is bool:
        return "bool", False
    if value is int:
        return "int32", True
    if value is float:
        return "float32", True
    if isinstance(value, str):
        name = value
    else:
        name = np.dtype(value).name
    if name not in _STRONG_TYPES:
        raise TypeError(
            f"Unsupported dtype {name!r} in a learning rate schedule. "
            f"Supported dtypes: {sorted(_STRONG_TYPES)}."
        )
    return name, False


def _token_of(x: Any) -> Any:
    """The dtype-bearing token Keras uses for ``x``: its dtype or its type."""
    return getattr(x, "dtype", type(x))


def _weak(name: str) -> str:
    if name == "bool":
        return name
    return "float" if "float" in name else "int"


def _resolve_weak(name: str) -> str:
    kind = "f" if name == "bfloat16" else name[0]
    if kind == "b":
        return "bool"
    if kind == "i":
        return f"int{_PRECISION}"
    if kind == "u":
        return f"uint{_PRECISION}"
    return f"float{_PRECISION}"


def _result_type(*tokens: Any) -> str:
    """Keras's ``backend.result_type`` for the numpy backend.

    Each token is a dtype (name or numpy dtype) or one of the Python types
    ``bool``, ``int``, ``float`` (the latter two being *weak* types).
    """
    names, weak_flags = zip(*(_dtype_token(t) for t in tokens))
    if len(names) == 1:
        out, out_weak = names[0], weak_flags[0]
    elif len(set(names)) == 1 and not all(weak_flags):
        out, out_weak = names[0], False
    elif all(weak_flags):
        out, out_weak = _least_upper_bound(set(names)), True
    else:
        nodes = {_weak(n) if w else n for n, w in zip(names, weak_flags)}
        out = _least_upper_bound(nodes)
        out_weak = out in ("int", "float")
    if out_weak and out != "bool":
        out = _resolve_weak(out)
    return _NARROW_64.get(out, out)


# ---------------------------------------------------------------------------
# The handful of Keras numpy-backend ops the schedules use.
# ---------------------------------------------------------------------------


def _tensor(x: Any, dtype: Any = None) -> np.ndarray:
    """``keras.ops.convert_to_tensor`` / ``ops.cast`` / ``ops.array``."""
    if dtype is None:
        dtype = _result_type(_token_of(x))
    return np.array(x, dtype=dtype)


def _binary(
    fn: Callable[[np.ndarray, np.ndarray], Any],
    a: Any,
    b: Any,
    *extra_tokens: Any,
) -> Any:
    """A Keras binary op: promote both operands, then apply ``fn``.

    Python ints and floats are kept as weak scalars for promotion; everything
    else is first converted to a tensor.
    """
    if not isinstance(a, (int, float)):
        a = _tensor(a)
    if not isinstance(b, (int, float)):
        b = _tensor(b)
    dtype = _result_type(_token_of(a), _token_of(b), *extra_tokens)
    return fn(_tensor(a, dtype), _tensor(b, dtype))


def _add(a: Any, b: Any) -> Any:
    return _binary(np.add, a, b)


def _subtract(a: Any, b: Any) -> Any:
    return _binary(np.subtract, a, b)


def _multiply(a: Any, b: Any) -> Any:
    return _binary(np.multiply, a, b)


def _divide(a: Any, b: Any) -> Any:
    # True division always promotes with (weak) float.
    return _binary(np.divide, a, b, float)


def _power(a: Any, b: Any) -> Any:
    return _binary(np.power, a, b)


def _minimum(a: Any, b: Any) -> Any:
    return _binary(np.minimum, a, b)


def _where(condition: Any, a: Any, b: Any) -> Any:
    return _binary(lambda x, y: np.where(condition, x, y), a, b)


def _float_dtype_for(x: np.ndarray) -> str:
    if x.dtype.name == "int64":
        return _FLOATX
    return _result_type(x.dtype, float)


def _floor(x: Any) -> Any:
    x = _tensor(x)
    return np.floor(x.astype(_float_dtype_for(x)))


def _ceil(x: Any) -> Any:
    x = _tensor(x)
    return np.ceil(x.astype(_float_dtype_for(x)))


def _cos(x: Any) -> Any:
    x = _tensor(x)
    return np.cos(x.astype(_float_dtype_for(x)))


def _log(x: Any) -> Any:
    x = _tensor(x)
    return np.log(x, dtype=_float_dtype_for(x))


def _as_step(step: Step) -> np.ndarray:
    """Normalize an optimizer step to a 0-d ``int64`` array.

    It then plays the part of Keras's optimizer ``iterations`` variable: it is
    cast to the schedule's dtype, and used as is (not re-converted) by
    :class:`PiecewiseConstantDecay`.

    Raises:
        TypeError: if ``step`` is not an integer (bools are rejected).
    """
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"`step` must be an integer. Received: step={step!r}")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(
            f"`step` must be an integer. Received: step={step!r} "
            f"of type {type(step).__name__}"
        ) from None
    return np.array(value, dtype=np.int64)


# ---------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------


def _check_positive(arg_name: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(
            f"Argument `{arg_name}` must be > 0. "
            f"Received: {arg_name}={value}"
        )


class LearningRateSchedule:
    """Base class of the learning rate schedules.

    A schedule is a callable mapping the optimizer step (the number of
    updates already applied, an ``int64`` counter) to a learning rate, a numpy
    scalar or 0-d array bit-identical to what Keras's schedule returns.
    """

    def __call__(self, step: Step) -> Any:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' "
            "must override `__call__(self, step)`."
        )

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments, exactly as Keras does."""
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' "
            "must override `get_config()` in order to be serializable."
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LearningRateSchedule:
        """Instantiate a schedule from the output of ``get_config()``."""
        return cls(**config)

    def __repr__(self) -> str:
        try:
            config = self.get_config()
            args = ", ".join(f"{k}={v!r}" for k, v in config.items())
        except NotImplementedError:
            args = ""
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """Exponential decay.

    ``lr(step) = initial_learning_rate * decay_rate ** (step / decay_steps)``

    With ``staircase=True`` the exponent is ``floor(step / decay_steps)``.
    Everything is computed in the dtype of ``initial_learning_rate`` once
    converted by Keras's rules (``float32`` for a Python float).

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        decay_rate: Number,
        staircase: bool = False,
        name: str | None = "ExponentialDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _tensor(self.decay_steps, dtype)
        decay_rate = _tensor(self.decay_rate, dtype)
        exponent = _tensor(step, dtype) / decay_steps
        if self.staircase:
            exponent = _floor(exponent)
        return _multiply(lr0, _power(decay_rate, exponent))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class PiecewiseConstantDecay(LearningRateSchedule):
    """Piecewise constant learning rate.

    ``lr(step) = values[0]`` if ``step <= boundaries[0]``,
    ``values[i]`` if ``boundaries[i-1] < step <= boundaries[i]``,
    ``values[-1]`` if ``step > boundaries[-1]``.

    As in Keras, the result is computed as the sum over the intervals of
    ``cast(step in interval) * value`` accumulated in the dtype of
    ``values[0]``, and boundaries are cast to the step's integer dtype
    (so a float boundary is truncated). Mixing an integer ``values[0]`` with
    float later values fails with numpy's casting error, exactly as in Keras.

    Raises:
        ValueError: if ``len(boundaries) != len(values) - 1``.
    """

    def __init__(
        self,
        boundaries: Sequence[Number],
        values: Sequence[Number],
        name: str | None = "PiecewiseConstant",
    ) -> None:
        super().__init__()
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of "
                f"values. Received: boundaries={boundaries} of length "
                f"{len(boundaries)}, and values={values} "
                f"of length {len(values)}."
            )
        self.boundaries = boundaries
        self.values = values
        self.name = name

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        edges = [_tensor(b) for b in self.boundaries]
        levels = [_tensor(v) for v in self.values]
        edges = [
            e if e.dtype == step.dtype else _tensor(e, step.dtype)
            for e in edges
        ]
        out_dtype = levels[0].dtype
        total = np.array(0, dtype=out_dtype)
        total += _tensor(step <= edges[0], out_dtype) * levels[0]
        total += _tensor(step > edges[-1], out_dtype) * levels[-1]
        for low, high, level in zip(edges[:-1], edges[1:], levels[1:-1]):
            total += _tensor((step > low) & (step <= high), out_dtype) * level
        return total

    def get_config(self) -> dict[str, Any]:
        return {
            "boundaries": self.boundaries,
            "values": self.values,
            "name": self.name,
        }


class PolynomialDecay(LearningRateSchedule):
    """Polynomial decay from the initial to the end learning rate.

    Without cycling (``s = min(step, decay_steps)``)::

        lr(step) = (initial - end) * (1 - s / decay_steps) ** power + end

    With ``cycle=True`` the horizon becomes
    ``decay_steps * ceil(step / decay_steps)`` (``decay_steps`` at step 0)
    and ``step`` is not clipped.

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        end_learning_rate: Number = 0.0001,
        power: Number = 1.0,
        cycle: bool = False,
        name: str | None = "PolynomialDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        lr_end = _tensor(self.end_learning_rate, dtype)
        power = _tensor(self.power, dtype)
        s = _tensor(step, dtype)
        horizon = _tensor(self.decay_steps, dtype)
        if self.cycle:
            cycles = _where(
                np.equal(s, 0),
                1.0,
                _ceil(s / self.decay_steps),
            )
            horizon = _multiply(horizon, cycles)
        else:
            s = _minimum(s, horizon)
        fraction = _divide(s, horizon)
        return _add(
            _multiply(lr0 - lr_end, _power(1 - fraction, power)),
            lr_end,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
            "name": self.name,
        }


class InverseTimeDecay(LearningRateSchedule):
    """Inverse time decay.

    ``lr(step) = initial_learning_rate
    / (1 + decay_rate * step / decay_steps)``

    With ``staircase=True``, ``step / decay_steps`` is replaced by
    ``floor(step / decay_steps)``.

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        decay_rate: Number,
        staircase: bool = False,
        name: str | None = "InverseTimeDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _tensor(self.decay_steps, dtype)
        decay_rate = _tensor(self.decay_rate, dtype)
        progress = _tensor(step, dtype) / decay_steps
        if self.staircase:
            progress = _floor(progress)
        one = _tensor(_tensor(1), dtype)
        return _divide(lr0, _add(one, _multiply(decay_rate, progress)))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class CosineDecay(LearningRateSchedule):
    """Cosine decay, with an optional linear warmup.

    Without warmup (``warmup_target is None``), with
    ``s = min(step, decay_steps)``::

        cosine = 0.5 * (1 + cos(pi * s / decay_steps))
        lr(step) = initial_learning_rate * ((1 - alpha) * cosine + alpha)

    With warmup, ``s = min(step, warmup_steps + decay_steps)``; while
    ``s < warmup_steps``::

        lr(step) = (warmup_target - initial_learning_rate)
                   * (s / warmup_steps) + initial_learning_rate

    and afterwards the cosine formula above runs on ``s - warmup_steps``,
    starting from ``warmup_target`` instead of ``initial_learning_rate``.

    Note the positional order of the arguments (``name`` comes before the
    warmup arguments), as in Keras. ``warmup_target`` is cast to the dtype of
    ``initial_learning_rate``.

    Raises:
        ValueError: if ``decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        decay_steps: Number,
        alpha: Number = 0.0,
        name: str | None = "CosineDecay",
        warmup_target: Number | None = None,
        warmup_steps: Number = 0,
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name
        self.warmup_steps = warmup_steps
        self.warmup_target = warmup_target
        _check_positive("decay_steps", decay_steps)

    def _decay(
        self, s: Any, decay_steps: Any, start_lr: Any, dtype: Any
    ) -> Any:
        fraction = _divide(s, decay_steps)
        pi = _tensor(math.pi, dtype)
        cosine = 0.5 * (1.0 + _cos(_multiply(pi, fraction)))
        scaled = (1 - self.alpha) * cosine + self.alpha
        return _multiply(start_lr, scaled)

    @staticmethod
    def _warmup(s: Any, warmup_steps: Any, target: Any, lr0: Any) -> Any:
        fraction = s / warmup_steps
        delta = target - lr0
        return delta * fraction + lr0

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _tensor(self.decay_steps, dtype)
        s = _tensor(step, dtype)
        if self.warmup_target is None:
            s = _minimum(s, decay_steps)
            return self._decay(s, decay_steps, lr0, dtype)
        target = _tensor(self.warmup_target, dtype)
        warmup_steps = _tensor(self.warmup_steps, dtype)
        s = _minimum(s, decay_steps + warmup_steps)
        if s < warmup_steps:
            return self._warmup(s, warmup_steps, target, lr0)
        return self._decay(s - warmup_steps, decay_steps, target, dtype)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR, Loshchilov & Hutter).

    With ``f = step / first_decay_steps``, the restart index ``i`` and the
    fraction ``r`` of the current period are::

        t_mul == 1:  i = floor(f);  r = f - i
        t_mul != 1:  i = floor(log(1 - f * (1 - t_mul)) / log(t_mul))
                     r = (f - (1 - t_mul ** i) / (1 - t_mul)) / t_mul ** i

    and::

        cosine = 0.5 * m_mul ** i * (1 + cos(pi * r))
        lr(step) = initial_learning_rate * ((1 - alpha) * cosine + alpha)

    Raises:
        ValueError: if ``first_decay_steps <= 0``.
    """

    def __init__(
        self,
        initial_learning_rate: Number,
        first_decay_steps: Number,
        t_mul: Number = 2.0,
        m_mul: Number = 1.0,
        alpha: Number = 0.0,
        name: str | None = "SGDRDecay",
    ) -> None:
        super().__init__()
        self.initial_learning_rate = initial_learning_rate
        self.first_decay_steps = first_decay_steps
        self.t_mul = t_mul
        self.m_mul = m_mul
        self.alpha = alpha
        self.name = name
        _check_positive("first_decay_steps", first_decay_steps)

    def __call__(self, step: Step) -> Any:
        step = _as_step(step)
        lr0 = _tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        first_steps = _tensor(self.first_decay_steps, dtype)
        alpha = _tensor(self.alpha, dtype)
        t_mul = _tensor(self.t_mul, dtype)
        m_mul = _tensor(self.m_mul, dtype)
        fraction = _tensor(step, dtype) / first_steps

        if np.equal(t_mul, 1.0):
            restart = _floor(fraction)
            fraction = fraction - restart
        else:
            # Keras re-casts the log argument to `dtype` before taking it.
            growth = _tensor(1.0 - fraction * (1.0 - t_mul), dtype)
            restart = _floor(_log(growth) / _log(t_mul))
            elapsed = _divide(1.0 - _power(t_mul, restart), (1.0 - t_mul))
            fraction = _divide(
                _subtract(fraction, elapsed), _power(t_mul, restart)
            )

        amplitude = _power(m_mul, restart)
        pi = _tensor(math.pi, dtype)
        cosine = 0.5 * amplitude * (1.0 + _cos(_multiply(pi, fraction)))
        scaled = _add(_multiply((1 - alpha), cosine), alpha)
        return _multiply(lr0, scaled)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "first_decay_steps": self.first_decay_steps,
            "t_mul": self.t_mul,
            "m_mul": self.m_mul,
            "alpha": self.alpha,
            "name": self.name,
        }


# ---------------------------------------------------------------------------
# Serialization.
# ---------------------------------------------------------------------------

#: Class name (as Keras serializes it) -> schedule class.
SUPPORTED_SCHEDULES: dict[str, type[LearningRateSchedule]] = {
    cls.__name__: cls
    for cls in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}


def _unknown_schedule(class_name: Any) -> ValueError:
    return ValueError(
        f"Unknown learning rate schedule {class_name!r}. Supported schedules: "
        f"{', '.join(SUPPORTED_SCHEDULES)}."
    )


def _keras_class_name(schedule: LearningRateSchedule) -> str:
    for klass in type(schedule).__mro__:
        if SUPPORTED_SCHEDULES.get(klass.__name__) is klass:
            return klass.__name__
    raise ValueError(
        f"Cannot serialize {type(schedule).__name__!r}: not one of the "
        f"supported schedules ({', '.join(SUPPORTED_SCHEDULES)})."
    )


def _encode(value: Any) -> Any:
    """Encode a config value the way Keras (numpy backend) serializes it."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (np.generic, np.ndarray)):
        # With the numpy backend every numpy value is a "tensor".
        return {
            "class_name": "__tensor__",
            "config": {
                "value": np.asarray(value).tolist(),
                "dtype": np.asarray(value).dtype.name,
            },
        }
    raise TypeError(
        f"Cannot serialize value {value!r} of type {type(value).__name__} "
        "in a learning rate schedule config."
    )


def _decode(value: Any) -> Any:
    """Turn ``__tensor__``/``__numpy__`` entries back into numpy values."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        if value.get("class_name") in ("__tensor__", "__numpy__"):
            inner = value.get("config") or {}
            return np.array(inner["value"], dtype=inner["dtype"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """Serialize like ``keras.optimizers.schedules.serialize``, exactly.

    Returns:
        ``{"module": "keras.optimizers.schedules", "class_name": ...,
        "config": ..., "registered_name": None}``. Config values are kept as
        they are (tuples stay tuples), except numpy values that are not Python
        scalar subclasses, which become ``{"class_name": "__tensor__", ...}``
        dicts as with Keras's numpy backend.

    Raises:
        ValueError: if ``schedule`` is not one of the supported schedules.
    """
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(
            "`schedule` must be a LearningRateSchedule. "
            f"Received: {schedule!r} of type {type(schedule).__name__}"
        )
    class_name = _keras_class_name(schedule)
    config = schedule.get_config()
    if not isinstance(config, dict):
        raise TypeError(f"get_config() of {schedule!r} should return a dict.")
    return {
        "module": KERAS_MODULE,
        "class_name": class_name,
        "config": _encode(config),
        "registered_name": None,
    }


def _build(
    cls: type[LearningRateSchedule], config: Mapping[str, Any]
) -> LearningRateSchedule:
    try:
        return cls.from_config(dict(config))
    except TypeError as exc:
        raise TypeError(
            f"Invalid config for learning rate schedule {cls.__name__}: "
            f"{exc}. "
            f"Config: {dict(config)!r}"
        ) from exc


def deserialize(config: Mapping[str, Any]) -> LearningRateSchedule:
    """Build a schedule from a serialized dict.

    Accepts the output of :func:`serialize` /
    ``keras.optimizers.schedules.serialize`` (``"module"`` and
    ``"registered_name"`` are ignored, as Keras ignores them for built-in
    schedules), as well as the legacy ``{"class_name": ..., "config": ...}``
    form. ``__tensor__`` / ``__numpy__`` encoded values inside the config are
    decoded back into numpy values.

    Raises:
        TypeError: if ``config`` is not a mapping, or its ``config`` entry
            does not match the schedule's constructor.
        ValueError: if ``class_name`` is missing or not a supported schedule,
            or the constructor rejects the arguments.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            "A serialized learning rate schedule must be a dict. "
            f"Received: {config!r} of type {type(config).__name__}"
        )
    if "class_name" not in config:
        raise ValueError(
            f"A serialized learning rate schedule needs a 'class_name' key. "
            f"Received: {dict(config)!r}"
        )
    class_name = config["class_name"]
    cls = None
    if isinstance(class_name, str):
        cls = SUPPORTED_SCHEDULES.get(class_name)
    if cls is None:
        raise _unknown_schedule(class_name)
    inner = config.get("config")
    if not isinstance(inner, Mapping):
        raise TypeError(
            f"The 'config' of a serialized {class_name} must be a dict. "
            f"Received: {inner!r}"
        )
    return _build(cls, _decode(dict(inner)))


def from_keras_object(obj: Any) -> LearningRateSchedule:
    """Convert a live Keras schedule object into the equivalent schedule here.

    Duck typed (Keras is not imported): the class is chosen by
    ``type(obj).__name__`` and built from ``obj.get_config()``.

    Raises:
        ValueError: if the class name is not a supported schedule.
        TypeError: if ``obj`` has no usable ``get_config()``.
    """
    class_name = type(obj).__name__
    cls = SUPPORTED_SCHEDULES.get(class_name)
    if cls is None:
        raise _unknown_schedule(class_name)
    get_config = getattr(obj, "get_config", None)
    if not callable(get_config):
        raise TypeError(f"{class_name} object has no callable get_config().")
    config = get_config()
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{class_name}.get_config() should return a dict. "
            f"Received: {config!r}"
        )
    return _build(cls, config)
