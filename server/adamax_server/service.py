"""The adamax.v1 servicer: translation only (frames in, coordinator call, frames out).

Each method turns request messages into domain values (NumPy arrays, ``Policy``,
``TensorMeta``), calls the coordinator, and turns the result back into messages. All
exceptions go through ``errors.status_for``; numerics, rounds and dedup live in the
coordinator, framing in ``adamax_client._wire``.

Streaming responses yield pre-serialized frames (``bytes``) so that a pull reply is built
once per version and written to every worker that asks for it; ``server.py`` registers
these methods with a pass-through serializer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from adamax_client import _wire
from adamax_client._proto.adamax.v1 import adamax_pb2 as pb
from adamax_client._proto.adamax.v1 import adamax_pb2_grpc as pb_grpc

from .coordinator import Coordinator, OptimizerStatus, Policy, TensorMeta, config_to_json
from .engine import RowSparseGradient
from .errors import InvalidArgument, status_for
from .validation import ResourceLimits, require_finite_float32

if TYPE_CHECKING:
    from .bulk import BulkServer

_MODES = {pb.MODE_UNSPECIFIED: "async", pb.ASYNC: "async", pb.SYNC: "sync"}
_AGGREGATIONS = {pb.AGGREGATION_UNSPECIFIED: "mean", pb.MEAN: "mean", pb.SUM: "sum"}
_TIMEOUT_POLICIES = {
    pb.ROUND_TIMEOUT_POLICY_UNSPECIFIED: "close",
    pb.CLOSE_WITH_ARRIVED: "close",
    pb.ABORT_ROUND: "abort",
}
_NON_FINITE = {pb.NON_FINITE_POLICY_UNSPECIFIED: "reject", pb.REJECT: "reject", pb.SKIP_STEP: "skip"}
OUTCOMES = {
    "applied": pb.APPLIED,
    "accepted": pb.ACCEPTED,
    "round_closed": pb.ROUND_CLOSED,
    "dropped_late": pb.DROPPED_LATE,
    "skipped_non_finite": pb.SKIPPED_NON_FINITE,
}
_ASSIGN_OPS = {pb.ASSIGN: "assign", pb.ASSIGN_ADD: "assign_add", pb.ASSIGN_SUB: "assign_sub"}


def _lookup(table: dict[int, str], value: int, what: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {what} value {value}") from None


def policy_from_proto(msg: Any) -> Policy:
    return Policy(
        mode=_lookup(_MODES, msg.mode, "mode"),  # type: ignore[arg-type]
        num_workers=msg.num_workers or 1,
        min_workers=msg.min_workers or None,
        aggregation=_lookup(_AGGREGATIONS, msg.aggregation, "aggregation"),  # type: ignore[arg-type]
        round_timeout=msg.round_timeout_seconds or None,
        round_timeout_policy=_lookup(_TIMEOUT_POLICIES, msg.round_timeout_policy, "round_timeout_policy"),  # type: ignore[arg-type]
        max_staleness=msg.max_staleness if msg.HasField("max_staleness") else None,
        non_finite=_lookup(_NON_FINITE, msg.non_finite, "non_finite"),  # type: ignore[arg-type]
    )


def policy_to_proto(policy: Policy) -> Any:
    msg = pb.CoordinationPolicy(
        mode=pb.SYNC if policy.mode == "sync" else pb.ASYNC,
        num_workers=policy.num_workers,
        min_workers=policy.min_workers or 0,
        aggregation=pb.SUM if policy.aggregation == "sum" else pb.MEAN,
        round_timeout_seconds=policy.round_timeout or 0.0,
        round_timeout_policy=pb.ABORT_ROUND if policy.round_timeout_policy == "abort" else pb.CLOSE_WITH_ARRIVED,
        non_finite=pb.SKIP_STEP if policy.non_finite == "skip" else pb.REJECT,
    )
    if policy.max_staleness is not None:
        msg.max_staleness = policy.max_staleness
    return msg


def info_to_proto(status: OptimizerStatus) -> Any:
    return pb.OptimizerInfo(
        optimizer=status.key,
        config_json=config_to_json(status.config),
        policy=policy_to_proto(status.policy),
        built=status.built,
        variables=[
            pb.VariableSpec(name=n, shape=s, dtype=_wire.wire_dtype(np.dtype(d))) for n, s, d in status.specs
        ],
        version=status.version,
        iterations=status.iterations,
        learning_rate=status.learning_rate,
        learning_rate_is_schedule=status.learning_rate_is_schedule,
        workers=[
            pb.WorkerInfo(
                worker_id=w.worker_id, last_step=w.last_step, pushes=w.pushes, seconds_since_seen=w.seconds_since_seen
            )
            for w in status.workers
        ],
        round_arrivals=status.round_arrivals,
    )


def tensor_meta(header: Any) -> TensorMeta:
    return TensorMeta(
        name=header.name,
        dtype=_wire.dtype_name(header.dtype) if header.dtype else "unspecified",
        shape=tuple(header.shape),
        sparse=header.layout == pb.ROW_SPARSE,
        absent=header.absent,
    )


def engine_value(value: Any) -> Any:
    if isinstance(value, _wire.RowSparseGradient):
        return RowSparseGradient(value.indices, value.values)
    return value


def _dense_only(tensor: _wire.DecodedTensor) -> np.ndarray:
    if tensor.value is None or isinstance(tensor.value, _wire.RowSparseGradient):
        raise InvalidArgument(f"tensor '{tensor.header.name}' must be a dense array here")
    return tensor.value



def staging_allocator(staging: Any) -> _wire.Allocator | None:
    """A wire-decoder allocator over ``OptimizerHost.push``'s staging lookup (None: none lent).

    Dense tensors sent in their variable's dtype are received into the engine's own staging
    buffer; anything else (row-sparse, narrowed on the wire) gets a buffer of its own.
    """
    if staging is None:
        return None

    def allocate(header: Any, nbytes: int) -> tuple[np.ndarray, None] | None:
        if header.layout != pb.DENSE or header.dtype == pb.BFLOAT16:
            return None
        buffer = staging(header.name, _wire.numpy_dtype(header.dtype))
        if buffer is None:
            return None
        raw = buffer.view(np.uint8)
        return (raw, None) if raw.size == nbytes else None

    return allocate


@contextlib.contextmanager
def translating(context: grpc.ServicerContext) -> Iterator[None]:
    """Run a servicer body; a domain exception aborts the call with its mapped status.

    Every servicer (this one, the checkpoint service) uses this one function, so each exception
    maps to the same status everywhere (the mapping itself is ``errors.status_for``).
    """
    try:
        yield
    except Exception as exc:
        info = status_for(exc)
        if info.metadata:
            context.set_trailing_metadata(info.metadata)
        context.abort(grpc.StatusCode[info.code], info.message)

class AdamaxServicer(pb_grpc.AdamaxServiceServicer):
    """Implements adamax.v1.AdamaxService on top of a :class:`Coordinator`."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
        max_tensor_bytes: int = _wire.DEFAULT_MAX_TENSOR_BYTES,
        limits: ResourceLimits | None = None,
        bulk: BulkServer | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._bulk = bulk
        self._limits = limits or ResourceLimits()
        self._chunk_bytes = chunk_bytes
        self._max_tensor_bytes = max_tensor_bytes

    # -------------------------------------------------------------- helpers

    _translating = staticmethod(translating)  # domain exceptions -> status codes (errors.py)

    def _decode(self, frames: Iterable[Any], **kwargs: Any) -> tuple[Any, list[_wire.DecodedTensor]]:
        return _wire.decode_stream(frames, max_tensor_bytes=self._max_tensor_bytes, **kwargs)

    def _tensor_frames(self, items: list[tuple[str, Any]], group: int = pb.TENSOR_GROUP_UNSPECIFIED) -> Iterator[bytes]:
        return _wire.named_tensor_frames(items, group=group, chunk_bytes=self._chunk_bytes)

    @staticmethod
    def _first_header(frames: Iterator[Any]) -> Any:
        first = next(frames, None)
        if first is None or isinstance(first, memoryview) or first.WhichOneof("frame") != "header":
            raise _wire.WireFormatError("the first frame of a stream must be its call header")
        return first

    # -------------------------------------------------------------- optimizers

    def CreateOptimizer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            try:
                config = json.loads(request.config_json) if request.config_json else {}
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"`config_json` is not valid JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise InvalidArgument(f"`config_json` must be a JSON object. Received: {request.config_json[:80]}")
            created, host = self._coordinator.create(request.optimizer, config, policy_from_proto(request.policy))
            return pb.CreateOptimizerResponse(created=created, info=info_to_proto(host.status()))

    def GetOptimizer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return info_to_proto(self._coordinator.get(request.optimizer).status())

    def ListOptimizers(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return pb.ListOptimizersResponse(optimizers=[info_to_proto(h.status()) for h in self._coordinator.hosts()])

    def DeleteOptimizer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return pb.DeleteOptimizerResponse(deleted=self._coordinator.delete(request.optimizer))

    # -------------------------------------------------------------- build, push, pull

    def Build(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = self._decode(request_iterator, check_tensor=self._limits.build_check())
            host = self._coordinator.get(header.optimizer)
            variables = [(t.header.name, _dense_only(t)) for t in tensors]
            built_now = host.build(variables, worker_id=header.worker_id)
            return pb.BuildResponse(built_now=built_now, info=info_to_proto(host.status()))

    def Push(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            frames = iter(request_iterator)
            first = self._first_header(frames)
            header = first.header
            host = self._coordinator.get(header.optimizer)

            def receive(staging: Any) -> list[tuple[str, Any]]:
                # On a GPU engine, chunks are copied to the device as they arrive; on the host,
                # a lone async push is received straight into the engine's staging buffer.
                receiver = host.device_receiver()
                try:
                    _, tensors = self._decode(
                        itertools.chain([first], frames),
                        check_tensor=lambda th: host.check_gradient(tensor_meta(th)),
                        allocate=receiver.allocate if receiver is not None else staging_allocator(staging),
                    )
                finally:
                    if receiver is not None:  # no copy may outlive the push's buffers
                        receiver.wait()
                announced = header.num_tensors
                if announced and len(tensors) != announced:
                    # A call cancelled between two tensors can end like a complete stream.
                    raise InvalidArgument(
                        f"the push announced {announced} tensors but its stream ended after "
                        f"{len(tensors)}; nothing was applied (retry with the same request id)"
                    )
                if not tensors:
                    raise InvalidArgument("the push carries no tensors; nothing was applied")
                values = [(t.header.name, engine_value(t.value)) for t in tensors]
                if receiver is not None:
                    values = [(name, receiver.wrap(name, value)) for name, value in values]
                return values

            result = host.push(
                header.worker_id, header.request_id, header.step, receive, timeout=context.time_remaining()
            )
            return pb.PushResponse(
                outcome=OUTCOMES[result.outcome],
                version=result.version,
                iterations=result.iterations,
                duplicate=result.duplicate,
                detail=result.detail,
            )

    def _encode_pull(self, version: int, iterations: int, items: list[tuple[str, np.ndarray]]) -> list[bytes]:
        head = pb.PullHeader(version=version, iterations=iterations, num_tensors=len(items))
        return [_wire.header_frame(head), *self._tensor_frames(items)]

    def Pull(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._translating(context):
            host = self._coordinator.get(request.optimizer)
            result = host.pull(
                list(request.names),
                self._encode_pull,
                min_version=request.min_version,
                known_version=request.known_version if request.HasField("known_version") else None,
                timeout=context.time_remaining(),
                worker_id=request.worker_id,
            )
        if result.not_modified or result.payload is None:
            head = pb.PullHeader(version=result.version, iterations=result.iterations, not_modified=True)
            yield _wire.header_frame(head)
            return
        yield from result.payload

    def OpenBulkChannel(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            bulk = self._bulk
            if bulk is None:
                return pb.OpenBulkChannelResponse(available=False)
            self._coordinator.get(request.optimizer)  # NOT_FOUND before a ticket is spent on it
            if not request.worker_id:
                raise InvalidArgument("OpenBulkChannel needs the `worker_id` the connection will push as")
            return pb.OpenBulkChannelResponse(
                available=True,
                port=bulk.port,
                ticket=bulk.issue_ticket(request.optimizer, request.worker_id),
                ticket_ttl_seconds=bulk.ticket_ttl,
                shared_memory=bulk.shared_memory,
            )

    # -------------------------------------------------------------- the rest of the Keras API

    def SetLearningRate(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            host = self._coordinator.get(request.optimizer)
            host.set_learning_rate(require_finite_float32("learning_rate", request.learning_rate))
            return info_to_proto(host.status())

    def ExcludeFromWeightDecay(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            self._coordinator.get(request.optimizer).exclude_from_weight_decay(
                list(request.var_list), list(request.var_names)
            )
            return pb.Empty()

    def FinalizeVariableValues(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            version, iterations = self._coordinator.get(request.optimizer).finalize_variable_values()
            return pb.VersionResponse(version=version, iterations=iterations)

    def Assign(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = self._decode(request_iterator)
            op = _lookup(_ASSIGN_OPS, header.op, "assign op")
            if len(tensors) != 1:
                raise InvalidArgument(f"Assign takes exactly one tensor; received {len(tensors)}")
            host = self._coordinator.get(header.optimizer)
            version, iterations = host.assign(op, tensors[0].header.name, _dense_only(tensors[0]))  # type: ignore[arg-type]
            return pb.VersionResponse(version=version, iterations=iterations)

    def SetWeights(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = self._decode(request_iterator)
            host = self._coordinator.get(header.optimizer)
            version, iterations = host.set_weights([_dense_only(t) for t in tensors])
            return pb.VersionResponse(version=version, iterations=iterations)

    def SaveOwnVariables(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._translating(context):
            store = self._coordinator.get(request.optimizer).save_own_variables()
        yield _wire.header_frame(pb.OptimizerRef(optimizer=request.optimizer))
        yield from self._tensor_frames(list(store.items()))

    def LoadOwnVariables(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = self._decode(request_iterator)
            host = self._coordinator.get(header.optimizer)
            version, iterations = host.load_own_variables({t.header.name: _dense_only(t) for t in tensors})
            return pb.VersionResponse(version=version, iterations=iterations)

    def StatelessApply(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._translating(context):
            header, tensors = self._decode(request_iterator)
            host = self._coordinator.get(header.optimizer)
            groups: dict[int, list[Any]] = {pb.OPTIMIZER_VARIABLES: [], pb.GRADIENTS: [], pb.TRAINABLE_VARIABLES: []}
            for t in tensors:
                if t.header.group not in groups:
                    raise InvalidArgument(f"tensor {t.header.name!r} of StatelessApply has no group")
                groups[t.header.group].append(engine_value(t.value))
            new_trainable, new_optimizer = host.stateless_apply(
                groups[pb.OPTIMIZER_VARIABLES], groups[pb.GRADIENTS], groups[pb.TRAINABLE_VARIABLES]
            )
        yield _wire.header_frame(pb.OptimizerRef(optimizer=header.optimizer))
        yield from self._tensor_frames([("", v) for v in new_trainable], pb.TRAINABLE_VARIABLES)
        yield from self._tensor_frames([("", v) for v in new_optimizer], pb.OPTIMIZER_VARIABLES)
