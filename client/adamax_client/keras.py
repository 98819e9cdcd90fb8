"""``adamax_client.keras.RemoteAdamax``: a Keras 3 optimizer whose update runs on adamax-ps.

::

    from adamax_client.keras import RemoteAdamax

    model.compile(optimizer=RemoteAdamax(target="127.0.0.1:50051", optimizer="job",
                                         mode="sync", num_workers=2, learning_rate=1e-3),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=3)   # jit_compile stays on

The server computes Keras's Adamax (the arguments are ``keras.optimizers.Adamax``'s); this
optimizer keeps only ``iterations`` and ``learning_rate`` locally. Model variables are named on
the server by their Keras ``path`` (``name`` is not unique: ``kernel``, ``bias``, ``kernel``...),
less the leading components all of them share (``sequential/dense/kernel`` -> ``dense/kernel``):
Keras does not recreate the model's own scope in ``load_model``, and the names must survive it.
``variable_names(model.trainable_variables)`` shows them.

How a step leaves the compiled graph
    JAX backend: the trainer's jitted train step calls ``stateless_apply``; this optimizer
    replaces it by one ``jax.experimental.io_callback`` (ordered) that pushes the gradients and
    returns the pulled weights, so ``model.fit`` runs with ``jit_compile=True``. torch backend:
    the trainer calls ``apply`` eagerly, which pushes and pulls straight into the variables'
    tensors (excluded from ``torch.compile``). TensorFlow: eager only (``run_eagerly=True``);
    not tested here.

Learning rate
    A float ``learning_rate`` is a local variable as in Keras; ``LearningRateScheduler`` or
    ``optimizer.learning_rate = x`` changes it, and the new value is sent to the server before
    the next push. A ``LearningRateSchedule`` is sent to the server and evaluated there at the
    server's iteration count (this optimizer's ``iterations`` mirrors it).

Saving
    ``save_own_variables`` writes the server's Keras optimizer state (iteration, learning rate,
    moments, EMA, accumulators), so ``model.save()`` files hold exactly what a local Adamax would
    save. ``load_own_variables`` (and ``keras.models.load_model``) load it into the server and,
    at the next step, the model's current weights too, so training resumes exactly. The class is
    registered as ``adamax_ps>RemoteAdamax``: import ``adamax_client.keras`` before
    ``load_model``. The file keeps the server address and job, never the token: pass it with the
    ``ADAMAX_PS_TOKEN`` environment variable (or ``token=`` when compiling yourself).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from adamax_client import _threads
from adamax_client.errors import FailedPreconditionError
from adamax_client.remote import RemoteAdamax as _Client

__all__ = ["RemoteAdamax", "variable_names"]

_log = logging.getLogger("adamax_client")
try:
    from keras.src.utils.tracking import no_automatic_dependency_tracking as _no_tracking
except ImportError:  # pragma: no cover - a Keras without it does not track attributes either
    def _no_tracking(fn: Any) -> Any:
        return fn
_BACKEND = keras.backend.backend()
# Service arguments that go into get_config (so model.save() files reconnect); secrets never do.
_SAVED_SERVICE_ARGS = (
    "min_workers", "aggregation", "round_timeout", "round_timeout_policy", "max_staleness",
    "non_finite", "timeout", "gradient_wire_dtype", "bulk",
)  # fmt: skip


def _host_value(variable: Any) -> np.ndarray:
    """A variable's current value on the host, also while a jit trace is running."""
    raw = getattr(variable, "_value", None)
    if raw is None:
        raw = variable.value
    return np.array(keras.ops.convert_to_numpy(raw))


