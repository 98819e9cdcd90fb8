"""Keras's dtype promotion (numpy-backend flavour) and the arithmetic the schedules use, so every
schedule computes in exactly the dtypes Keras computes in."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Union

import numpy as np

#: A Python or numpy real number, as accepted by the schedule constructors.
Number = Union[int, float, np.number]
#: An optimizer step: a Python int, a numpy integer or a 0-d integer array.
Step = Union[int, np.integer, np.ndarray]

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
