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
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adamax_server.optim import schedules as lr_schedules
from adamax_server.optim.kernels import get_backend
from adamax_server.optim.kernels.base import (
    FlatGroup,
    SegmentTable,
)
from adamax_server.optim.state import StateMixin
from adamax_server.optim.step import StepMixin
from adamax_server.optim.kernels.base import DeviceStagedArray
from adamax_server.optim.variables import (
    SUPPORTED_VARIABLE_DTYPES,
    RowSparseGradient,
    _auto_name,
    _is_schedule,
    _looks_like_keras_schedule,
    _OptVar,
    _Var,
)


__all__ = ["Adamax", "DeviceStagedArray", "RowSparseGradient"]


class Adamax(StepMixin, StateMixin):
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

    def apply(self, grads: Any, trainable_variables: Any = None, *,
              on_missing: Callable[[list[str]], None] | None = None) -> None:
        """Apply one step of gradients.

        Args:
            grads: a list aligned with the build order, or a mapping name -> gradient. ``None``
                means no gradient for that variable. A gradient is an array (float16, bfloat16,
                float32 or float64; upcast to the variable dtype) or a ``RowSparseGradient``.
            trainable_variables: optional. Before ``build``, a mapping name -> initial value to
                build with. Afterwards, the variable names that ``grads`` (a list) refer to.
            on_missing: called with the names of variables that got no gradient, instead of
                Keras's warning (whose ``model.compile()`` hint means nothing on a server).
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
                self._apply_aligned(aligned, warn_for=[n for g, n in zip(grads, names) if g is None],
                                    on_missing=on_missing)
                return
        self._apply_aligned(aligned, on_missing=on_missing)

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


