"""The in-process Adamax optimizer: Keras 3's ``keras.optimizers.Adamax``, over named arrays.

Same constructor, defaults, validation messages, method names and numerics as Keras. Where
Keras identifies a variable by object, this engine identifies it by name: ``build`` takes an
ordered mapping name -> array and every method that takes variables takes names.

The update rule (Keras's docstring, Kingma & Ba 2014, section 7.1)::

    t += 1
    m = beta_1 * m + (1 - beta_1) * g
    u = max(beta_2 * u, abs(g))
    current_lr = learning_rate / (1 - beta_1 ** t)
    w = w - current_lr * m / (u + epsilon)

computed exactly as Keras computes it: ``m += (g - m) * (1 - beta_1)`` and
``w -= (lr * m) / ((1 - beta_1 ** t) * (u + epsilon))`` in the variable's dtype.

This module does the orchestration on the host (which variables have gradients, accumulation,
clipping scalars, schedules, EMA) and hands array work to a backend from ``kernels``. It
imports neither grpc nor generated protocol code.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import schedules as lr_schedules
from .kernels import get_backend
from .kernels.base import (
    ACC_NONE,
    ACC_ONLY,
    ACC_UPDATE,
    CLIP_GLOBAL,
    CLIP_NONE,
    CLIP_NORM,
    CLIP_VALUE,
    FlatGroup,
    GroupStep,
    SegmentTable,
)

__all__ = ["Adamax", "DeviceStagedArray", "RowSparseGradient"]

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


class DeviceStagedArray(np.ndarray):
    """A host gradient whose bytes were also copied to the engine's GPU while they arrived.

    It behaves as the host array (validation and metrics read it); ``device_copy`` holds the same
    elements on the device (in the wire dtype, same shape) and ``ready`` is the CUDA event after
    which that copy is complete. The engine stages from ``device_copy``, so the host-to-device
    transfer overlapped the network receive instead of following it.
    """

    device_copy: Any = None
    ready: Any = None

    @classmethod
    def wrap(cls, host: np.ndarray, device_copy: Any, ready: Any) -> DeviceStagedArray:
        out = host.view(cls)
        out.device_copy = device_copy
        out.ready = ready
        return out


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


class Adamax:
    """Optimizer that implements the Adamax algorithm, with Keras 3's exact semantics.

    Args:
        learning_rate: A float, a ``LearningRateSchedule`` (ours, or a Keras schedule object,
            converted), or a callable taking no arguments. Defaults to 0.001.
        beta_1: Exponential decay rate for the 1st moment estimates.
        beta_2: Exponential decay rate for the exponentially weighted infinity norm.
        epsilon: Small constant for numerical stability.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
        ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps, name:
            as in ``keras.optimizers.Optimizer``.
        device: "auto" (GPU via CuPy when present, else CPU), "cpu", "gpu", or one backend
            by name ("numba", "numpy", "reference"). Not part of the Keras config.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        device: str = "auto",
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("decay", None) is not None:
            warnings.warn("Argument `decay` is no longer supported and will be ignored.")
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")

        self.name = name if name is not None else _auto_name("adamax")
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.global_clipnorm = global_clipnorm
        self.clipvalue = clipvalue
        self.use_ema = use_ema
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps

        if gradient_accumulation_steps:
            if not gradient_accumulation_steps >= 2:
                raise ValueError(
                    "`gradient_accumulation_steps` must be an integer >= 2. "
                    f"Received: gradient_accumulation_steps={gradient_accumulation_steps}"
                )
        if use_ema:
            if ema_momentum > 1 or ema_momentum < 0:
                raise ValueError(
                    "`ema_momentum` must be in the range [0, 1]. "
                    f"Received: ema_momentum={ema_momentum}"
                )
            if ema_overwrite_frequency and (
                not isinstance(ema_overwrite_frequency, int) or ema_overwrite_frequency < 1
            ):
                raise ValueError(
                    "`ema_overwrite_frequency` must be an integer >= 1 or None. "
                    f"Received: ema_overwrite_frequency={ema_overwrite_frequency}"
                )
        self.ema_momentum = ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency

        clip_args_sum = sum(a is not None for a in [clipnorm, clipvalue, global_clipnorm])
        if clip_args_sum > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: clipnorm={clipnorm}, clipvalue={clipvalue}, "
                f"global_clipnorm={global_clipnorm}"
            )

        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.device = device
        self._backend = get_backend(device)
        self.built = False

        self._raw_iterations = 0  # Keras's ``optimizer._iterations`` (an int32 variable)
        self._opt_vars: list[_OptVar] = [_OptVar("iteration", "iteration")]
        self._extras: list[Any] = []  # backend arrays made by add_variable
        self._vars: list[_Var] = []
        self._var_index: dict[str, int] = {}
        self._groups: dict[str, FlatGroup] = {}
        self._exclude_names: set[str] = set()
        self._exclude_pattern: re.Pattern[str] | None = None

        if _looks_like_keras_schedule(learning_rate):
            learning_rate = lr_schedules.from_keras_object(learning_rate)
        if _is_schedule(learning_rate) or callable(learning_rate):
            self._learning_rate: Any = learning_rate
            self._lr_value: np.float32 | None = None
        else:
            if not isinstance(learning_rate, float):
                raise ValueError(
                    "Argument `learning_rate` should be float, or an instance "
                    "of LearningRateSchedule, or a callable "
                    "(that takes in the current iteration value "
                    "and returns the corresponding learning rate value). "
                    f"Received instead: learning_rate={learning_rate}"
                )
            self._learning_rate = None
            self._lr_value = np.float32(learning_rate)  # a float32 (floatx) variable in Keras
            self._opt_vars.append(_OptVar("learning_rate", "learning_rate"))

    # ------------------------------------------------------------------ properties
    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def iterations(self) -> int:
        """Keras's ``iterations``: update steps taken (raw steps // accumulation steps)."""
        if self.gradient_accumulation_steps:
            return self._raw_iterations // self.gradient_accumulation_steps
        return self._raw_iterations

    @property
    def learning_rate(self) -> Any:
        """The current learning rate (a schedule is evaluated at the raw step counter)."""
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        if _looks_like_keras_schedule(learning_rate):
            learning_rate = lr_schedules.from_keras_object(learning_rate)
        if _is_schedule(learning_rate) or callable(learning_rate):
            self._learning_rate = learning_rate
            if self._lr_value is not None:
                self._lr_value = None
                self._opt_vars = [v for v in self._opt_vars if v.kind != "learning_rate"]
            return
        if _is_schedule(self._learning_rate):
            raise TypeError(
                "This optimizer was created with a `LearningRateSchedule`"
                " object as its `learning_rate` constructor argument, "
                "hence its learning rate is not settable. If you need the"
                " learning rate to be settable, you should instantiate "
                "the optimizer with a float `learning_rate` argument."
            )
        if self._lr_value is None:
            raise TypeError(
                "This optimizer's `learning_rate` is a callable, so it has no learning rate "
                "variable to assign to; set a new callable or schedule instead."
            )
        self._lr_value = np.float32(learning_rate)

    @property
    def trainable_variables(self) -> dict[str, np.ndarray]:
        """Model variables in build order: name -> host NumPy array (a copy)."""
        hosts = self._host_slot("w")
        return {v.name: hosts[v.index] for v in self._vars}

    def read_variables_into(self, outs: Mapping[str, np.ndarray]) -> None:
        """Copy model variables into host arrays of the same shape and dtype (name -> array).

        Unlike ``trainable_variables`` this makes no intermediate copy: each variable goes
        straight from the optimizer's buffer into its destination.
        """
        for name, out in outs.items():
            v = self._require_var(name)
            if tuple(out.shape) != v.shape or out.dtype != v.dtype:
                raise ValueError(
                    f"Destination for {name!r} has shape {tuple(out.shape)} and dtype {out.dtype}; "
                    f"the variable has shape {v.shape} and dtype {v.dtype}."
                )
            self._backend.read_into(self._view("w", v), out)

    @property
    def variables(self) -> dict[str, np.ndarray]:
        """Optimizer variables in Keras's order: name -> host NumPy array (a copy)."""
        return {ov.name: value for ov, value in zip(self._opt_vars, self._opt_var_values())}

    @property
    def variable_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return [(v.name, v.shape, v.dtype) for v in self._vars]

    # ------------------------------------------------------------------ building
    def build(self, variables: Mapping[str, Any]) -> None:
        """Create the optimizer state for model variables (name -> initial value, in order)."""
        if self.built:
            return
        if not isinstance(variables, Mapping):
            raise TypeError(
                "`build` takes an ordered mapping of variable name -> initial value. "
                f"Received: {type(variables).__name__}"
            )
        specs: list[_Var] = []
        values: list[np.ndarray] = []
        group_sizes: dict[str, list[int]] = {}
        for index, (name, value) in enumerate(variables.items()):
            if not isinstance(name, str) or not name:
                raise ValueError(f"Variable names must be non-empty strings. Received: {name!r}")
            arr = np.asarray(value)
            if arr.dtype not in SUPPORTED_VARIABLE_DTYPES:
                raise ValueError(
                    f"Variable {name!r} has dtype {arr.dtype}; variables must be float32 or "
                    "float64 (gradients may be float16, bfloat16, float32 or float64)."
                )
            group = arr.dtype.name
            sizes = group_sizes.setdefault(group, [])
            specs.append(_Var(name, tuple(arr.shape), arr.dtype, int(arr.size), group, len(sizes), index))
            sizes.append(int(arr.size))
            values.append(arr)
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("Variable names passed to `build` must be unique.")

        be = self._backend
        groups: dict[str, FlatGroup] = {}
        for group, sizes in group_sizes.items():
            dtype = np.dtype(group)
            table = SegmentTable.build(sizes)
            total = table.total
            slots = ["w", "m", "u", "g"]
            if self.use_ema:
                slots.append("avg")
            if self.gradient_accumulation_steps:
                slots.append("acc")
            groups[group] = FlatGroup(
                dtype=dtype,
                table=table,
                buffers={s: be.zeros(total, dtype) for s in slots},
                size=total,
            )
        self._vars = specs
        self._var_index = {v.name: v.index for v in specs}
        self._groups = groups
        # Per group: the build-order index of each segment, and the weight-decay flags (fixed
        # once built, since exclusions can only be configured before build).
        self._group_members = {
            g: np.asarray([v.index for v in specs if v.group == g], dtype=np.int64) for g in groups
        }
        self._group_decay = {
            g: np.asarray(
                [self._use_weight_decay(v) for v in specs if v.group == g], dtype=np.uint8
            )
            for g in groups
        }
        for v, value in zip(specs, values):
            be.write(self._view("w", v), value)
        prepare = getattr(be, "prepare", None)
        if prepare is not None:  # e.g. compile GPU kernels now rather than in the first step
            for group in groups.values():
                prepare(group)
        def add_slot(v: _Var, suffix: str, slot: str) -> None:
            name = self._unique_opt_name(self._slot_name(v, suffix))
            self._opt_vars.append(_OptVar(name, "slot", slot, v.index))

        if self.use_ema:
            # Keras creates the averages with zeros; the first EMA update sets them.
            for v in specs:
                add_slot(v, "average", "avg")
        if self.gradient_accumulation_steps:
            for v in specs:
                add_slot(v, "gradient_accumulator", "acc")
        for v in specs:
            add_slot(v, "momentum", "m")
            add_slot(v, "norm", "u")
        self.built = True

    @staticmethod
    def _slot_name(v: _Var, slot: str) -> str:
        return f"{v.name.replace('/', '_').replace(':', '_')}_{slot}"

    def _view(self, slot: str, v: _Var):
        group = self._groups[v.group]
        off = int(group.table.offsets[v.seg])
        return group.buffers[slot][off : off + v.size].reshape(v.shape)

    def _host_slot(self, slot: str) -> list[np.ndarray]:
        """Host copies of one slot for every variable: one copy (one transfer) per group.

        ``to_host`` returns a private copy of the flat buffer, so the per-variable arrays are
        views into it; nothing else ever writes it.
        """
        flat = {name: self._backend.to_host(g.buffers[slot]) for name, g in self._groups.items()}
        out = []
        for v in self._vars:
            off = int(self._groups[v.group].table.offsets[v.seg])
            out.append(flat[v.group][off : off + v.size].reshape(v.shape))
        return out

    def _require_var(self, name: str) -> _Var:
        if name not in self._var_index:
            raise KeyError(
                f"Unknown variable: {name!r}. This optimizer can only be called for the "
                "variables it was originally built with."
            )
        return self._vars[self._var_index[name]]

    # ------------------------------------------------------------------ Keras methods
    def add_variable(
        self,
        shape: Sequence[int],
        initializer: Any = "zeros",
        dtype: Any = None,
        aggregation: str = "none",
        layout: Any = None,
        name: str | None = None,
    ) -> str:
        """Add an optimizer variable; returns its name. It joins ``variables`` and the store."""
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype or "float32")
        if isinstance(initializer, str):
            if initializer == "zeros":
                value = np.zeros(shape, dtype)
            elif initializer == "ones":
                value = np.ones(shape, dtype)
            else:
                raise ValueError(
                    f"Unknown initializer {initializer!r}: use 'zeros', 'ones', a number or a "
                    "callable(shape, dtype)"
                )
        elif callable(initializer):
            value = np.asarray(initializer(shape, dtype=dtype), dtype=dtype)
        else:
            value = np.full(shape, initializer, dtype=dtype)
        arr = self._backend.zeros(int(np.prod(shape, dtype=np.int64)), dtype).reshape(shape)
        self._backend.write(arr, value)
        self._extras.append(arr)
        unique = self._unique_opt_name(name or "variable")
        self._opt_vars.append(_OptVar(unique, "extra", extra=len(self._extras) - 1))
        return unique

    def _unique_opt_name(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``, ... if an optimizer variable already has it.

        Keras tells same-named variables apart by object; here the name is the handle, so each
        one gets its own (the suffixes follow Keras's auto-naming).
        """
        taken = {ov.name for ov in self._opt_vars}
        if name not in taken:
            return name
        k = 1
        while f"{name}_{k}" in taken:
            k += 1
        return f"{name}_{k}"

    def add_variable_from_reference(
        self, reference_variable: str, name: str | None = None, initializer: Any = "zeros"
    ) -> str:
        """Add a variable with the shape and dtype of a model variable (named like Keras)."""
        v = self._require_var(reference_variable)
        full = f"{v.name.replace('/', '_').replace(':', '_')}_{name or 'var'}"
        return self.add_variable(v.shape, initializer=initializer, dtype=v.dtype, name=full)

    def exclude_from_weight_decay(
        self, var_list: Iterable[Any] | None = None, var_names: Iterable[str] | None = None
    ) -> None:
        """Exclude variables (by name) or any whose name matches a pattern from weight decay."""
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` can only be configured before "
                "the optimizer is built."
            )
        self._exclude_names = {getattr(v, "name", v) for v in (var_list or [])}
        var_names = list(var_names or [])
        self._exclude_patterns = var_names
        self._exclude_pattern = re.compile("|".join(set(var_names))) if var_names else None

    @property
    def weight_decay_exclusions(self) -> dict[str, list[str]]:
        """What ``exclude_from_weight_decay`` was given (neither the config nor the store has it).

        ``{"var_list": [names], "var_names": [patterns]}``; checkpoints save it and restore it
        with ``exclude_from_weight_decay(**exclusions)`` before ``build``.
        """
        return {
            "var_list": sorted(self._exclude_names),
            "var_names": list(getattr(self, "_exclude_patterns", [])),
        }

    def _use_weight_decay(self, v: _Var) -> bool:
        if v.name in self._exclude_names:
            return False
        if self._exclude_pattern is not None and re.search(self._exclude_pattern, v.name):
            return False
        return True

    def scale_loss(self, loss: Any) -> Any:
        if self.loss_scale_factor is not None:
            return loss * self.loss_scale_factor
        return loss

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, str]]) -> int:
        """Apply (gradient, variable name) pairs; returns the raw step counter like Keras."""
        pairs = list(grads_and_vars)
        grads = [g for g, _ in pairs]
        names = [n for _, n in pairs]
        self.apply(grads, names)
        return self._raw_iterations

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        """Apply one step of gradients.

        Args:
            grads: a list aligned with the build order, or a mapping name -> gradient. ``None``
                means no gradient for that variable. A gradient is an array (float16, bfloat16,
                float32 or float64; upcast to the variable dtype) or a ``RowSparseGradient``.
            trainable_variables: optional. Before ``build``, a mapping name -> initial value to
                build with. Afterwards, the variable names that ``grads`` (a list) refer to.
        """
        if isinstance(grads, Mapping):
            if trainable_variables is not None:
                raise ValueError("Pass either a mapping of gradients or `trainable_variables`, not both.")
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer "
                    "must already be built on a list of variables. "
                    "Call `optimizer.build(trainable_variables)` first. "
                )
            unknown = [k for k in grads if k not in self._var_index]
            if unknown:
                raise KeyError(
                    f"Unknown variable(s): {unknown}. This optimizer was built with "
                    f"{[v.name for v in self._vars]}."
                )
            if len(grads) == 0:
                return
            aligned: list[Any] = [grads.get(v.name) for v in self._vars]
        else:
            grads = list(grads)
            if len(grads) == 0:
                return
            if trainable_variables is None:
                if not self.built:
                    raise ValueError(
                        "When passing `grads` without `variables`, the optimizer "
                        "must already be built on a list of variables. "
                        "Call `optimizer.build(trainable_variables)` first. "
                    )
                if len(grads) != len(self._vars):
                    raise ValueError(
                        "When passing `grads` as a list of gradient tensors, the "
                        "gradients must match `optimizer.variables` one-to-on. "
                        f"Received a list of {len(grads)} gradients, but the "
                        f"optimizer is tracking {len(self._vars)} "
                        "trainable variables."
                    )
                aligned = grads
            else:
                if isinstance(trainable_variables, Mapping):
                    if not self.built:
                        self.build(trainable_variables)
                    names = list(trainable_variables.keys())
                else:
                    names = [getattr(n, "name", n) for n in trainable_variables]
                    if not self.built:
                        raise ValueError(
                            "To build the optimizer from `apply`, pass `trainable_variables` as "
                            "a mapping name -> initial value, or call `build` first."
                        )
                if len(names) != len(grads):
                    raise ValueError(
                        f"Received {len(grads)} gradients for {len(names)} variables."
                    )
                for n in names:
                    self._require_var(n)
                aligned = [None] * len(self._vars)
                for g, n in zip(grads, names):
                    aligned[self._var_index[n]] = g
                # Like Keras, only gradients given as None count as missing; variables left out
                # of the call are simply not updated.
                self._apply_aligned(aligned, warn_for=[n for g, n in zip(grads, names) if g is None])
                return
        self._apply_aligned(aligned)

    # ------------------------------------------------------------------ the step
    def _prepare_gradient(self, v: _Var, g: Any) -> Any:
        """Validate one gradient; return something ``_load_gradient`` can write."""
        if isinstance(g, RowSparseGradient):
            idx = np.asarray(g.indices)
            vals = np.asarray(g.values)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(
                    f"Sparse gradient for {v.name!r}: indices must be a 1-D integer array. "
                    f"Received shape {idx.shape}, dtype {idx.dtype}."
                )
            if len(v.shape) == 0 or vals.shape != (idx.shape[0],) + v.shape[1:]:
                raise ValueError(
                    f"Sparse gradient for {v.name!r}: values must have shape "
                    f"{(idx.shape[0],) + v.shape[1:]} (rows x variable shape[1:]). "
                    f"Received {vals.shape}."
                )
            if idx.size and (idx.min() < 0 or idx.max() >= v.shape[0]):
                raise ValueError(
                    f"Sparse gradient for {v.name!r}: row indices must be in [0, {v.shape[0]}). "
                    f"Received min={int(idx.min())}, max={int(idx.max())}."
                )
            self._check_grad_dtype(v, vals.dtype)
            return RowSparseGradient(idx, vals)
        if isinstance(g, DeviceStagedArray):
            arr = g  # keep the subclass: np.asarray would drop its device copy
        else:
            arr = g if hasattr(g, "__cuda_array_interface__") else np.asarray(g)
        if tuple(arr.shape) != v.shape:
            raise ValueError(
                f"Gradient for variable {v.name!r} has shape {tuple(arr.shape)}, but the variable "
                f"has shape {v.shape}."
            )
        self._check_grad_dtype(v, np.dtype(arr.dtype))
        return arr

    @staticmethod
    def _check_grad_dtype(v: _Var, dtype: np.dtype) -> None:
        if not (dtype.kind == "f" or dtype.name == "bfloat16"):
            raise ValueError(
                f"Gradient for variable {v.name!r} has dtype {dtype}; gradients must be "
                "float16, bfloat16, float32 or float64."
            )

    def _load_gradient(self, v: _Var, g: Any) -> None:
        dst = self._view("g", v)
        if _is_same_array(g, dst):
            return  # received straight into the staging buffer (gradient_buffer)
        if isinstance(g, RowSparseGradient):
            dense = np.zeros(v.shape, dtype=v.dtype)
            np.add.at(dense, g.indices, g.values.astype(v.dtype))
            g = dense
        write_device = getattr(self._backend, "write_device", None)
        if isinstance(g, DeviceStagedArray) and g.device_copy is not None and write_device is not None:
            write_device(dst, g.device_copy, g.ready)
        elif isinstance(g, np.ndarray):
            # Through the backend's staging path (pinned, asynchronous on the GPU).
            group = self._groups[v.group]
            start = int(group.table.offsets[v.seg])
            self._backend.write_range(group.buffers["g"], start, g.reshape(-1))
        else:
            self._backend.write(dst, g)

    def _current_learning_rate(self) -> Any:
        if _is_schedule(self._learning_rate):
            return self._learning_rate(np.int32(self._raw_iterations))
        if self._lr_value is not None:
            return self._lr_value
        return self._learning_rate()

    def _apply_aligned(self, grads: list[Any], warn_for: list[str] | None = None) -> None:
        present = [g is not None for g in grads]
        if not any(present):
            raise ValueError("No gradients provided for any variable.")
        missing = [v.name for v, p in zip(self._vars, present) if not p] if warn_for is None else warn_for
        if missing:
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss."
                " If using `model.compile()`, did you forget to provide a "
                "`loss` argument?",
                stacklevel=3,
            )
        # Validate everything before touching any state: a bad gradient changes nothing.
        prepared = [
            self._prepare_gradient(v, g) if g is not None else None for v, g in zip(self._vars, grads)
        ]
        for v, g in zip(self._vars, prepared):
            if g is not None:
                self._load_gradient(v, g)
        self._backend.finish_staging()
        self._run_step(present)
        self._raw_iterations += 1

    @property
    def host_staging(self) -> bool:
        """Whether ``gradient_buffer`` returns host (NumPy) memory that a receiver can fill."""
        return self.built and all(isinstance(g.buffers["g"], np.ndarray) for g in self._groups.values())

    def gradient_buffer(self, name: str) -> Any:
        """The writable staging buffer for ``name``'s gradient (variable shape and dtype).

        A server writes received gradient bytes here directly and then calls
        ``apply_staged``; that skips one full copy of the gradients. Backend arrays: NumPy on
        the CPU, CuPy on the GPU.
        """
        return self._view("g", self._require_var(name))

    def stage_gradient(self, name: str, data: Any, offset: int = 0) -> None:
        """Write part of ``name``'s gradient into its staging buffer, as it arrives.

        ``data`` is a flat chunk (any float dtype; upcast) placed at element ``offset`` of the
        variable (C order). On the GPU the chunk goes through a pinned host buffer and an
        asynchronous copy, so receiving the next chunk overlaps the transfer of this one;
        ``apply_staged`` waits for outstanding copies. Call ``apply_staged`` once every chunk of
        every present gradient is staged.
        """
        v = self._require_var(name)
        chunk = np.asarray(data).reshape(-1)
        self._check_grad_dtype(v, chunk.dtype)
        if offset < 0 or offset + chunk.size > v.size:
            raise ValueError(
                f"Gradient chunk for {name!r} covers elements [{offset}, {offset + chunk.size}) "
                f"but the variable has {v.size} elements."
            )
        group = self._groups[v.group]
        start = int(group.table.offsets[v.seg]) + offset
        self._backend.write_range(group.buffers["g"], start, chunk)

    def device_receiver(self) -> Any:
        """On the GPU, a helper that copies a push's gradients to the device as they arrive.

        ``None`` on the CPU. See ``kernels.gpu.DeviceReceiver``: pass its ``allocate`` to the wire
        decoder and its ``wrap(name, array)`` results to ``apply``.
        """
        make = getattr(self._backend, "device_receiver", None)
        return make() if make is not None else None

    def apply_staged(self, present: Iterable[str] | None = None) -> None:
        """Apply the gradients already written into ``gradient_buffer``s.

        Args:
            present: names of the variables that have a gradient this step (None: all).
        """
        if not self.built:
            raise ValueError("The optimizer must be built before `apply_staged`.")
        if present is None:
            flags = [True] * len(self._vars)
        else:
            names = set(present)
            for n in names:
                self._require_var(n)
            flags = [v.name in names for v in self._vars]
        if not any(flags):
            raise ValueError("No gradients provided for any variable.")
        self._backend.finish_staging()
        self._run_step(flags)
        self._raw_iterations += 1

    def _run_step(self, present: list[bool]) -> None:
        """One Keras ``_backend_apply_gradients`` over every dtype group."""
        steps = self.gradient_accumulation_steps
        if steps:
            acc_mode = ACC_UPDATE if (self._raw_iterations + 1) % steps == 0 else ACC_ONLY
        else:
            acc_mode = ACC_NONE
        iterations = self.iterations
        lr = self._current_learning_rate()

        clip_mode = CLIP_NONE
        if acc_mode != ACC_ONLY:
            if self.clipnorm and self.clipnorm > 0:
                clip_mode = CLIP_NORM
            elif self.global_clipnorm and self.global_clipnorm > 0:
                clip_mode = CLIP_GLOBAL
            elif self.clipvalue and self.clipvalue > 0:
                clip_mode = CLIP_VALUE

        overwrite = bool(
            self.use_ema
            and self.ema_overwrite_frequency
            and (iterations + 1) % self.ema_overwrite_frequency == 0
        )
        present_arr = np.asarray(present, dtype=np.uint8)
        plans: dict[str, GroupStep] = {}
        for gname, group in self._groups.items():
            plans[gname] = self._group_step(group, present_arr, acc_mode, clip_mode, iterations, lr, overwrite)

        if clip_mode in (CLIP_NORM, CLIP_GLOBAL):
            sums = {gname: self._backend.sumsq(group, plans[gname]) for gname, group in self._groups.items()}
            if clip_mode == CLIP_NORM:
                for gname, plan in plans.items():
                    plan.clip_denom = self._clipnorm_denominators(sums[gname], self._groups[gname].dtype)
            else:
                # Keras stacks the per-variable sums in the order of the filtered gradient list.
                ordered = [sums[v.group][v.seg] for v, p in zip(self._vars, present) if p]
                scale = _keras_global_scale(ordered, self.global_clipnorm)
                for gname, plan in plans.items():
                    dtype = self._groups[gname].dtype
                    plan.global_scale = float(scale)
                    plan.global_scale_wide = bool(scale.dtype.itemsize > dtype.itemsize)
        for gname, group in self._groups.items():
            self._backend.step(group, plans[gname])

    def update_step(self, gradient: Any, variable: str, learning_rate: Any) -> None:
        """Keras's ``update_step``: the Adamax update of one variable with ``learning_rate``.

        Only the moment, norm and variable update of that variable, at the current
        ``iterations`` (bias correction ``1 - beta_1 ** (iterations + 1)``); no loss-scale,
        accumulation, clipping, weight decay or EMA, and the step counter does not move, as when
        Keras's ``apply`` calls it.
        """
        v = self._require_var(getattr(variable, "name", variable))
        self._load_gradient(v, self._prepare_gradient(v, gradient))
        self._backend.finish_staging()
        present = np.zeros(len(self._vars), dtype=np.uint8)
        present[v.index] = 1
        group = self._groups[v.group]
        plan = self._group_step(group, present, ACC_NONE, CLIP_NONE, self.iterations, learning_rate, False)
        plan.use_wd = False
        plan.use_ema = False
        plan.use_loss_scale = False
        self._backend.step(group, plan)

    def _group_step(
        self,
        group: FlatGroup,
        present_arr: np.ndarray,
        acc_mode: int,
        clip_mode: int,
        iterations: int,
        lr: Any,
        overwrite: bool,
    ) -> GroupStep:
        dtype = group.dtype
        has_grad = present_arr[self._group_members[dtype.name]]
        decay = self._group_decay[dtype.name]
        use_wd = self.weight_decay is not None and acc_mode != ACC_ONLY

        def cast(x: Any):
            return _as_dtype_scalar(x, dtype)

        local_step = cast(iterations + 1)
        beta_1_power = np.power(cast(self.beta_1), local_step)
        lr_d = cast(lr)
        if self.use_ema:
            momentum = np.multiply(cast(iterations != 0), cast(self.ema_momentum))
            one_minus = np.subtract(cast(1), momentum)
        else:
            momentum = one_minus = cast(0)
        return GroupStep(
            has_grad=has_grad,
            decay=decay,
            acc_mode=acc_mode,
            acc_steps=cast(self.gradient_accumulation_steps or 1),
            use_loss_scale=self.loss_scale_factor is not None,
            loss_scale=cast(self.loss_scale_factor if self.loss_scale_factor is not None else 1),
            clip_mode=clip_mode,
            clip_value=cast(self.clipvalue if clip_mode == CLIP_VALUE else 0),
            clip_norm=cast(self.clipnorm if clip_mode == CLIP_NORM else 0),
            clip_denom=None,
            global_scale=1.0,
            global_scale_wide=False,
            use_wd=use_wd,
            wd=cast(self.weight_decay if self.weight_decay is not None else 0),
            wd_lr=lr_d,
            lr=lr_d,
            one_minus_beta_1=cast(1 - self.beta_1),
            beta_2=cast(self.beta_2),
            epsilon=cast(self.epsilon),
            one_minus_beta_1_power=cast(1 - beta_1_power),
            use_ema=bool(self.use_ema),
            ema_m=momentum,
            ema_one_minus_m=one_minus,
            overwrite=overwrite,
        )

    def _clipnorm_denominators(self, l2sum: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``maximum(l2norm, clipnorm)`` per segment, with Keras's two-tap where for l2sum <= 0."""
        l2sum = l2sum.astype(dtype)
        pred = l2sum > 0
        l2sum_safe = np.where(pred, l2sum, np.ones_like(l2sum))
        with np.errstate(invalid="ignore"):
            l2norm = np.where(pred, np.sqrt(l2sum_safe, dtype=dtype), l2sum)
        return np.maximum(l2norm, _as_dtype_scalar(self.clipnorm, dtype)).astype(dtype)

    # ------------------------------------------------------------------ EMA, state
    def finalize_variable_values(self, var_list: Iterable[str] | None = None) -> None:
        """With EMA, overwrite the model variables with their moving averages."""
        if not self.use_ema or not self.built:
            return
        names = [v.name for v in self._vars] if var_list is None else [getattr(n, "name", n) for n in var_list]
        if len(names) != len(self._vars):
            raise ValueError(
                f"The length of model variables ({len(names)}) to override does not match the "
                f"length of model variables stored in the optimizer ({len(self._vars)}). "
                "Please check if the optimizer was called on your model."
            )
        targets = [self._require_var(n) for n in names]  # all checked before any overwrite
        for v in targets:
            self._view("w", v)[...] = self._view("avg", v)

    def _opt_var_get(self, ov: _OptVar) -> np.ndarray:
        if ov.kind == "iteration":
            return np.asarray(self._raw_iterations, dtype=np.int32)
        if ov.kind == "learning_rate":
            return np.asarray(self._lr_value, dtype=np.float32)
        if ov.kind == "extra":
            return self._backend.to_host(self._extras[ov.extra])
        return self._backend.to_host(self._view(ov.slot, self._vars[ov.var]))

    def _opt_var_values(self) -> list[np.ndarray]:
        host_slots: dict[str, list[np.ndarray]] = {}
        out = []
        for ov in self._opt_vars:
            if ov.kind == "slot":
                if ov.slot not in host_slots:
                    host_slots[ov.slot] = self._host_slot(ov.slot)
                out.append(host_slots[ov.slot][ov.var])
            else:
                out.append(self._opt_var_get(ov))
        return out

    def _opt_var_shape(self, ov: _OptVar) -> tuple[int, ...]:
        if ov.kind in ("iteration", "learning_rate"):
            return ()
        if ov.kind == "extra":
            return tuple(self._extras[ov.extra].shape)
        return self._vars[ov.var].shape

    def _opt_var_set(self, ov: _OptVar, value: Any) -> None:
        value = np.asarray(value)
        shape = self._opt_var_shape(ov)
        if tuple(value.shape) != shape:
            raise ValueError(
                "The shape of the target variable and the shape of the target value in "
                "`variable.assign(value)` must match. "
                f"variable.shape={shape}, Received: value.shape={tuple(value.shape)}. "
                f"Target variable: {ov.name}"
            )
        if ov.kind == "iteration":
            self._raw_iterations = int(np.asarray(value, dtype=np.int32))
        elif ov.kind == "learning_rate":
            self._lr_value = np.float32(value)
        elif ov.kind == "extra":
            self._backend.write(self._extras[ov.extra], value)
        else:
            self._backend.write(self._view(ov.slot, self._vars[ov.var]), value)

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Set the optimizer variables from a list in ``variables`` order (Keras semantics)."""
        if not self.built:
            raise ValueError(
                "You are calling `set_weights()` on an optimizer that has not "
                "yet been built. Please call "
                "`optimizer.build(trainable_variables)` to create the "
                "optimizer weights before calling `set_weights()`."
            )
        pairs = list(zip(self._opt_vars, weights))
        for ov, weight in pairs:  # check every shape first: all or nothing
            shape = self._opt_var_shape(ov)
            if tuple(np.shape(weight)) != shape:
                raise ValueError(
                    f"Optimizer variable {ov.name} has shape {shape} not compatible with "
                    f"provided weight shape {tuple(np.shape(weight))}."
                )
        for ov, weight in pairs:
            self._opt_var_set(ov, weight)

    def save_own_variables(self, store: dict[str, Any]) -> None:
        """Fill ``store`` exactly as Keras does: ``store[str(i)]`` = i-th optimizer variable."""
        for i, value in enumerate(self._opt_var_values()):
            store[str(i)] = value

    def load_own_variables(self, store: Mapping[str, Any]) -> None:
        """Load a store written by ``save_own_variables`` here or by a Keras Adamax."""
        if len(store.keys()) != len(self._opt_vars):
            msg = (
                f"Skipping variable loading for optimizer '{self.name}', "
                f"because it has {len(self._opt_vars)} variables whereas "
                f"the saved optimizer has {len(store.keys())} variables. "
            )
            if len(self._opt_vars) == 0:
                msg += "This is likely because the optimizer has not been called/built yet."
            warnings.warn(msg, stacklevel=2)
            return
        values = [np.asarray(store[str(i)]) for i in range(len(self._opt_vars))]
        for ov, value in zip(self._opt_vars, values):
            if tuple(value.shape) != self._opt_var_shape(ov):
                raise ValueError(
                    f"Store entry {self._opt_vars.index(ov)} ({ov.name}) has shape "
                    f"{tuple(value.shape)}; expected {self._opt_var_shape(ov)}."
                )
        for ov, value in zip(self._opt_vars, values):
            self._opt_var_set(ov, value)

    def _resolve_target(self, name: str) -> tuple[str, Any]:
        if name in self._var_index:
            return "model", self._vars[self._var_index[name]]
        for ov in self._opt_vars:
            if ov.name == name:
                return "opt", ov
        raise KeyError(f"Unknown variable: {name!r}.")

    def _assign_op(self, name: str, value: Any, op: Callable[[np.ndarray, np.ndarray], np.ndarray] | None) -> None:
        kind, target = self._resolve_target(getattr(name, "name", name))
        if kind == "model":
            current = self._backend.to_host(self._view("w", target))
            value = np.asarray(value)
            if value.shape != current.shape:
                raise ValueError(
                    "The shape of the target variable and the shape of the target value in "
                    f"`variable.assign(value)` must match. variable.shape={current.shape}, "
                    f"Received: value.shape={value.shape}. Target variable: {target.name}"
                )
            new = value.astype(current.dtype) if op is None else op(current, value.astype(current.dtype))
            self._backend.write(self._view("w", target), new)
        else:
            current = self._opt_var_get(target)
            new = np.asarray(value) if op is None else op(current, np.asarray(value).astype(current.dtype))
            self._opt_var_set(target, np.asarray(new).astype(current.dtype))

    def assign(self, variable: str, value: Any) -> None:
        """Assign a value to a model or optimizer variable, by name."""
        self._assign_op(variable, value, None)

    def assign_add(self, variable: str, value: Any) -> None:
        self._assign_op(variable, value, np.add)

    def assign_sub(self, variable: str, value: Any) -> None:
        self._assign_op(variable, value, np.subtract)

    def stateless_apply(
        self, optimizer_variables: Sequence[Any], grads: Sequence[Any], trainable_variables: Sequence[Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Apply ``grads`` to the given values; return (new trainable, new optimizer) lists.

        The optimizer's own state is left exactly as it was.
        """
        if not self.built:
            raise ValueError(
                "To call `stateless_apply`, Adamax must be built (i.e. its variables must have "
                "been created). You can build it via `optimizer.build(trainable_variables)`."
            )
        if len(optimizer_variables) != len(self._opt_vars):
            raise ValueError(
                "Argument `optimizer_variables` must be a list of tensors "
                "corresponding 1:1 to Adamax().variables. "
                f"Received list with length {len(optimizer_variables)}, but "
                f"expected {len(self._opt_vars)} variables."
            )
        if len(trainable_variables) != len(self._vars):
            raise ValueError(
                "Argument `optimizer_variables` must be a list of tensors "
                "corresponding 1:1 to the trainable variables list that "
                "the optimizer was built with. Received "
                f"len(trainable_variables) == {len(trainable_variables)} "
                "whereas the optimizer was built with "
                f"{len(self._vars)} variables."
            )
        saved_opt = self._opt_var_values()
        saved_w = self._host_slot("w")
        saved_lr = self._lr_value
        try:
            for v, value in zip(self._vars, trainable_variables):
                value = np.asarray(value)
                if value.shape != v.shape:
                    raise ValueError(
                        f"trainable_variables entry for {v.name!r} has shape {value.shape}; "
                        f"expected {v.shape}."
                    )
            self.set_weights(list(optimizer_variables))
            for v, value in zip(self._vars, trainable_variables):
                self._backend.write(self._view("w", v), np.asarray(value))
            self.apply(list(grads))
            new_trainable = self._host_slot("w")
            new_opt = self._opt_var_values()
        finally:
            for ov, value in zip(self._opt_vars, saved_opt):
                self._opt_var_set(ov, value)
            for v, value in zip(self._vars, saved_w):
                self._backend.write(self._view("w", v), value)
            self._lr_value = saved_lr
        return new_trainable, new_opt

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict[str, Any]:
        """The Keras config dict; ``keras.optimizers.Adamax.from_config`` accepts it."""
        if _is_schedule(self._learning_rate):
            learning_rate: Any = lr_schedules.serialize(self._learning_rate)
        elif self._lr_value is not None:
            learning_rate = float(self._lr_value)
        elif callable(self._learning_rate):
            fn = self._learning_rate
            learning_rate = {
                "module": getattr(fn, "__module__", None),
                "class_name": "function",
                "config": getattr(fn, "__name__", repr(fn)),
                "registered_name": "function",
            }
        else:  # pragma: no cover - mirrors Keras's fallback
            learning_rate = 0.5
        return {
            "name": self.name,
            "learning_rate": learning_rate,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "loss_scale_factor": self.loss_scale_factor,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], custom_objects: Any = None, device: str = "auto"
    ) -> Adamax:
        """Create an optimizer from a Keras ``get_config()`` dict (schedules included)."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = lr_schedules.deserialize(config["learning_rate"])
        return cls(**config, device=device)

    def __repr__(self) -> str:
        state = f"{len(self._vars)} variables" if self.built else "not built"
        return f"<Adamax name={self.name!r} backend={self._backend.name} {state} iterations={self.iterations}>"


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
