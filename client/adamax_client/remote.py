"""``RemoteAdamax``: the Keras-shaped Adamax API, served by an adamax-ps parameter server.

It mirrors ``adamax_server.Adamax`` (build, apply, apply_gradients, iterations,
learning_rate, get_config, save/load_own_variables, set_weights, assign*,
finalize_variable_values, stateless_apply) and adds what a worker of a distributed job
needs: ``pull()`` of the current weights by version, worker ids and request ids on every
push, and sync/async coordination chosen when the optimizer is created.

Weights version: a worker computes gradients on the weights it pulled (``self.version``);
each push says so (``step``), which is how the server detects stale and late gradients. In
``sync`` mode, ``pull()`` after a push waits until the round closes.

Errors are :class:`adamax_client.errors.AdamaxError` subclasses (also ValueError / KeyError /
TypeError where the in-process engine raises those); no grpc or protobuf types escape.

The constructor takes one target, or the shard list of a sharded job (then the instance is
an ``adamax_client.sharded.ShardedRemoteAdamax``: the same API and results over every shard).
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import json

import grpc
import numpy as np

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_client.bulk import BULK_MODES, BulkChannel, BulkMode, BulkUnavailable
from adamax_client._settings import IF_EXISTS as _IF_EXISTS
from adamax_client._settings import KERAS_DEFAULTS as _KERAS_DEFAULTS
from adamax_client._settings import Replay as _Replay
from adamax_client._settings import default_worker_id as _default_worker_id
from adamax_client._settings import policy_proto as _policy_proto
from adamax_client._settings import serialize_learning_rate as _serialize_learning_rate
from adamax_client._settings import variable_name
from adamax_client._settings import OUTCOME_NAMES as _OUTCOME_NAMES
from adamax_client._settings import PushResult, VariableSpec
from adamax_client.errors import InvalidArgumentError, UnimplementedError
from adamax_client.transport import RetryPolicy, Transport

_log = logging.getLogger(__name__)
_BULK_BACKOFF, _BULK_BACKOFF_MAX = 5.0, 300.0  # seconds on gRPC after a transient bulk failure, doubling
# ``adamax_client.sharded.ShardedRemoteAdamax``, registered when that module is imported (the
# package does): what ``RemoteAdamax(shard_list)`` returns.
_SHARDED_CLASS: Any = None
_NO_BULK: Any = object()  # RemoteAdamax._bulk once the server turned out to have no bulk channel

class RemoteAdamax:
    """Adamax on a parameter server.

    Args:
        target: ``"host:port"`` of the server (a list of targets is reserved for sharding).
        worker_id: this worker's id; every push carries it. Default: host-pid-random.
        mode: ``"async"`` (each push is one update) or ``"sync"`` (rounds over workers).
        num_workers, min_workers: sync: workers in the job (N) and pushes that close a round (K).
        aggregation: sync: ``"mean"`` or ``"sum"`` of the round's gradients.
        round_timeout, round_timeout_policy: sync: seconds after a round's first push, and
            ``"close"`` (apply what arrived) or ``"abort"`` (discard; workers push again).
        max_staleness: async: reject gradients computed more than this many versions ago.
        non_finite: ``"reject"`` NaN/Inf gradients, or ``"skip"`` the step like LossScaleOptimizer.
        optimizer: key of the optimizer on the server (default: the Keras ``name``).
        timeout: default deadline in seconds of every call (retries included).
        gradient_wire_dtype: send gradients as "float16"/"bfloat16" to halve the bytes.
        credentials: ``grpc`` channel credentials (``adamax_client.tls_channel_credentials``).
        token: bearer token sent on every call when the server requires one.
        if_exists: when a job of this name exists on the server: ``"resume"`` (default; join it
            and continue from its state, which is how the other workers of a job attach; a
            different config or policy is an error), ``"error"`` (AlreadyExistsError), or
            ``"replace"`` (delete it and start over; for the job's first worker only).
        bulk: how pushes and pulls move tensor bytes. ``"auto"`` (default): the server's bulk
            channel when it offers one (raw TCP; shared memory when on the server's host),
            else gRPC. ``"tcp"``: the bulk channel without shared memory. ``"shm"``: like
            auto, warning when shared memory is refused. ``"off"``: gRPC streams only.
        **keras_kwargs: ``keras.optimizers.Adamax`` arguments (learning_rate, beta_1, ...).
    """

    def __new__(cls, target: str | Sequence[str] = "", *args: Any, sharded: bool | None = None, **kwargs: Any) -> RemoteAdamax:
        """A list of several targets (or ``"h0:p,h1:p"``, or ``sharded=True``) is a sharded job:
        the instance is an ``adamax_client.sharded.ShardedRemoteAdamax``, with the same API."""
        if cls is RemoteAdamax:
            targets = target.split(",") if isinstance(target, str) else list(target)
            if sharded or (sharded is None and len([t for t in targets if str(t).strip()]) > 1):
                if _SHARDED_CLASS is None:  # adamax_client/__init__ imports adamax_client.sharded
                    raise ImportError("import adamax_client (it registers the sharded client)")
                return super().__new__(_SHARDED_CLASS)
            if sharded is None:  # one target: a server, or the only shard of a sharded job
                instance = super().__new__(cls)
                instance._as_shard_args = (target, args, kwargs)
                return instance
        return super().__new__(cls)

    def __init__(
        self,
        target: str | Sequence[str],
        worker_id: str | None = None,
        *,
        mode: Literal["async", "sync"] = "async",
        num_workers: int = 1,
        min_workers: int | None = None,
        aggregation: Literal["mean", "sum"] = "mean",
        round_timeout: float | None = None,
        round_timeout_policy: Literal["close", "abort"] = "close",
        max_staleness: int | None = None,
        non_finite: Literal["reject", "skip"] = "reject",
        optimizer: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
        gradient_wire_dtype: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
        token: str | None = None,
        bulk: BulkMode = "auto",
        if_exists: Literal["resume", "error", "replace"] = "resume",
        **keras_kwargs: Any,
    ) -> None:
        keras_kwargs.pop("device", None)  # a server-side choice; accepted for engine parity
        keras_kwargs.pop("sharded", None)  # False here: one server
        unknown = sorted(set(keras_kwargs) - set(_KERAS_DEFAULTS) - {"name"})
        if unknown:
            raise ValueError(f"Argument(s) not recognized: { {k: keras_kwargs[k] for k in unknown} }")
        targets = [target] if isinstance(target, str) else list(target)
        if len(targets) != 1:
            raise ValueError(
                f"`target` must be one 'host:port' with sharded=False; pass the shard list without it "
                f"for a sharded job. Received: target={target!r}"
            )
        if gradient_wire_dtype is not None and gradient_wire_dtype not in _wire.FLOAT_WIRE_DTYPES:
            raise ValueError(
                f"`gradient_wire_dtype` must be one of {list(_wire.FLOAT_WIRE_DTYPES)} or None. "
                f"Received: gradient_wire_dtype={gradient_wire_dtype!r}"
            )
        config = {"name": keras_kwargs.pop("name", None) or "adamax", **_KERAS_DEFAULTS, **keras_kwargs}
        config["learning_rate"] = _serialize_learning_rate(config["learning_rate"])
        self.name: str = config["name"]
        self.key = optimizer or self.name
        self.worker_id = worker_id or _default_worker_id()
        self.mode = mode
        self.timeout = timeout
        self._chunk_bytes = chunk_bytes
        self._gradient_wire = gradient_wire_dtype
        self._policy = _policy_proto(
            mode, num_workers, min_workers, aggregation, round_timeout, round_timeout_policy, max_staleness, non_finite
        )
        self._transports = [
            Transport(
                t,
                timeout=timeout,
                retry=retry,
                credentials=credentials,
                channel_options=channel_options,
                interceptors=interceptors,
                token=token,
            )
            for t in targets
        ]
        if if_exists not in _IF_EXISTS:
            raise ValueError(f"`if_exists` must be one of {list(_IF_EXISTS)}. Received: if_exists={if_exists!r}")
        if bulk not in BULK_MODES:
            raise ValueError(f"`bulk` must be one of {list(BULK_MODES)}. Received: bulk={bulk!r}")
        self._bulk_mode = bulk
        self._bulk: Any = None  # BulkChannel once used; _NO_BULK when the server offers none
        self._bulk_retry_at = 0.0  # after a transient bulk failure: gRPC until then
        self._bulk_backoff = 0.0
        self._specs: list[VariableSpec] = []
        self._version = 0  # weights version this worker holds (last build/pull)
        self._expect_version = 0  # what pull() waits for by default
        self._cache: dict[tuple[str, ...], tuple[int, OrderedDict[str, np.ndarray]]] = {}
        self._closed = False
        self.last_iterations = 0  # the server's Keras iterations at this worker's last pull
        try:
            response = self._transport.unary(
                "CreateOptimizer",
                pb.CreateOptimizerRequest(
                    optimizer=self.key, config_json=json.dumps(config), policy=self._policy,
                    if_exists=_IF_EXISTS[if_exists],
                ),
            )
        except UnimplementedError:  # no AdamaxService there: the only shard of a sharded job?
            self.close()
            if _SHARDED_CLASS is not None and _SHARDED_CLASS.adopt(self, self.__dict__.pop("_as_shard_args", None)):
                return
            raise
        except BaseException:
            self.close()
            raise
        self.__dict__.pop("_as_shard_args", None)
        self._absorb_info(response.info)
        self.created = bool(response.created)  # False: the job existed and this worker resumes it
        if not self.created and response.info.iterations:
            _log.info(
                "worker '%s': resuming job '%s' at iteration %d", self.worker_id, self.key, response.info.iterations
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], target: str | Sequence[str] = "", **kwargs: Any) -> RemoteAdamax:
        """Create from a Keras ``get_config()`` dict; ``kwargs`` are the service arguments."""
        if not target:
            raise ValueError("`target` ('host:port' of the parameter server) is required.")
        return cls(target, **kwargs, **dict(config))

    # -------------------------------------------------------------- plumbing

    @property
    def _transport(self) -> Transport:
        return self._transports[0]

    def _transport_for(self, name: str) -> Transport:
        """The server holding variable ``name`` (one server for now; the sharding hook)."""
        return self._transports[0]

    def _ref(self) -> Any:
        return pb.OptimizerRef(optimizer=self.key)

    def _absorb_info(self, info: Any) -> Any:
        if info.built:
            self._specs = [
                VariableSpec(v.name, tuple(v.shape), _wire.numpy_dtype(v.dtype)) for v in info.variables
            ]
        return info

    def _info(self) -> Any:
        return self._absorb_info(self._transport.unary("GetOptimizer", self._ref()))

    def _frames(self, header: Any, items: Iterable[tuple[str, Any]], *, wire: str | None = None, group: int = 0) -> Iterator[bytes]:
        yield _wire.header_frame(header)
        for name, value in items:
            yield from _wire.tensor_frames(name, value, wire=wire, group=group, chunk_bytes=self._chunk_bytes)

    # -------------------------------------------------------------- Keras API: state

    @property
    def built(self) -> bool:
        if not self._specs:
            self._info()
        return bool(self._specs)

    @property
    def variable_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        if not self._specs:
            self._info()
        return [(s.name, s.shape, s.dtype) for s in self._specs]

    @property
    def version(self) -> int:
        """Weights version this worker holds (set by build and pull)."""
        return self._version

    @property
    def iterations(self) -> int:
        return int(self._info().iterations)

    @property
    def learning_rate(self) -> np.float32:
        return np.float32(self._info().learning_rate)

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if isinstance(value, (dict,)) or callable(value):
            raise TypeError("A remote optimizer's learning rate can only be set to a float.")
        self._absorb_info(
            self._transport.unary("SetLearningRate", pb.SetLearningRateRequest(optimizer=self.key, learning_rate=float(value)))
        )

    def get_config(self) -> dict[str, Any]:
        return dict(json.loads(self._info().config_json))

    def status(self) -> dict[str, Any]:
        """Server-side view: version, iterations, workers, round arrivals."""
        info = self._info()
        return {
            "optimizer": info.optimizer,
            "built": info.built,
            "version": info.version,
            "iterations": info.iterations,
            "workers": {w.worker_id: {"last_step": w.last_step, "pushes": w.pushes} for w in info.workers},
            "round_arrivals": list(info.round_arrivals),
        }

    # -------------------------------------------------------------- build / attach

    def build(self, variables: Mapping[str, Any]) -> bool:
        """Build with the model variables' names and initial values (ordered).

        If the optimizer is already built with the same names, shapes and dtypes (another
        worker built it, or the job is resumed), this attaches: the server's values are kept;
        call ``pull()``. Returns True when this call built it. Other names, shapes or dtypes are
        an error that names the difference.
        """
        if not isinstance(variables, Mapping):
            if isinstance(variables, Sequence) and variables and all(hasattr(v, "path") for v in variables):
                variables = {variable_name(v): v for v in variables}  # Keras 3 variables, by path
            else:
                raise TypeError(
                    "`variables` must be a mapping name -> initial value (ordered like the model), or "
                    f"a list of Keras variables. Received: {type(variables).__name__}"
                )
        items = [(str(name), np.asarray(value)) for name, value in variables.items()]
        header = pb.BuildHeader(optimizer=self.key, worker_id=self.worker_id)
        response = self._transport.stream_unary("Build", lambda: self._frames(header, items))
        self._absorb_info(response.info)
        if response.built_now:
            self._version = int(response.info.version)
            self._cache[()] = (self._version, OrderedDict((n, _readonly(v.copy())) for n, v in items))
        return bool(response.built_now)

    def attach(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """Join an optimizer another worker built: fetch the specs and the current weights."""
        specs = self.variable_specs
        if not specs:
            raise InvalidArgumentError(f"optimizer '{self.key}' is not built yet; nothing to attach to")
        self.pull()
        return specs

    def exclude_from_weight_decay(self, var_list: Iterable[Any] | None = None, var_names: Iterable[str] | None = None) -> None:
        """Exclude variables (exact names in ``var_list``, patterns in ``var_names``); before build."""
        names = [variable_name(v) for v in (var_list or [])]
        self._transport.unary(
            "ExcludeFromWeightDecay",
            pb.ExcludeFromWeightDecayRequest(optimizer=self.key, var_list=names, var_names=list(var_names or [])),
        )

    # -------------------------------------------------------------- push

    def _aligned(self, grads: Any, trainable_variables: Any) -> list[tuple[str, Any]]:
        if isinstance(grads, Mapping):
            if trainable_variables is not None:
                raise ValueError("Pass either a mapping of gradients or `trainable_variables`, not both.")
            return [(str(n), g) for n, g in grads.items()]
        grads = list(grads)
        if trainable_variables is not None:
            if isinstance(trainable_variables, Mapping):
                if not self.built:
                    self.build(trainable_variables)
                names = list(trainable_variables)
            else:
                names = [variable_name(v) for v in trainable_variables]
            if len(names) != len(grads):
                raise ValueError(f"Received {len(grads)} gradients for {len(names)} variables.")
            return list(zip(names, grads))
        specs = self.variable_specs
        if not specs:
            raise ValueError(
                "When passing `grads` without `variables`, the optimizer must already be built on a "
                "list of variables. Call `optimizer.build(trainable_variables)` first. "
            )
        if len(grads) != len(specs):
            raise ValueError(
                "When passing `grads` as a list of gradient tensors, the gradients must match "
                f"`optimizer.variables` one-to-on. Received a list of {len(grads)} gradients, but the "
                f"optimizer is tracking {len(specs)} trainable variables."
            )
        return [(name, g) for (name, _, _), g in zip(specs, grads)]

    def push(self, grads: Any, trainable_variables: Any = None, *, step: int | None = None,
             request_id: str | None = None, timeout: float | None = None) -> PushResult:
        """Push gradients computed on weights version ``step`` (default: ``self.version``)."""
        items = self._aligned(grads, trainable_variables)  # None travels as an absent entry
        step = self._version if step is None else int(step)
        header = pb.PushHeader(
            optimizer=self.key, worker_id=self.worker_id, step=step,
            request_id=request_id or uuid.uuid4().hex, num_tensors=len(items),
        )  # fmt: skip
        response = self._via_bulk(lambda ch: ch.push(header, items, wire=self._gradient_wire, timeout=timeout or self.timeout))
        if response is None:
            response = self._transport.stream_unary(
                "Push", lambda: self._frames(header, items, wire=self._gradient_wire), timeout=timeout
            )
        return self._push_result(response, step)

    def _push_result(self, response: Any, step: int) -> PushResult:
        result = PushResult(
            _OUTCOME_NAMES.get(response.outcome, "applied"),  # type: ignore[arg-type]
            int(response.version),
            int(response.iterations),
            bool(response.duplicate),
            response.detail,
        )
        if result.outcome in ("accepted", "round_closed"):
            self._expect_version = max(self._expect_version, step + 1)
        elif result.outcome == "dropped_late":
            warnings.warn(f"worker '{self.worker_id}': {result.detail}", stacklevel=4)
        return result

    def push_stream(
        self, items: Iterable[tuple[str, Any]], *, num_tensors: int, nbytes: int | None = None,
        step: int | None = None, request_id: str | None = None, timeout: float | None = None,
    ) -> PushResult:
        """One push whose ``(name, gradient)`` items may still be arriving (a lazy iterable).

        The push starts at once and each tensor is sent as soon as ``items`` yields it: the
        adapters stream gradients while backward runs. ``num_tensors`` entries must come
        (``None`` values count: no gradient); ``nbytes`` bounds their payload for the
        shared-memory path. Items stay referenced until the push is answered (a retry resends them).
        """
        replay = _Replay(items)
        step = self._version if step is None else int(step)
        header = pb.PushHeader(
            optimizer=self.key, worker_id=self.worker_id, step=step,
            request_id=request_id or uuid.uuid4().hex, num_tensors=int(num_tensors),
        )  # fmt: skip
        response = self._via_bulk(
            lambda ch: ch.push(header, replay, wire=self._gradient_wire, timeout=timeout or self.timeout, nbytes=nbytes)
        )
        if response is None:
            response = self._transport.stream_unary(
                "Push", lambda: self._frames(header, replay, wire=self._gradient_wire), timeout=timeout
            )
        return self._push_result(response, step)

    def apply(self, grads: Any, trainable_variables: Any = None) -> PushResult:
        """Push one step of gradients (list aligned with build order, or name -> gradient).

        ``None`` means no gradient; a ``RowSparseGradient`` sends only some rows.
        """
        return self.push(grads, trainable_variables)

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> PushResult:
        """Push ``(gradient, variable name)`` pairs."""
        pairs = list(grads_and_vars)
        return self.push([g for g, _ in pairs], [variable_name(v) for _, v in pairs])

    # -------------------------------------------------------------- pull

    def pull(self, names: Sequence[str] | None = None, *, min_version: int | None = None,
             timeout: float | None = None) -> OrderedDict[str, np.ndarray]:
        """Current weights (all, or ``names``) as name -> read-only array, in build order.

        Waits until the server's version reaches ``min_version`` (default: after a sync push,
        the version its round produces). Skips the transfer when this worker already holds
        the latest version.
        """
        key = tuple(names or ())
        wanted = self._expect_version if min_version is None else int(min_version)
        cached = self._cache.get(key)
        request = pb.PullRequest(optimizer=self.key, names=list(key), min_version=wanted, worker_id=self.worker_id)
        if cached is not None:
            request.known_version = cached[0]

        def consume(frames: Iterator[Any]) -> tuple[Any, list[tuple[str, Any]]]:
            head, tensors = _wire.decode_stream(frames)
            return head, [(t.header.name, t.value) for t in tensors]

        reply = self._via_bulk(lambda ch: ch.pull(request, timeout=timeout or self.timeout))
        if reply is None:
            reply = self._transport.unary_stream("Pull", request, consume, timeout=timeout)
        head, tensors = reply
        if head.not_modified and cached is not None:
            values = cached[1]
        else:
            values = OrderedDict((name, _readonly(value)) for name, value in tensors)
            self._cache[key] = (int(head.version), values)
        if not key:
            self._version = int(head.version)
        self.last_iterations = int(head.iterations)
        return OrderedDict(values)

    def pull_into(self, out: Mapping[str, np.ndarray], *, min_version: int | None = None,
                  timeout: float | None = None) -> int:
        """Pull all weights into ``out`` (name -> writable array of the variable's shape); returns
        the version. Over the bulk channel the bytes land in ``out`` directly (no extra copy);
        arrays of another dtype are cast. Waits like ``pull()``.
        """
        wanted = self._expect_version if min_version is None else int(min_version)
        request = pb.PullRequest(optimizer=self.key, min_version=wanted, worker_id=self.worker_id)

        def consume(frames: Iterator[Any]) -> tuple[Any, list[tuple[str, Any]]]:
            head, tensors = _wire.decode_stream(frames)
            return head, [(t.header.name, t.value) for t in tensors]

        reply = self._via_bulk(lambda ch: ch.pull(request, timeout=timeout or self.timeout, out=out))
        if reply is None:
            reply = self._transport.unary_stream("Pull", request, consume, timeout=timeout)
        head, tensors = reply
        missing = set(out) - {name for name, _ in tensors}
        if missing:
            raise InvalidArgumentError(f"optimizer '{self.key}' has no variable(s) {sorted(missing)}")
        for name, value in tensors:
            dest = out.get(name)
            if dest is not None and not np.may_share_memory(dest, value):
                np.copyto(dest, value, casting="same_kind")
        self._cache.pop((), None)  # the caller's arrays hold this version now, not the cache
        self._version = int(head.version)
        self.last_iterations = int(head.iterations)
        return self._version

    # -------------------------------------------------------------- bulk channel

    @property
    def transfer_path(self) -> str:
        """How pushes and pulls travel now: "shm", "tcp" (bulk channel), "grpc", or "unknown"
        before the first push or pull."""
        if self._bulk_mode == "off":
            return "grpc"
        if self._bulk is None:
            return "unknown"
        if self._bulk is _NO_BULK or time.monotonic() < self._bulk_retry_at:
            return "grpc"
        return "shm" if self._bulk.shared_memory else "tcp"

    def _via_bulk(self, call: Any) -> Any:
        """``call(channel)`` over the bulk channel, or None to use gRPC (none offered)."""
        if self._bulk_mode == "off" or self._bulk is _NO_BULK:
            return None
        if self._bulk is None:
            self._bulk = BulkChannel(self._transport, self.key, self.worker_id, mode=self._bulk_mode)
        if time.monotonic() < self._bulk_retry_at:
            return None  # the bulk channel failed recently: gRPC until the backoff ends
        try:
            result = call(self._bulk)
            self._bulk_backoff = 0.0
            return result
        except BulkUnavailable as exc:
            if exc.transient:  # this call goes through gRPC; the bulk channel is tried again later
                self._bulk_backoff = min(_BULK_BACKOFF_MAX, max(self._bulk_backoff * 2, _BULK_BACKOFF))
                self._bulk_retry_at = time.monotonic() + self._bulk_backoff
                _log.warning("worker '%s': bulk channel failed (%s); this call and those of the next %.3g s use gRPC",
                             self.worker_id, exc, self._bulk_backoff)
                return None
            # Asked for explicitly, or offered but unreachable (a firewalled port): say so louder.
            level = logging.INFO if self._bulk_mode == "auto" and not exc.offered else logging.WARNING
            _log.log(level, "worker '%s': bulk channel unavailable (%s); using gRPC streams", self.worker_id, exc)
            self._bulk.close()
            self._bulk = _NO_BULK
            return None

    # -------------------------------------------------------------- the rest of the Keras API

    def finalize_variable_values(self) -> None:
        self._transport.unary("FinalizeVariableValues", self._ref())

    def _assign(self, op: int, variable: Any, value: Any) -> None:
        name = variable_name(variable)
        header = pb.AssignHeader(optimizer=self.key, op=op)
        self._transport.stream_unary("Assign", lambda: self._frames(header, [(name, np.asarray(value))]))

    def assign(self, variable: Any, value: Any) -> None:
        """Assign to a model or optimizer variable, by name."""
        self._assign(pb.ASSIGN, variable, value)

    def assign_add(self, variable: Any, value: Any) -> None:
        self._assign(pb.ASSIGN_ADD, variable, value)

    def assign_sub(self, variable: Any, value: Any) -> None:
        self._assign(pb.ASSIGN_SUB, variable, value)

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Set the optimizer variables (Keras ``optimizer.variables`` order)."""
        items = [("", np.asarray(w)) for w in weights]
        self._transport.stream_unary("SetWeights", lambda: self._frames(self._ref(), items))

    def save_own_variables(self, store: dict[str, Any]) -> None:
        """Fill ``store`` like Keras: ``store["0"]``, ``store["1"]``, ... optimizer variables."""
        _, tensors = self._transport.unary_stream("SaveOwnVariables", self._ref(), _wire.decode_stream)
        for t in tensors:
            store[t.header.name] = t.value

    def load_own_variables(self, store: Mapping[str, Any]) -> None:
        """Load a store written by ``save_own_variables`` (here, in-process or by Keras)."""
        keys = sorted(store.keys(), key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k)))
        items = [(str(k), np.asarray(store[k])) for k in keys]
        self._transport.stream_unary("LoadOwnVariables", lambda: self._frames(self._ref(), items))

    def stateless_apply(
        self, optimizer_variables: Sequence[Any], grads: Sequence[Any], trainable_variables: Sequence[Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Apply ``grads`` to the given values on the server; its own state is untouched."""

        def frames() -> Iterator[bytes]:
            yield _wire.header_frame(self._ref())
            for group, values in (
                (pb.OPTIMIZER_VARIABLES, optimizer_variables),
                (pb.GRADIENTS, grads),
                (pb.TRAINABLE_VARIABLES, trainable_variables),
            ):
                for v in values:
                    yield from _wire.tensor_frames(
                        "", None if v is None else (v if isinstance(v, _wire.RowSparse) else np.asarray(v)),
                        group=group, chunk_bytes=self._chunk_bytes,
                    )

        _, tensors = self._transport.stream_stream("StatelessApply", frames, _wire.decode_stream)
        new_trainable = [t.value for t in tensors if t.header.group == pb.TRAINABLE_VARIABLES]
        new_optimizer = [t.value for t in tensors if t.header.group == pb.OPTIMIZER_VARIABLES]
        return new_trainable, new_optimizer  # type: ignore[return-value]

    # -------------------------------------------------------------- lifecycle

    def delete(self) -> bool:
        """Delete this job on the server (weights, state, workers); False if it was gone.

        Other workers' calls then fail with NotFound. Needs a token scoped to this job (or an
        unscoped one) when the server checks tokens.
        """
        response = self._transport.unary("DeleteOptimizer", self._ref())
        self._specs = []
        self._cache.clear()
        if self._bulk is not None and self._bulk is not _NO_BULK:
            self._bulk.close()
            self._bulk = None
        return bool(response.deleted)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        bulk = getattr(self, "_bulk", None)
        if bulk is not None and bulk is not _NO_BULK:
            bulk.close()
        for transport in self._transports:
            transport.close()

    def __enter__(self) -> RemoteAdamax:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RemoteAdamax {self.key!r} at {self._transport.target} worker={self.worker_id!r} mode={self.mode}>"


def _readonly(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    return value
