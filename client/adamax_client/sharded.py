"""``RemoteAdamax`` over a sharded job: the same API and results as one server.

``RemoteAdamax(["h0:50051", "h1:50051", ...])`` (or ``"h0:50051,h1:50051"``) returns a
``ShardedRemoteAdamax``. The job's variables are placed on the shards by
``adamax_wire.placement.place`` (small variables whole, big ones split into row ranges);
every call talks to all shards at once, each with its own share of the bytes:

* ``build``: each shard receives its pieces of the initial values;
* ``push``: phase 1 stages each shard's slices of the gradients (in parallel), phase 2 asks
  the leader (shard 0) to commit the push, which applies it on every shard or on none, exactly
  once (a retry with the same request id is answered from the leader's table). A push with
  one stage (a one-shard job) sends the commit with it: the leader stages, commits and answers
  in one call (``stage_push``; the bulk header's ``commit``), where the leader offers that;
* ``pull``: every shard returns its pieces of one weights version (a shard still committing
  the latest event is waited for), assembled into whole arrays;
* ``save_own_variables`` / ``load_own_variables`` / ``set_weights``: the whole job's Keras
  store, assembled from or cut into the shards' stores.

``gradient_wire_dtype`` narrows the staged slices on the wire as on a single server (each shard
widens them to its variables' dtype on arrival). Staging and pulls use each shard's bulk channel
where it is offered (``bulk="auto"``, TCP; ``adamax_client.shard_bulk``) and gRPC streams
otherwise, to all shards in parallel; the commit at the leader and everything else is gRPC.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from adamax_wire import shard_codec as codec
from adamax_wire.checkpoints import Files, Progress
from adamax_wire import tensors as _wire
from adamax_wire.placement import Placement, assemble, assemble_store, place, split_gradients, split_store, split_values
from adamax_wire import pb
from adamax_client.errors import AbortedError, InvalidArgumentError, NotFoundError, UnavailableError, UnimplementedError
import adamax_client.checkpoints as _checkpoints
import adamax_client.remote as _remote
from adamax_client.remote import _KERAS_DEFAULTS, PushResult, RemoteAdamax, _default_worker_id, _policy_proto, _readonly, _serialize_learning_rate
from adamax_client.bulk import BULK_MODES
from adamax_client.shard_bulk import ShardChannels
from adamax_client.sharded_calls import ShardedAdapterCalls
from adamax_client.transport import RetryPolicy, Transport

CALL_PATH = "/adamax.v1.ShardService/Call"
ONCE_PATH = "/adamax.v1.ShardService/CallOnce"
_RECORDS = codec.Records(PushResult)


def parse_targets(target: str | Sequence[str]) -> list[str]:
    """``"h0:1,h1:1"`` or ``["h0:1", "h1:1"]`` -> the shard list."""
    items = target.split(",") if isinstance(target, str) else [str(t) for t in target]
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise ValueError(f"`target` must name at least one 'host:port'. Received: target={target!r}")
    return out


class ShardCaller:
    """``ShardService.Call`` on one shard, with the transport's deadline, retries and error mapping."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._call = transport._channel.stream_stream(
            CALL_PATH,
            request_serializer=_wire.identity_serializer,
            response_deserializer=_wire.frame_deserializer(pb.ShardCallFrame),
        )
        self._once = transport._channel.unary_unary(
            ONCE_PATH, request_serializer=_wire.identity_serializer, response_deserializer=pb.ShardCallBatch.FromString
        )
        self._once_ok = True  # False once the server answered CallOnce UNIMPLEMENTED

    def __call__(self, key: str, method: str, *args: Any, timeout: float | None = None, wire: str | None = None) -> Any:
        """``wire`` narrows every float tensor of the call on the wire (gradients being staged).
        Small calls (``shard_codec.ONCE_METHODS``) go in one message each way (``CallOnce``)."""
        doc, tensors = codec.encode(list(args))
        header = pb.ShardCallHeader(optimizer=key, method=method, args_json=doc, num_tensors=len(tensors))
        once = codec.call_once(method, tensors)

        def frames() -> Iterable[bytes]:
            yield _wire.header_frame(header)
            for name, value in tensors:
                yield from _wire.tensor_frames(name, value, wire=wire)

        def attempt(remaining: float) -> Any:
            if once and self._once_ok:
                try:
                    head, decoded = _wire.decode_stream(iter(self._once(codec.batch_bytes(frames()), timeout=remaining).frames))
                    return codec.decode(head.args_json, [t.value for t in decoded], _RECORDS)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._once_ok = False  # an older server (or not a shard): stream, as always
            head, decoded = _wire.decode_stream(self._call(frames(), timeout=remaining))
            return codec.decode(head.args_json, [t.value for t in decoded], _RECORDS)

        return self.transport._with_retries(attempt, timeout)