@keras.saving.register_keras_serializable(package="adamax_ps", name="RemoteAdamax")
class RemoteAdamax(keras.optimizers.Optimizer):
    """Keras Adamax on an adamax-ps server (see the module docs).

    Args:
        target: ``"host:port"`` of the server, or a sharded job's shard list (``["h0:p", "h1:p"]``
            or ``"h0:p,h1:p"``): the same results, each push and pull spread over the shards.
        optimizer: the job's name on the server (default ``"job"``).
        worker_id: this worker's id (default: host-pid-random); give stable ids in sync mode.
        mode, num_workers: ``"async"`` or ``"sync"``, and the workers in the job.
        if_exists: ``"resume"`` (default), ``"error"`` or ``"replace"`` when the job exists.
        threads: co-located workers: ``"auto"`` lowers torch's thread count (torch backend) or
            warns about JAX's (JAX backend); None leaves them alone.
        local_workers: worker processes on this host (default: ``num_workers``).
        learning_rate, beta_1, beta_2, epsilon, ...: ``keras.optimizers.Adamax`` arguments.
        **service_kwargs: ``adamax_client.RemoteAdamax`` arguments (min_workers, aggregation,
            round_timeout, token, credentials, bulk, timeout, ...).
    """

    def __init__(
        self,
        target: str | Sequence[str],
        optimizer: str = "job",
        worker_id: str | None = None,
        mode: str = "async",
        num_workers: int = 1,
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
        name: str = "remote_adamax",
        *,
        if_exists: str = "resume",
        threads: int | str | None = "auto",
        local_workers: int | None = None,
        **service_kwargs: Any,
    ) -> None:
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.target = target
        self.job = optimizer
        self.mode = mode
        self.num_workers = num_workers
        self.if_exists = if_exists
        self._explicit_worker_id = worker_id
        service_kwargs.setdefault("token", os.environ.get("ADAMAX_PS_TOKEN") or None)
        self._service_kwargs = dict(service_kwargs)
        if _BACKEND == "torch":
            _threads.apply_torch_threads(target, local_workers or num_workers, threads)
        elif _BACKEND == "jax" and threads == "auto":
            _threads.warn_xla_threads(target, local_workers or num_workers)
        keras_args = {
            "learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon,
            "weight_decay": weight_decay, "clipnorm": clipnorm, "clipvalue": clipvalue,
            "global_clipnorm": global_clipnorm, "use_ema": use_ema, "ema_momentum": ema_momentum,
            "ema_overwrite_frequency": ema_overwrite_frequency, "loss_scale_factor": loss_scale_factor,
            "gradient_accumulation_steps": gradient_accumulation_steps, "name": name,
        }  # fmt: skip
        self._remote = _Client(
            target, worker_id, mode=mode, num_workers=num_workers, optimizer=optimizer,
            **({"if_exists": if_exists} if if_exists != "resume" else {}), **service_kwargs, **keras_args,
        )  # fmt: skip
        weakref.finalize(self, self._remote.close)  # sockets and shared memory, also at exit
        self._lr_is_variable = isinstance(self._learning_rate, keras.Variable)
        self._lr_sent = float(learning_rate) if self._lr_is_variable else None
        self._paths: list[str] = []
        self._pending_store: dict[str, np.ndarray] | None = None
        self._pending_weights = False
        self._raw_iterations = 0

    @property
    def remote(self) -> _Client:
        """The underlying ``adamax_client.RemoteAdamax`` (pull, status, ...)."""
        return self._remote

    # ------------------------------------------------------------------ build

    def build(self, variables: Sequence[Any]) -> None:
        if self.built:
            return
        variables = list(variables)
        paths = variable_names(variables)
        if len(set(paths)) != len(paths):
            dup = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(f"Variable paths must be unique to name them on the server. Repeated: {dup}")
        self._set_trainable(variables)
        self._paths = paths
        try:
            built_now = self._remote.build(OrderedDict((p, _host_value(v)) for p, v in zip(paths, variables)))
        except FailedPreconditionError as exc:
            raise FailedPreconditionError(
                f"{exc} Keras names layers per process (dense, dense_1, ...): a worker that built "
                "other models first names its variables differently; name the layers."
            ) from exc
        if not built_now:  # the job existed: its weights (and step count) win
            for v, value in zip(variables, self._remote.pull().values()):
                v.assign(value)
            _log.info("worker '%s' joined job '%s' at iteration %d", self._remote.worker_id, self.job, self._remote.iterations)
        self._set_iterations_from_server()
        self.built = True
        if self._pending_store is not None:
            self._load_store(self._pending_store)

    def _set_iterations_from_server(self) -> None:
        store: dict[str, Any] = {}
        self._remote.save_own_variables(store)
        self._raw_iterations = int(np.asarray(store["0"]))
        self._set_local_iterations(self._raw_iterations)

    @_no_tracking
    def _set_trainable(self, variables: list[Any]) -> None:
        # Not tracked: the model's variables must not become this optimizer's `variables`.
        self._trainable_variables = variables[:]
        self._trainable_variables_indices = {self._var_key(v): i for i, v in enumerate(variables)}

    def _set_local_iterations(self, value: int) -> None:
        # A fresh numpy array: JAX shares the buffer of equal Python scalars between variables,
        # and the jitted train step donates its state (one buffer twice is an error).
        self._iterations.assign(np.array(value, dtype=self._iterations.dtype))

    # ------------------------------------------------------------------ the step

    def _index_of(self, variable: Any) -> int:
        return self._trainable_variables_indices[self._var_key(variable)]

    def _push_and_pull(self, lr: Any, grads: Sequence[Any], out: Mapping[str, np.ndarray] | None) -> tuple[list[np.ndarray], int]:
        """Host side of one step: send the learning rate if it changed, push, pull."""
        if self._lr_is_variable:
            rate = float(np.asarray(lr))
            if rate != self._lr_sent:
                self._remote.learning_rate = rate
                self._lr_sent = rate
        items = [(p, None if g is None else np.asarray(g)) for p, g in zip(self._paths, grads)]
        self._remote.push(OrderedDict(items))
        if out is not None:
            self._remote.pull_into(out)
            values = list(out.values())
        else:
            values = list(self._remote.pull().values())
        if self.gradient_accumulation_steps:
            self._raw_iterations += 1
        else:
            self._raw_iterations = self._remote.last_iterations
        return values, self._raw_iterations

    def _full_grads(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None) -> list[Any]:
        if trainable_variables is None:
            if len(grads) != len(self._paths):
                raise ValueError(
                    f"Received {len(grads)} gradients for the {len(self._paths)} variables the optimizer "
                    "was built with."
                )
            return list(grads)
        full: list[Any] = [None] * len(self._paths)
        for g, v in zip(grads, trainable_variables):
            full[self._index_of(v)] = g
        return full

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> None:
        """Push the gradients (eager; torch backend and ``run_eagerly``), write the new weights."""
        if len(grads) == 0:
            return
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:
                self.build(trainable_variables)
        elif not self.built:
            raise ValueError("Call `optimizer.build(trainable_variables)` before applying bare gradients.")
        if _BACKEND == "jax" and any(_is_tracer(g) for g in grads if g is not None):
            raise RuntimeError("Under jax.jit use stateless_apply (what model.fit does).")
        self._apply_eager(grads, trainable_variables)

    def _send_weights(self, values: Sequence[Any]) -> None:
        """After a load: the model's weights (now the loaded ones) replace the server's."""
        for path, value in zip(self._paths, values):
            self._remote.assign(path, np.asarray(value))
        self._pending_weights = False
        self._remote.pull()  # the version the next push is computed on (assignments bump it)

    def _apply_eager(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None) -> None:
        if self._pending_weights:
            self._send_weights([_host_value(v) for v in self._trainable_variables])
        full = self._full_grads(grads, trainable_variables)
        host = [None if g is None else keras.ops.convert_to_numpy(g) for g in full]
        out = None
        if _BACKEND == "torch":  # pull straight into the variables' CPU tensors
            views = [_torch_view(v) for v in self._trainable_variables]
            if all(view is not None for view in views):
                out = OrderedDict(zip(self._paths, views))
        values, iterations = self._push_and_pull(self._learning_rate_value(), host, out)
        if out is None:
            for v, value in zip(self._trainable_variables, values):
                v.assign(value)
        self._set_local_iterations(iterations)

    if _BACKEND == "torch":
        import torch as _torch

        _apply_eager = _torch.compiler.disable(_apply_eager)  # type: ignore[assignment]

    def _learning_rate_value(self) -> Any:
        return _host_value(self._learning_rate) if self._lr_is_variable else None

    def stateless_apply(self, optimizer_variables: Sequence[Any], grads: Sequence[Any], trainable_variables: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """The JAX trainer's step (also under jit): one ordered ``io_callback`` to the server."""
        if _BACKEND != "jax":
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        import jax
        from jax.experimental import io_callback

        if not self.built:
            raise ValueError("To call `stateless_apply`, the optimizer must be built.")
        opt_vars = list(self.variables)
        if len(optimizer_variables) != len(opt_vars):
            raise ValueError(
                f"Argument `optimizer_variables` must have {len(opt_vars)} entries (this optimizer's "
                f"`variables`). Received {len(optimizer_variables)}."
            )
        it_index = next(i for i, v in enumerate(opt_vars) if v is self._iterations)
        lr_index = next((i for i, v in enumerate(opt_vars) if v is self._learning_rate), None)
        present = [i for i, g in enumerate(grads) if g is not None]
        shapes = [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in trainable_variables]
        it_var = optimizer_variables[it_index]
        shapes.append(jax.ShapeDtypeStruct((), it_var.dtype))
        lr = optimizer_variables[lr_index] if lr_index is not None else np.float32(0)
        dtypes = [np.dtype(s.dtype) for s in shapes]

        # After a load, the loaded weights reach the server with the first step. JAX's trainer
        # detaches the variables' values during fit, so the traced step hands them to the
        # callback (only in a step traced while a load is pending).
        send_weights = self._pending_weights
        extra = list(trainable_variables) if send_weights else []

        def host_step(lr_value: Any, *args: Any) -> list[np.ndarray]:
            present_grads = args[: len(present)]
            if send_weights and self._pending_weights:
                self._send_weights(args[len(present) :])
            full: list[Any] = [None] * len(self._paths)
            for i, g in zip(present, present_grads):
                full[i] = g
            values, iterations = self._push_and_pull(lr_value if lr_index is not None else None, full, None)
            out = [np.asarray(v, dtype=d) for v, d in zip(values, dtypes)]
            out.append(np.asarray(iterations, dtype=dtypes[-1]))
            return out

        result = io_callback(host_step, shapes, lr, *[grads[i] for i in present], *extra, ordered=True)
        new_trainable = list(result[:-1])
        new_optimizer = list(optimizer_variables)
        new_optimizer[it_index] = result[-1]
        return new_trainable, new_optimizer

    # ------------------------------------------------------------------ state

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        """With ``use_ema``: the server's EMA weights replace the model's (like Keras)."""
        if not self.use_ema or not self.built:
            return
        self._remote.finalize_variable_values()
        values = self._remote.pull()
        by_key = {self._var_key(v): p for p, v in zip(self._paths, self._trainable_variables)}
        for v in var_list:
            path = by_key.get(self._var_key(v))
            if path is not None:
                v.assign(values[path])

    def save_own_variables(self, store: Any) -> None:
        """The server's Keras optimizer state, in Keras's store layout."""
        if not self.built:
            return
        state: dict[str, Any] = {}
        self._remote.save_own_variables(state)
        for key, value in state.items():
            store[key] = np.asarray(value)

    def load_own_variables(self, store: Any) -> None:
        """Load a Keras optimizer store into the server; the model's weights follow at the next step."""
        loaded = {str(k): np.array(store[k]) for k in store.keys()}
        self._pending_weights = True
        if not self.built:
            self._pending_store = loaded
            return
        self._load_store(loaded)

    def _load_store(self, store: dict[str, np.ndarray]) -> None:
        self._remote.load_own_variables(store)
        self._pending_store = None
        self._raw_iterations = int(store["0"])
        self._set_local_iterations(self._raw_iterations)
        if self._lr_is_variable and "1" in store:
            rate = float(store["1"])
            self._learning_rate.assign(np.array(rate, dtype=self._learning_rate.dtype))
            self._lr_sent = rate

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Set the server's optimizer variables (Keras ``variables`` order of a local Adamax)."""
        self._remote.set_weights(weights)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "target": self.target,
                "optimizer": self.job,
                "mode": self.mode,
                "num_workers": self.num_workers,
                "if_exists": "resume",
            }
        )
        if self._explicit_worker_id is not None:
            config["worker_id"] = self._explicit_worker_id
        for key in _SAVED_SERVICE_ARGS:
            if key in self._service_kwargs:
                config[key] = self._service_kwargs[key]
        return config

    def delete(self) -> bool:
        """Delete the job on the server."""
        return self._remote.delete()

    def close(self) -> None:
        self._remote.close()


def variable_names(variables: Sequence[Any]) -> list[str]:
    """The server's names of ``variables``: their Keras ``path`` without the leading components
    all of them share (the model's own scope, e.g. ``sequential/``, which ``load_model`` does not
    recreate), so a saved model and a freshly built one name their variables alike."""
    parts = [str(v.path).split("/") for v in variables]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    elif parts:
        common = len(parts[0]) - 1
    return ["/".join(p[common:]) for p in parts]


def _is_tracer(value: Any) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)


def _torch_view(variable: Any) -> np.ndarray | None:
    """A writable numpy view of a torch-backend variable's CPU tensor, or None."""
    tensor = getattr(variable, "value", None)
    if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return tensor.detach().numpy()
