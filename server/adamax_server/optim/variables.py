"""Engine data types and helpers shared by the engine's modules: variable records, row-sparse
gradients, schedule detection and the Keras global-norm scale."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from adamax_server.optim import schedules as lr_schedules

SUPPORTED_VARIABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_name_counts: dict[str, int] = {}
_name_lock = threading.Lock()


def _auto_name(base: str) -> str:
    """Keras's ``auto_name``: "adamax", then "adamax_1", "adamax_2", ... per process."""
    with _name_lock:
        k = _name_counts.get(base, 0)
        _name_counts[base] = k + 1
    return base if k == 0 else f"{base}_{k}"


class RowSparseGradient(NamedTuple):
    """A gradient given as rows of axis 0 (an embedding table's IndexedSlices).

    ``values[k]`` is the gradient of row ``indices[k]``; duplicate indices are summed. It is
    applied exactly as the equivalent dense gradient (zeros elsewhere), which is what Keras does
    with a dense gradient.
    """

    indices: Any
    values: Any


@dataclass
class _Var:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int
    group: str  # dtype name of the flat group
    seg: int  # index of the segment inside the group
    index: int  # position in build order


@dataclass
class _OptVar:
    """One entry of Keras's ``optimizer.variables`` list."""

    name: str
    kind: str  # "iteration" | "learning_rate" | "slot" | "extra"
    slot: str = ""  # for kind == "slot": "avg" | "acc" | "m" | "u"
    var: int = -1  # for kind == "slot": index of the model variable
    extra: int = -1  # for kind == "extra": index into self._extras


def _is_schedule(value: Any) -> bool:
    return isinstance(value, lr_schedules.LearningRateSchedule)


def _looks_like_keras_schedule(value: Any) -> bool:
    return (
        type(value).__module__.startswith("keras")
        and hasattr(value, "get_config")
        and callable(value)
        and any(c.__name__ == "LearningRateSchedule" for c in type(value).__mro__)
    )


def _as_dtype_scalar(value: Any, dtype: np.dtype):
    """``ops.cast(value, dtype)`` / a Python scalar meeting an array of ``dtype``."""
    return np.asarray(value).astype(dtype)[()]



def _keras_global_scale(squared_norms: list[Any], clip_norm: float) -> np.ndarray:
    """``clip_by_global_norm``'s scale, with the same NumPy operations Keras's numpy backend runs.

    A non-finite global norm gives a NaN scale (Keras turns every gradient into NaN then).
    """
    dtype = np.result_type(*[np.asarray(s).dtype for s in squared_norms])
    stacked = np.stack([np.asarray(s, dtype=dtype) for s in squared_norms])
    squared_norm = np.sum(stacked).astype(dtype)
    use_norm = np.sqrt(squared_norm, dtype=dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.asarray(1.0 / use_norm, dtype=dtype)
        minimum = np.minimum(inv, np.asarray(1.0 / clip_norm, dtype=dtype))
        scale_for_finite = clip_norm * minimum[()]
        scale = scale_for_finite + (use_norm - use_norm)
    return np.asarray(scale)


def _is_same_array(a: Any, b: Any) -> bool:
    """Whether two NumPy arrays are the same memory with the same shape and dtype."""
    return (
        isinstance(a, np.ndarray)
        and isinstance(b, np.ndarray)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.ctypes.data == b.ctypes.data
        and a.flags.c_contiguous
        and b.flags.c_contiguous
    )
