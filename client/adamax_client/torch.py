"""``adamax_client.torch.RemoteAdamax``: a ``torch.optim.Optimizer`` whose update runs on adamax-ps.

::

    from adamax_client.torch import RemoteAdamax

    opt = RemoteAdamax(model.named_parameters(), target="127.0.0.1:50051", optimizer="job",
                       mode="sync", num_workers=2, learning_rate=1e-3)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # gradients leave in buckets while backward runs
        opt.step()                        # waits for the server; new weights are in the params

The update is Keras's Adamax, bit for bit (``keras.optimizers.Adamax`` with the same arguments),
computed by the server; the optimizer holds no state of its own.

Variable names
    ``named_parameters()`` (or param groups whose ``params`` are ``(name, param)`` pairs) give the
    server's variable names. Plain parameters get ``"group{g}.param{i}"`` (group index, index in
    the group): stable as long as the groups are built the same way, so a job can be resumed.

Overlap
    With overlap on (``overlap="auto"``, the default, turns it on for CUDA parameters and when the
    host has cores left beyond its workers' compute threads) a post-accumulate-grad hook on every parameter collects the
    gradients as backward produces them; every ``bucket_cap_mb`` megabytes a bucket goes to a
    communication thread, which streams it into the step's push while backward goes on (DDP's
    scheme). ``step()`` sends the rest (a parameter whose ``.grad`` is None has no gradient),
    waits for the push and pulls the new weights into the parameters. With ``prefetch=True``
    (default) the communication thread pulls as soon as the push is answered (never before
    ``step()`` is called: autograd may still read the parameters until backward returns).
    Consequences: gradients are read while backward runs, so do not change them in place between
    ``backward()`` and ``step()`` (clip on the server with ``clipnorm`` / ``global_clipnorm``, which
    is Keras-exact, or pass ``overlap=False``); and accumulate over several backward passes inside
    ``with opt.no_sync():`` (the last backward outside it pushes the sum), as with DDP.

Learning rate
    Keras Adamax has one learning rate, so every param group must carry the same ``lr``. A float
    ``learning_rate`` (or ``lr``) becomes ``param_groups[i]["lr"]``; a torch LR scheduler that
    writes it is sent to the server (``SetLearningRate``) before the next push, so the server's
    ``learning_rate`` follows the scheduler step for step. A Keras schedule given as
    ``learning_rate`` is evaluated by the server at its own iteration count (like Keras); then
    ``param_groups[i]["lr"]`` shows the rate at creation and must not be changed.
    ``weight_decay`` per group: a group with ``weight_decay=0`` is excluded from weight decay
    (Keras ``exclude_from_weight_decay``); other values must equal the optimizer's.

State
    ``state_dict()`` holds the server's Keras optimizer state (``save_own_variables``: iteration,
    learning rate, moments, EMA and accumulators) as tensors; ``load_state_dict()`` writes it and
    the parameters' current values back to the server, so ``torch.save(model.state_dict())``,
    ``torch.save(opt.state_dict())`` and a later load (model first) resume exactly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

from adamax_client import _threads
from adamax_client._settings import KERAS_DEFAULTS
from adamax_client.remote import PushResult
from adamax_client.remote import RemoteAdamax as _Client
from adamax_wire.tensors import RowSparseGradient

__all__ = ["RemoteAdamax", "parameter_names"]

_log = logging.getLogger("adamax_client")
_END = object()
_ABORT = object()


class PushAborted(RuntimeError):
    """A step's push was cut before all its gradients were sent (nothing was applied)."""
_ALIGN = 64
_SERVER_DTYPES = (torch.float16, torch.float32, torch.float64)


def parameter_names(params: Any) -> list[list[str]]:
    """The variable names ``RemoteAdamax(params)`` uses, per param group (no server needed)."""
    groups = _as_groups(params)
    names: list[list[str]] = []
    for g, group in enumerate(groups):
        group_names = []
        for i, item in enumerate(group["params"]):
            group_names.append(str(item[0]) if isinstance(item, tuple) else f"group{g}.param{i}")
        names.append(group_names)
    return names


