"""The update step of ``Adamax``: gradients in (lists, staging buffers, row-sparse), accumulation,
clipping scalars, schedules and the backend's fused kernel call."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from adamax_server.optim.kernels.base import (
    ACC_NONE,
    ACC_ONLY,
    ACC_UPDATE,
    CLIP_GLOBAL,
    CLIP_NONE,
    CLIP_NORM,
    CLIP_VALUE,
    DeviceStagedArray,
    FlatGroup,
    GroupStep,
)
from adamax_server.optim.variables import (
    RowSparseGradient,
    _as_dtype_scalar,
    _is_same_array,
    _is_schedule,
    _keras_global_scale,
    _Var,
)


class StepMixin:
    """The step half of ``Adamax`` (see ``adamax_server.optim.engine``)."""

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

    def _apply_aligned(self, grads: list[Any], warn_for: list[str] | None = None,
                       on_missing: Callable[[list[str]], None] | None = None) -> None:
        present = [g is not None for g in grads]
        if not any(present):
            raise ValueError("No gradients provided for any variable.")
        missing = [v.name for v, p in zip(self._vars, present) if not p] if warn_for is None else warn_for
        if missing and on_missing is not None:
            on_missing(missing)
        elif missing:
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

    def new_gradient_set(self) -> dict[str, np.ndarray]:
        """Host arrays laid out like the gradient staging buffers (one flat array per dtype group).

        A server receives a push into a set (``gradient_set_view``) while another push is being
        applied, then makes it the staging buffers with ``exchange_gradient_buffers``: the
        gradients are applied where they landed, with no copy.
        """
        if not self.built:
            raise ValueError("The optimizer must be built before `new_gradient_set`.")
        return {gname: np.empty(group.size, dtype=group.dtype) for gname, group in self._groups.items()}

    def current_gradient_set(self) -> dict[str, np.ndarray]:
        """The staging buffers themselves, as a gradient set (host engines): what the next
        ``exchange_gradient_buffers`` returns."""
        return {gname: group.buffers["g"] for gname, group in self._groups.items()}

    def gradient_set_layout(self) -> tuple[tuple[str, int, str], ...]:
        """(group, elements, dtype) of every staging buffer: what a gradient set must match."""
        return tuple((gname, int(group.size), group.dtype.str) for gname, group in self._groups.items())

    def gradient_set_view(self, gradient_set: dict[str, np.ndarray], name: str) -> np.ndarray:
        """The flat slice of ``gradient_set`` (from ``new_gradient_set``) that holds ``name``'s gradient."""
        v = self._require_var(name)
        off = int(self._groups[v.group].table.offsets[v.seg])
        return gradient_set[v.group][off : off + v.size]

    def exchange_gradient_buffers(self, gradient_set: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Make ``gradient_set`` the staging buffers (host engines only); returns the previous ones.

        A following ``apply`` whose gradients are views of the set (``gradient_set_view``) copies
        nothing for them; gradients elsewhere are written into the set as usual.
        """
        if not self.host_staging:
            raise ValueError("`exchange_gradient_buffers` needs a host engine (host_staging).")
        for gname, group in self._groups.items():
            buf = gradient_set.get(gname)
            if not isinstance(buf, np.ndarray) or buf.shape != (group.size,) or buf.dtype != group.dtype:
                raise ValueError(f"gradient set for group {gname!r} must be a flat {group.dtype} array of {group.size}")
        previous = {}
        for gname, group in self._groups.items():
            previous[gname] = group.buffers["g"]
            group.buffers["g"] = gradient_set[gname]
        return previous

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

    def _step_modes(self) -> tuple[int, int, int, Any, bool]:
        """What the next step does: (accumulation mode, clip mode, iterations, learning rate, EMA overwrite).

        Decided from the step counter and the config alone, so every shard of a sharded job
        decides the same (``sharding.shard_engine`` calls this too).
        """
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
            self.use_ema and self.ema_overwrite_frequency and (iterations + 1) % self.ema_overwrite_frequency == 0
        )
        return acc_mode, clip_mode, iterations, lr, overwrite

    def _run_step(self, present: list[bool]) -> None:
        """One Keras ``_backend_apply_gradients`` over every dtype group."""
        acc_mode, clip_mode, iterations, lr, overwrite = self._step_modes()
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