class ShardedRemoteAdamax(ShardedAdapterCalls, RemoteAdamax):
    """See the module docstring; constructed through ``RemoteAdamax(targets, ...)``."""

    def __init__(  # noqa: PLR0913 - the RemoteAdamax signature
        self,
        target: str | Sequence[str],
        worker_id: str | None = None,
        *,
        mode: str = "async",
        num_workers: int = 1,
        min_workers: int | None = None,
        aggregation: str = "mean",
        round_timeout: float | None = None,
        round_timeout_policy: str = "close",
        max_staleness: int | None = None,
        non_finite: str = "reject",
        optimizer: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
        token: str | None = None,
        sharded: bool | None = None,
        **kwargs: Any,
    ) -> None:
        gradient_wire_dtype = kwargs.pop("gradient_wire_dtype", None)
        if gradient_wire_dtype is not None and gradient_wire_dtype not in _wire.FLOAT_WIRE_DTYPES:
            raise ValueError(
                f"`gradient_wire_dtype` must be one of {list(_wire.FLOAT_WIRE_DTYPES)} or None. "
                f"Received: gradient_wire_dtype={gradient_wire_dtype!r}"
            )
        self._gradient_wire = gradient_wire_dtype
        bulk = kwargs.pop("bulk", "auto")
        if_exists = kwargs.pop("if_exists", "resume")
        for ignored in ("chunk_bytes", "device"):
            kwargs.pop(ignored, None)
        unknown = sorted(set(kwargs) - set(_KERAS_DEFAULTS) - {"name"})
        if unknown:
            raise ValueError(f"Argument(s) not recognized: { {k: kwargs[k] for k in unknown} }")
        _policy_proto(mode, num_workers, min_workers, aggregation, round_timeout, round_timeout_policy, max_staleness, non_finite)
        config = {"name": kwargs.pop("name", None) or "adamax", **_KERAS_DEFAULTS, **kwargs}
        config["learning_rate"] = _serialize_learning_rate(config["learning_rate"])
        self.targets = parse_targets(target)
        self.name = config["name"]
        self.key = optimizer or self.name
        self.worker_id = worker_id or _default_worker_id()
        self.mode = mode
        self.timeout = timeout
        self._policy_dict = {
            "mode": mode, "num_workers": num_workers, "min_workers": min_workers, "aggregation": aggregation,
            "round_timeout": round_timeout, "round_timeout_policy": round_timeout_policy,
            "max_staleness": max_staleness, "non_finite": non_finite,
        }  # fmt: skip
        if bulk not in BULK_MODES:
            raise ValueError(f"`bulk` must be one of {list(BULK_MODES)}. Received: bulk={bulk!r}")
        self._bulk_mode = bulk
        self._bulk = None
        self._channels: ShardChannels | None = None
        self._specs = []
        self._version = 0
        self._expect_version = 0
        self._cache = {}
        self._closed = False
        self._placement: Placement | None = None
        self.last_iterations = 0  # the job's Keras iterations at this worker's last pull
        self._describe_cache: dict[str, Any] | None = None
        self._transports = [
            Transport(t, timeout=timeout, retry=retry, credentials=credentials, channel_options=channel_options,
                      interceptors=interceptors, token=token)
            for t in self.targets
        ]  # fmt: skip
        self._callers = [ShardCaller(t) for t in self._transports]
        self._channels = ShardChannels(self._transports, self._callers, self.key, self.worker_id, bulk)
        self._pool = ThreadPoolExecutor(max_workers=len(self.targets), thread_name_prefix="adamax-shards")
        try:
            self._create_job(config, self._policy_dict, if_exists)
            self._refresh()
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- plumbing

    @property
    def num_shards(self) -> int:
        return len(self.targets)

    def _one(self, shard: int, method: str, *args: Any, timeout: float | None = None, wire: str | None = None) -> Any:
        return self._callers[shard](self.key, method, *args, timeout=timeout, wire=wire)

    def _all(self, method: str, args_for: Callable[[int], tuple[Any, ...]], *, timeout: float | None = None,
             wire: str | None = None) -> list[Any]:
        """``method`` on every shard in parallel; the first shard's error is raised after all returned."""
        return self._each(lambda i: self._one(i, method, *args_for(i), timeout=timeout, wire=wire))

    def _each(self, call: Callable[[int], Any], alongside: Callable[[], None] | None = None,
              shards: int | None = None) -> list[Any]:
        """``call(shard)`` for every shard (or the first ``shards``) in parallel; the first error is
        raised after all returned. ``alongside()`` runs in this thread meanwhile; its error first."""
        futures = [self._pool.submit(call, i) for i in range(self.num_shards if shards is None else shards)]
        results, first_error = [], None
        if alongside is not None:
            try:
                alongside()
            except BaseException as exc:  # noqa: BLE001 - raised once every call returned
                first_error = exc
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                results.append(None)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results

    def _refresh(self) -> dict[str, Any]:
        info = self._one(0, "describe")
        if len(info["shards"]) != self.num_shards:
            raise InvalidArgumentError(
                f"the job has {len(info['shards'])} shards ({info['shards']}); this client was given {self.num_shards}"
            )
        self._describe_cache = info
        if info["placement"] is not None:
            self._placement = Placement.from_json(info["placement"])
            self._specs = []
            from adamax_client.remote import VariableSpec

            self._specs = [VariableSpec(v.name, v.shape, np.dtype(v.dtype)) for v in self._placement.variables]
        return info

    def _info(self) -> Any:  # RemoteAdamax's properties read the server through this
        return self._refresh()

    def _need_placement(self) -> Placement:
        if self._placement is None:
            self._refresh()
        if self._placement is None:
            raise ValueError(
                "When passing `grads` without `variables`, the optimizer must already be built on a "
                "list of variables. Call `optimizer.build(trainable_variables)` first. "
            )
        return self._placement

    # -------------------------------------------------------------- state

    @property
    def built(self) -> bool:
        return self._placement is not None or self._refresh()["placement"] is not None

    @property
    def variable_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        if self._placement is None:
            self._refresh()
        return [(s.name, s.shape, s.dtype) for s in self._specs]

    @property
    def iterations(self) -> int:
        return int(self._refresh()["iterations"])

    @property
    def learning_rate(self) -> np.float32:
        """The job's current learning rate (a schedule's value at the current step), as on one server."""
        return np.float32(self._refresh()["learning_rate"])

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if isinstance(value, dict) or callable(value):
            raise TypeError("A remote optimizer's learning rate can only be set to a float.")
        self._one(0, "mutate_job", "learning_rate", [{"value": float(value)}] * self.num_shards)

    def get_config(self) -> dict[str, Any]:
        return dict(self._refresh()["config"])

    def status(self) -> dict[str, Any]:
        """The whole job: version and iterations (leader), and per shard its bytes and version."""
        shards = self._all("describe", lambda i: ())
        leader = shards[0].get("leader", {})
        return {
            "optimizer": self.key,
            "built": shards[0]["built"],
            "version": leader.get("version", shards[0]["version"]),
            "iterations": shards[0]["iterations"],
            "round_arrivals": leader.get("round_arrivals", []),
            "lagging": leader.get("lagging", []),
            "shards": [
                {"index": i, "target": self.targets[i], "version": s["version"], "bytes": s["bytes"]}
                for i, s in enumerate(shards)
            ],
        }

    # -------------------------------------------------------------- build

    def build(self, variables: Mapping[str, Any]) -> None:
        if not isinstance(variables, Mapping):
            raise TypeError(
                "`variables` must be a mapping name -> initial value (ordered like the model). "
                f"Received: {type(variables).__name__}"
            )
        values = {str(n): np.asarray(v) for n, v in variables.items()}
        specs = [(n, tuple(v.shape), v.dtype.name) for n, v in values.items()]
        info = self._describe_cache or self._refresh()
        placement = place(specs, self.num_shards, int(info.get("min_piece_bytes", 256 << 10)))
        pieces = split_values(placement, values)
        built_before = info["placement"] is not None
        self._all("build", lambda i: (specs, pieces[i]))
        self._refresh()
        if not built_before:
            self._version = 0
            self._cache[()] = (0, OrderedDict((n, _readonly(v.copy())) for n, v in values.items()))

    def exclude_from_weight_decay(self, var_list: Iterable[Any] | None = None, var_names: Iterable[str] | None = None) -> None:
        names = [str(getattr(v, "name", v)) for v in (var_list or [])]
        self._all("exclude_from_weight_decay", lambda i: (names, list(var_names or [])))

    # -------------------------------------------------------------- push

    def push(self, grads: Any, trainable_variables: Any = None, *, step: int | None = None,
             request_id: str | None = None, timeout: float | None = None) -> PushResult:
        """Stage each shard's slices, then commit at the leader (see the module docstring)."""
        items = self._aligned(grads, trainable_variables)
        placement = self._need_placement()
        known = placement.by_name()
        gradients: dict[str, Any] = {}
        for name, g in items:
            if name not in known:
                raise NotFoundError(
                    f"optimizer '{self.key}' has no variable '{name}'. Known variables: {list(known)}"
                )
            if name in gradients:
                raise InvalidArgumentError(f"The push carries two gradients for variable '{name}'.")
            gradients[name] = g if (g is None or isinstance(g, _wire.RowSparse)) else np.asarray(g)
        return self._staged_push(split_gradients(placement, gradients), step, request_id, timeout)

    def _taken_back(self, exc: AbortedError) -> None:
        """A (sharded: rewinding) restore: ``pull()`` waits for the restored version from now on."""
        if exc.current_version is not None and exc.current_version < self._expect_version:
            self._expect_version = int(exc.current_version)

    # -------------------------------------------------------------- pull

    def pull(self, names: Sequence[str] | None = None, *, min_version: int | None = None,
             timeout: float | None = None) -> OrderedDict[str, np.ndarray]:
        """Weights of one version from every shard (a shard still committing it is waited for)."""
        placement = self._need_placement()
        key = tuple(names or ())
        unknown = [n for n in key if n not in placement.by_name()]
        if unknown:
            raise NotFoundError(f"optimizer '{self.key}' has no variable(s) {unknown}. Known variables: {[v.name for v in placement.variables]}")
        replies = self._pull_replies(key, min_version, timeout)
        self.last_iterations = int(replies[0][1])
        values = assemble(placement, [r[2] for r in replies], key)
        out = OrderedDict((n, _readonly(v)) for n, v in values.items())
        version = int(replies[0][0])
        self._cache[key] = (version, out)
        if not key:
            self._version = version
        return OrderedDict(out)

    @property
    def transfer_path(self) -> str:
        """"shm" or "tcp" (every shard's bulk channel, that way), "grpc", "mixed" (shards differ) or "unknown"."""
        return self._channels.path if self._channels is not None else "grpc"

    # -------------------------------------------------------------- the rest of the Keras API

    def _mutate(self, op: str, parts: list[dict[str, Any]]) -> None:
        self._one(0, "mutate_job", op, parts)

    def finalize_variable_values(self) -> None:
        self._mutate("finalize", [{}] * self.num_shards)

    def _assign(self, op: Any, variable: Any, value: Any) -> None:
        kind = {pb.ASSIGN: "assign", pb.ASSIGN_ADD: "assign_add", pb.ASSIGN_SUB: "assign_sub"}[op]
        name = str(getattr(variable, "name", variable))
        placement = self._need_placement()
        v = placement.by_name().get(name)
        value = np.asarray(value)
        if v is None:
            self._mutate("assign", [{"kind": kind, "name": name, "scalar": value}] * self.num_shards)
            return
        if tuple(value.shape) != v.shape:
            raise InvalidArgumentError(
                "The shape of the target variable and the shape of the target value in "
                f"`variable.assign(value)` must match. variable.shape={v.shape}, "
                f"Received: value.shape={tuple(value.shape)}. Target variable: {name}",
                server_type="ValueError",
            )
        pieces = split_values(placement, {name: value.astype(np.dtype(v.dtype))})
        self._mutate("assign", [{"kind": kind, "name": name, "pieces": pieces[i]} for i in range(self.num_shards)])

    def _shard_stores(self) -> tuple[list[Any], list[list[str]]]:
        for _ in range(16):
            replies = self._all("save_own_variables", lambda i: ())
            if len({int(r[0]) for r in replies}) == 1:
                return [(r[1], r[2]) for r in replies], [list(r[2]) for r in replies]
        raise UnavailableError(f"the shards of optimizer '{self.key}' did not settle on one version")

    def save_own_variables(self, store: dict[str, Any]) -> None:
        """The whole job's store, equal to a single server's (assembled from every shard)."""
        placement = self._need_placement()
        info = self._refresh()
        stores, _ = self._shard_stores()
        store.update(assemble_store(placement, info["layout"], stores))

    def load_own_variables(self, store: Mapping[str, Any]) -> None:
        placement = self._need_placement()
        layout = self._refresh()["layout"]
        if len(store) != len(layout):
            raise InvalidArgumentError(
                f"the store has {len(store)} entries; optimizer '{self.key}' has {len(layout)} variables"
            )
        for i, (name, kind, var) in enumerate(layout):
            expected = placement.by_name()[var].shape if kind == "slot" else ()
            got = tuple(np.shape(store[str(i)]))
            if kind in ("slot", "iteration", "learning_rate") and got != expected:
                raise InvalidArgumentError(f"Store entry {i} ({name}) has shape {got}; expected {expected}.", server_type="ValueError")
        names = [self._one(i, "describe")["store_names"] for i in range(self.num_shards)]
        parts = split_store(placement, layout, {str(k): np.asarray(v) for k, v in store.items()}, names)
        self._mutate("load_store", [{"store": p} for p in parts])

    def set_weights(self, weights: Sequence[Any]) -> None:
        self.load_own_variables({str(i): w for i, w in enumerate(weights)})

    def stateless_apply(
        self, optimizer_variables: Sequence[Any], grads: Sequence[Any], trainable_variables: Sequence[Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Apply ``grads`` to the given values with the job's config; the job's state is untouched.

        A pure function of the config and the values sent, computed by the leader with a
        whole-job engine (the same results as a single server; every value goes to shard 0).
        """

        def value(v: Any) -> Any:
            return None if v is None else (v if isinstance(v, _wire.RowSparse) else np.asarray(v))

        new_trainable, new_optimizer = self._one(
            0, "stateless_apply", [value(v) for v in optimizer_variables], [value(g) for g in grads],
            [value(v) for v in trainable_variables],
        )  # fmt: skip
        return list(new_trainable), list(new_optimizer)

    # -------------------------------------------------------------- job-wide operations

    def checkpoint(self) -> dict[str, Any]:
        """One consistent cut of the job, written by every shard into its own directory."""
        return self._one(0, "checkpoint")

    def restore(self, checkpoint_id: str = "latest") -> dict[str, Any]:
        """Every shard back to one cut (``latest``: the newest that every shard holds)."""
        result = self._one(0, "restore", checkpoint_id)
        self._cache.clear()
        # A sharded restore takes the version back: pull() waits for the restored version.
        self._expect_version = min(self._expect_version, int(result["version"]))
        return result

    def list_checkpoints(self) -> list[str]:
        """Cut ids every shard holds, oldest first."""
        held = [set(ids) for ids in self._all("list_cuts", lambda i: ())]
        return sorted(set.intersection(*held)) if held else []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
        if getattr(self, "_channels", None) is not None:
            self._channels.close()
        for transport in self._transports:
            transport.close()

    def __repr__(self) -> str:
        return f"<RemoteAdamax {self.key!r} over {self.num_shards} shards {self.targets} worker={self.worker_id!r} mode={self.mode}>"


_remote._SHARDED_CLASS = ShardedRemoteAdamax


class ShardedCheckpointClient:
    """``CheckpointClient(shard_list)``: the checkpoint calls of a sharded job.

    ``save`` takes one consistent cut of every optimizer (the leader holds the job still, every
    shard writes its part under one id), ``list`` shows the cuts every shard holds, ``restore``
    brings every shard back to one cut. ``download`` / ``upload`` of the assembled job (the
    single-server format) are done by the job's leader, which assembles and re-splits
    (``adamax_server.sharding.assembled``, also behind ``adamax-ps checkpoint download|upload
    --target A0,A1,...``).
    """

    def __init__(self, target: str | Sequence[str], *, timeout: float = 600.0, retry: RetryPolicy | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (), **_: Any) -> None:
        self.targets = parse_targets(target)
        self._transports = [
            Transport(t, timeout=timeout, retry=retry, credentials=credentials, token=token, channel_options=channel_options)
            for t in self.targets
        ]
        self._callers = [ShardCaller(t) for t in self._transports]

    def _keys(self) -> list[str]:
        return [row["optimizer"] for row in self._callers[0]("", "status")]

    def _common(self, key: str) -> list[str]:
        held = [set(c(key, "list_cuts")) for c in self._callers]
        return sorted(set.intersection(*held))

    def save(self, reason: str = "manual") -> Any:
        from adamax_client.checkpoints import CheckpointSummary

        cuts = [{"optimizer": k, **self._callers[0](k, "checkpoint")} for k in self._keys()]
        return CheckpointSummary(
            checkpoint_id=cuts[0]["id"] if cuts else "", created_unix=0.0, reason=reason, nbytes=0,
            optimizers=[{"optimizer": c["optimizer"], "version": c["version"], "checkpoint_id": c["id"],
                         "shards": c["shards"]} for c in cuts],
            valid=True, error="", format_version=1,
        )  # fmt: skip

    def list(self) -> list[Any]:
        from adamax_client.checkpoints import CheckpointSummary

        out = []
        for key in self._keys():
            for cut in self._common(key):
                out.append(CheckpointSummary(cut, 0.0, "cut", 0, [{"optimizer": key, "checkpoint_id": cut}], True, "", 1))
        return out

    def restore(self, checkpoint_id: str = "latest", optimizers: Sequence[str] = ()) -> tuple[str, list[Any]]:
        from adamax_client.checkpoints import RestoredOptimizer

        restored, used = [], checkpoint_id
        for key in list(optimizers) or self._keys():
            got = self._callers[0](key, "restore", checkpoint_id)
            used = got["id"]
            restored.append(RestoredOptimizer(key, int(got["version"]), int(self._callers[0](key, "describe")["iterations"])))
        return used, restored

    def inspect(self, *args: Any, **kwargs: Any) -> Any:
        raise UnimplementedError("inspect a sharded job's cuts with list(); each shard verifies its part on load")

    def download(
        self, checkpoint_id: str = "", optimizers: Sequence[str] = (), *, progress: Progress | None = None
    ) -> tuple[str, dict[str, Any], Files]:
        """(id, manifest, files) of the assembled job, in the single-server checkpoint format.

        ``checkpoint_id`` empty: the live state (one consistent in-memory cut); ``"latest"`` or
        an id: a stored cut every shard holds. The leader assembles it; the manifest and files are
        what a single server running the unsharded job would send (same Keras store, bit for bit).
        ``progress(done, total)`` is called once, when the whole checkpoint has arrived.
        """
        used, manifest, files = self._callers[0]("", "download", checkpoint_id, list(optimizers))
        files = {name: tensors for name, tensors in files.items() if tensors}  # as a single server's stream
        if progress is not None:
            total = sum(np.asarray(a).nbytes for tensors in files.values() for a in tensors.values())
            progress(total, total)
        return used, manifest, files

    def upload(
        self,
        manifest: Mapping[str, Any],
        files: Mapping[str, Mapping[str, np.ndarray]],
        *,
        save: bool = True,
        restore: bool = False,
        progress: Progress | None = None,
    ) -> tuple[Any, list[Any]]:
        """Send a single-server checkpoint (or an assembled cut) to the job's leader.

        The leader verifies every checksum, re-splits each optimizer onto this job's shard count,
        then ``save``s it as a cut on every shard and/or ``restore``s every shard to it.
        ``progress(done, total)`` is called once, after the checkpoint was sent.
        """
        from adamax_client.checkpoints import CheckpointSummary, RestoredOptimizer

        payload = {f: dict(t) for f, t in files.items()}
        got = self._callers[0]("", "upload", dict(manifest), payload, bool(save), bool(restore))
        if progress is not None:
            total = sum(np.asarray(a).nbytes for tensors in files.values() for a in tensors.values())
            progress(total, total)
        summary = None
        if save:
            summary = CheckpointSummary(
                checkpoint_id=got["checkpoint_id"], created_unix=0.0, reason="upload", nbytes=0,
                optimizers=[{**o, "checkpoint_id": got["checkpoint_id"]} for o in got["optimizers"]],
                valid=True, error="", format_version=1,
            )  # fmt: skip
        return summary, [RestoredOptimizer(str(k), int(v), int(it)) for k, v, it in got["restored"]]

    def close(self) -> None:
        for t in self._transports:
            t.close()

    def __enter__(self) -> ShardedCheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_checkpoints._SHARDED_CLASS = ShardedCheckpointClient