def _as_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if isinstance(items[0], dict):
        return [dict(g, params=list(g["params"])) for g in items]
    return [{"params": items}]


def _targets(remote: Any) -> list[str]:
    """The server address, or a sharded job's shard list."""
    return list(getattr(remote, "targets", None) or [remote._transport.target])


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Step:
    """One step's push: gradients queued by the hooks and ``step()``, streamed by the comm thread."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sent: set[str] = set()
        self.bucket: list[tuple[str, Any, Any]] = []  # (name, value, cuda event or None)
        self.bucket_bytes = 0
        self.future: concurrent.futures.Future[PushResult] | None = None
        self.lr_sent: float | None = None
        self.streamed = 0  # tensors handed to the transport so far
        # Set by step(): parameters are written only from then on (autograd may still read them
        # for gradients of inputs after the last parameter's hook fired).
        self.step_called = threading.Event()

    def items(self) -> Iterator[tuple[str, Any]]:
        while True:
            bucket = self.queue.get()
            if bucket is _END:
                return
            if bucket is _ABORT:
                raise PushAborted("the step's push was cut; the server applies nothing of it")
            for name, value, event in bucket:
                if event is not None:
                    event.synchronize()  # the gradient's device-to-host copy is done
                yield name, value
                self.streamed += 1


class RemoteAdamax(torch.optim.Optimizer):
    """Keras Adamax on an adamax-ps server, as a ``torch.optim.Optimizer`` (see the module docs).

    Args:
        params: ``model.named_parameters()``, parameters, or param groups (dicts).
        target: ``"host:port"`` of the server, or a sharded job's shard list (``["h0:p", "h1:p"]``
            or ``"h0:p,h1:p"``): the same results, each push and pull spread over the shards.
        optimizer: the job's name on the server (default ``"job"``).
        worker_id: this worker's id (default: host-pid-random). Give stable ids in sync mode.
        mode, num_workers: ``"async"`` or ``"sync"``; workers in the job (sync rounds need N, or
            ``min_workers=K``).
        if_exists: what to do when the job already exists on the server: ``"resume"`` (default:
            attach and continue from its state; how the other workers of a job join it),
            ``"error"``, or ``"replace"`` (delete it and start over; for the job's first worker).
        overlap: push gradients while backward runs (hooks and buckets), True; or all at ``step()``,
            False. ``"auto"`` (default): on for CUDA parameters (the CPU is free during backward)
            and when this host has more cores than its workers' compute threads; off when the
            workers' threads fill every core, where copying gradients during backward only takes
            cycles and cache from it (measured: benchmarks/bench_adapters.py).
        bucket_cap_mb: bucket size of the overlapped push.
        prefetch: pull the new weights as soon as the push is answered.
        threads: torch intra-op threads: ``"auto"`` (split the cores over ``local_workers``;
            only ever lowers the count), a number, or None.
        local_workers: worker processes on this host (default: ``num_workers``).
        lr: alias of ``learning_rate`` (torch spelling).
        **kwargs: ``keras.optimizers.Adamax`` arguments (learning_rate, beta_1, beta_2, epsilon,
            weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
            ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps) and
            ``adamax_client.RemoteAdamax`` service arguments (min_workers, aggregation, token,
            credentials, bulk, timeout, ...).
    """

    def __init__(
        self,
        params: Any,
        target: str | Sequence[str],
        optimizer: str = "job",
        worker_id: str | None = None,
        mode: str = "async",
        num_workers: int = 1,
        *,
        if_exists: str = "resume",
        overlap: bool | str = "auto",
        bucket_cap_mb: float = 4.0,
        prefetch: bool = True,
        threads: int | str | None = "auto",
        local_workers: int | None = None,
        lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if lr is not None:
            if "learning_rate" in kwargs:
                raise ValueError("Pass `learning_rate` or `lr`, not both.")
            kwargs["learning_rate"] = lr
        learning_rate = kwargs.get("learning_rate", KERAS_DEFAULTS["learning_rate"])
        self._lr_is_schedule = not isinstance(learning_rate, (int, float, np.floating))
        weight_decay = kwargs.get("weight_decay")
        groups = _as_groups(params)
        self._names_per_group = parameter_names(groups)
        defaults = {"lr": float(learning_rate) if not self._lr_is_schedule else math.nan, "weight_decay": weight_decay}
        self._built = False
        super().__init__(groups, defaults)
        self._params: list[torch.Tensor] = []
        self._names: list[str] = []
        for group, names in zip(self.param_groups, self._names_per_group):
            self._params.extend(group["params"])
            self._names.extend(names)
        if len(set(self._names)) != len(self._names):
            dup = sorted({n for n in self._names if self._names.count(n) > 1})
            raise ValueError(f"Parameter names must be unique across param groups. Repeated: {dup}")
        for name, p in zip(self._names, self._params):
            if p.dtype not in _SERVER_DTYPES:
                raise TypeError(
                    f"Parameter '{name}' is {p.dtype}; the server keeps float16, float32 or float64 "
                    "variables (keep a float32 master copy for bfloat16 training)."
                )
        self._index = {name: i for i, name in enumerate(self._names)}
        self._name_of = {id(p): name for name, p in zip(self._names, self._params)}
        if overlap not in (True, False, "auto"):
            raise ValueError(f"`overlap` must be True, False or 'auto'. Received: overlap={overlap!r}")
        self.prefetch = bool(prefetch)
        self._bucket_cap = max(1, int(bucket_cap_mb * (1 << 20)))
        self._cuda = any(p.is_cuda for p in self._params)
        self._lock = threading.Lock()
        self._step_state: _Step | None = None
        self._deferred = 0  # inside no_sync()
        self._last_result: PushResult | None = None
        self._closed = False
        self._group_lr()  # one learning rate for every group
        _threads.apply_torch_threads(target, local_workers or num_workers, threads)
        self.overlap = (
            bool(overlap) if overlap != "auto"
            else self._cuda or _threads.available_cores() > (local_workers or num_workers) * torch.get_num_threads()
        )
        self.remote = _Client(
            target, worker_id, mode=mode, num_workers=num_workers, optimizer=optimizer,
            **({"if_exists": if_exists} if if_exists != "resume" else {}), **kwargs,
        )  # fmt: skip
        weakref.finalize(self, self.remote.close)  # sockets and shared memory, also at exit
        self._comm = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adamax-ps-comm")
        self._staging: dict[str, torch.Tensor] = {}  # pinned host copies of CUDA params / grads
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._lr_sent = self._group_lr()
        if self._lr_is_schedule:
            current = float(self.remote.learning_rate)
            for group in self.param_groups:
                group["lr"] = current
            self._lr_sent = current
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params if p.requires_grad
        ]
        self._built = True

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_built", False):
            raise RuntimeError(
                "A remote optimizer's variables are fixed once it is built on the server; create "
                "the optimizer with all param groups (or a new job for new parameters)."
            )
        super().add_param_group(param_group)

    def _host_array(self, name: str, p: torch.Tensor) -> np.ndarray:
        """A host numpy view of ``p`` (CPU, contiguous: its memory) or of its pinned staging copy."""
        t = p.detach()
        if t.device.type == "cpu" and t.is_contiguous():
            return t.numpy()
        staging = self._staging.get(name)
        if staging is None or staging.shape != t.shape or staging.dtype != t.dtype:
            staging = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda and torch.cuda.is_available())
            self._staging[name] = staging
        return staging.numpy()

    def _build(self) -> None:
        variables = OrderedDict()
        for name, p in zip(self._names, self._params):
            variables[name] = p.detach().to("cpu").contiguous().numpy()
        excluded = [
            n
            for group, names in zip(self.param_groups, self._names_per_group)
            if group.get("weight_decay") == 0 and self.remote_weight_decay
            for n in names
        ]
        for group in self.param_groups:
            wd = group.get("weight_decay")
            if wd not in (0, None, self.defaults["weight_decay"]):
                raise ValueError(
                    "Keras Adamax has one `weight_decay`; a param group may only turn it off "
                    f"(weight_decay=0). Received a group with weight_decay={wd}."
                )
        if excluded and not self.remote.built:
            self.remote.exclude_from_weight_decay(var_list=excluded)
        built_now = self.remote.build(variables)
        if not built_now:  # the job existed: its weights win
            _log.info(
                "worker '%s' joined job '%s' at iteration %d", self.remote.worker_id, self.remote.key,
                self.remote.iterations,
            )
            self._pull_into_params()
            self._copy_staging_to_device()

    @property
    def remote_weight_decay(self) -> bool:
        return bool(self.defaults["weight_decay"])

    # ------------------------------------------------------------------ hooks and pushes

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally; the next one outside pushes the sum."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def _group_lr(self) -> float:
        rates = {float(g["lr"]) for g in self.param_groups}
        if len(rates) != 1 and not all(math.isnan(r) for r in rates):
            raise ValueError(
                f"Keras Adamax has one learning rate, but the param groups have lr={sorted(rates)}; "
                "give every group the same lr."
            )
        return rates.pop()

    def _open(self) -> _Step:
        """The current step's push, started on the comm thread when the first bucket is ready."""
        state = self._step_state
        if state is None:
            state = self._step_state = _Step()
            lr = self._group_lr()
            if lr != self._lr_sent:
                if self._lr_is_schedule:
                    raise ValueError(
                        "This optimizer's learning_rate is a Keras schedule evaluated by the server; "
                        "param_groups[...]['lr'] cannot be changed (create it with a float "
                        "learning_rate to drive it from a torch scheduler)."
                    )
                state.lr_sent = lr
            state.future = self._comm.submit(self._run_push, state)
        return state

    def _run_push(self, state: _Step) -> PushResult:
        if state.lr_sent is not None:
            self.remote.learning_rate = state.lr_sent
        total = sum(_aligned(p.numel() * p.element_size()) for p in self._params)
        result = self.remote.push_stream(state.items(), num_tensors=len(self._params), nbytes=total)
        if self.prefetch and result.applied:
            state.step_called.wait()
            self._pull_into_params()
        return result

    def _grad_value(self, name: str, p: torch.Tensor) -> tuple[Any, Any]:
        """(host value of p.grad for the wire, CUDA event to wait for or None)."""
        g = p.grad
        if g is None:
            return None, None
        g = g.detach()
        if g.is_sparse:
            g = g.coalesce()
            indices, values = g.indices()[0], g.values()
            return RowSparseGradient(indices.cpu().numpy(), values.cpu().contiguous().numpy()), None
        if g.device.type == "cpu":
            return g.numpy(), None
        staging = self._staging.get("grad:" + name)
        if staging is None or staging.shape != g.shape or staging.dtype != g.dtype:
            staging = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
            self._staging["grad:" + name] = staging
        staging.copy_(g, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return staging.numpy(), event

    def _add(self, state: _Step, name: str, p: torch.Tensor, *, flush: bool) -> None:
        value, event = self._grad_value(name, p)
        state.sent.add(name)
        state.bucket.append((name, value, event))
        state.bucket_bytes += p.numel() * p.element_size() if value is not None else 0
        if flush or state.bucket_bytes >= self._bucket_cap:
            state.queue.put(state.bucket)
            state.bucket, state.bucket_bytes = [], 0

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.overlap or self._deferred or self._closed:
            return
        name = self._name_of.get(id(p))
        if name is None:
            return
        with self._lock:
            state = self._open()
            if name in state.sent:
                self._abort(state)
                raise RuntimeError(
                    f"Gradient of '{name}' was computed again after it was pushed: a second backward "
                    "before step(). Accumulate inside `with optimizer.no_sync():` (the last backward "
                    "outside it pushes), or create the optimizer with overlap=False."
                )
            self._add(state, name, p, flush=False)

    def _abort(self, state: _Step) -> None:
        """Cut the step's push (the server applies nothing) and wait until the comm thread is free."""
        self._step_state = None
        state.queue.put(_ABORT)
        state.step_called.set()
        if state.future is not None:
            try:
                state.future.result(timeout=self.remote.timeout)
            except Exception:  # PushAborted, or how the transport reported the cut
                pass

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Push this step's gradients, wait for the server, write the new weights in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:
            state = self._open()
            self._step_state = None
            for name, p in zip(self._names, self._params):
                if name not in state.sent:
                    self._add(state, name, p, flush=False)
            state.queue.put(state.bucket)
            state.queue.put(_END)
            state.step_called.set()
        assert state.future is not None
        result = state.future.result()
        self._last_result = result
        if not self.prefetch or not result.applied:
            self._pull_into_params()
        self._copy_staging_to_device()
        return loss

    def _pull_into_params(self) -> None:
        out = OrderedDict((name, self._host_array(name, p)) for name, p in zip(self._names, self._params))
        self.remote.pull_into(out)
        for name, p in zip(self._names, self._params):
            if name in self._staging and not p.is_cuda:
                p.detach().copy_(self._staging[name])  # a non-contiguous CPU parameter

    def _copy_staging_to_device(self) -> None:
        """CUDA parameters: copy the pulled weights from their pinned host staging."""
        if not self._cuda:
            return
        for name, p in zip(self._names, self._params):
            if p.is_cuda:
                p.detach().copy_(self._staging[name], non_blocking=True)
        torch.cuda.current_stream().synchronize()

    # ------------------------------------------------------------------ state

    @property
    def iterations(self) -> int:
        """The server's Keras ``iterations`` for the weights this worker holds (its last pull)."""
        return self.remote.last_iterations

    @property
    def streamed_tensors(self) -> int:
        """Gradients of the current step already handed to the transport: read right after
        ``backward()`` it shows how much of the push overlapped with backward (0 after ``step()``)."""
        state = self._step_state
        return 0 if state is None else state.streamed

    @property
    def last_result(self) -> PushResult | None:
        """What the server did with the last push."""
        return self._last_result

    def state_dict(self) -> dict[str, Any]:
        """Torch's param-group state plus the server's Keras optimizer state (as tensors)."""
        sd = super().state_dict()
        store: dict[str, Any] = {}
        self.remote.save_own_variables(store)
        sd["adamax_ps"] = {
            "optimizer": self.remote.key,
            "names": list(self._names),
            "store": {k: torch.from_numpy(np.array(v)) for k, v in store.items()},
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore param groups, then the server's state and weights (load the model's first)."""
        state_dict = dict(state_dict)
        remote = state_dict.pop("adamax_ps", None)
        if remote is None:
            raise ValueError("This state dict has no 'adamax_ps' entry: it was not saved by adamax_client.torch.")
        if list(remote["names"]) != self._names:
            raise ValueError(
                f"The saved optimizer has variables {remote['names'][:5]}... but this one has "
                f"{self._names[:5]}...; build the optimizer over the same parameters."
            )
        if self._step_state is not None:
            raise RuntimeError("Cannot load a state dict between backward() and step().")
        super().load_state_dict(state_dict)
        for name, p in zip(self._names, self._params):
            self.remote.assign(name, p.detach().to("cpu").numpy())
        store = {k: v.numpy() for k, v in remote["store"].items()}
        self.remote.load_own_variables(store)
        self._lr_sent = float(self.remote.learning_rate) if not self._lr_is_schedule else self._lr_sent
        if not self._lr_is_schedule:
            for group in self.param_groups:
                group["lr"] = self._lr_sent
        self._pull_into_params()  # the version this worker holds (the values it just wrote)
        self._copy_staging_to_device()

    # ------------------------------------------------------------------ lifecycle

    def delete(self) -> bool:
        """Delete the job on the server (its weights and state) and close this optimizer."""
        deleted = self.remote.delete()
        self.close()
        return deleted

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        comm = getattr(self, "_comm", None)
        if comm is not None:
            state = self._step_state
            if state is not None:
                self._step_state = None
                state.queue.put(_ABORT)
                state.step_called.set()
            comm.shutdown(wait=True, cancel_futures=True)
        remote = getattr(self, "remote", None)
        if remote is not None:
            remote.close()

    def __enter__(self) -> RemoteAdamax:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<adamax_client.torch.RemoteAdamax {self.remote.key!r} at {','.join(_targets(self.remote))} "
            f"worker={self.remote.worker_id!r} mode={self.remote.mode} params={len(self._params)}>"
        )
