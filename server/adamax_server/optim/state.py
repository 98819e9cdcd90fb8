"""Optimizer state access of ``Adamax``: EMA finalize, optimizer variables, ``set_weights``,
``save_own_variables`` / ``load_own_variables`` (Keras's store), ``assign*`` and ``stateless_apply``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from adamax_server.optim.variables import _OptVar


class StateMixin:
    """The state half of ``Adamax`` (see ``adamax_server.optim.engine``)."""

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
