"""The adamax.v1 servicer: translation only (frames in, coordinator call, frames out).

Each method turns request messages into domain values (NumPy arrays, ``Policy``,
``TensorMeta``), calls the coordinator, and turns the result back into messages. All
exceptions go through ``errors.status_for``; numerics, rounds and dedup live in the
coordinator, framing in ``adamax_wire.tensors``.

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

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_wire.proto.adamax.v1 import adamax_pb2_grpc as pb_grpc

from adamax_server.sharding.coordinator import Coordinator
from adamax_server.errors import InvalidArgument, status_for
from adamax_server.transport.common import (
    ASSIGN_OPS,
    IF_EXISTS,
    OUTCOMES,
    FoldedStats,
    dense_only,
    engine_value,
    info_to_proto,
    lookup_enum,
    policy_from_proto,
    staging_allocator,
    tensor_meta,
)
from adamax_server.transport.budget import CallLimits, Watch, Watchdog
from adamax_server.transport.security import peer_identities
from adamax_server.transport.validation import ResourceLimits, require_finite_config, require_finite_float32

if TYPE_CHECKING:
    from adamax_server.transport.bulk import BulkServer

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

def _watched(frames: Iterable[Any], watch: Watch, progress: Any) -> Iterator[Any]:
    """A push's request frames, reporting each to its watch (budget, stall) and progress."""
    for frame in frames:
        watch.touch()
        if isinstance(frame, memoryview):
            progress.add(len(frame))
        elif frame.WhichOneof("frame") == "tensor":
            watch.announce(frame.tensor.nbytes)
        yield frame


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
        call_limits: CallLimits | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._bulk = bulk
        # The sync gRPC server has no read or write timeout: budgets are enforced by cancelling
        # the call from the watchdog's thread (transport.budget).
        self._call_limits = call_limits or CallLimits()
        self._watchdog = Watchdog()
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
            require_finite_config(config)  # NaN, Infinity, 1e400: refused like SetLearningRate does
            if_exists = lookup_enum(IF_EXISTS, request.if_exists, "if_exists")
            created, host = self._coordinator.create(
                request.optimizer, config, policy_from_proto(request.policy), if_exists=if_exists
            )
            return pb.CreateOptimizerResponse(created=created, info=info_to_proto(host.status()))

    def GetOptimizer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return info_to_proto(self._coordinator.get(request.optimizer).status())

    def ListOptimizers(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return pb.ListOptimizersResponse(optimizers=[info_to_proto(h.status()) for h in self._coordinator.hosts()])

    def DeleteOptimizer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            deleted = self._coordinator.delete(request.optimizer)
            if self._bulk is not None:
                self._bulk.release_arenas()  # its shared-memory pull segment goes with it
            return pb.DeleteOptimizerResponse(deleted=deleted)

    # -------------------------------------------------------------- build, push, pull

    def Build(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = self._decode(request_iterator, check_tensor=self._limits.build_check())
            host = self._coordinator.get(header.optimizer)
            variables = [(t.header.name, dense_only(t)) for t in tensors]
            built_now = host.build(variables, worker_id=header.worker_id)
            return pb.BuildResponse(built_now=built_now, info=info_to_proto(host.status()))

    def _wait_budget(self, context: grpc.ServicerContext) -> float:
        """How long a call may wait (for a version): its deadline, capped."""
        return min(context.time_remaining(), self._call_limits.max_wait)

    def Push(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        watch = self._watchdog.watch(context.cancel, self._call_limits, what=f"a push from {context.peer()}")
        try:
            return self._push(request_iterator, context, watch)
        finally:
            self._watchdog.done(watch)

    def _push(self, request_iterator: Iterator[Any], context: grpc.ServicerContext, watch: Watch) -> Any:
        progress = self._call_limits.progress(cancel=context.cancel)
        with self._translating(context):
            frames = _watched(request_iterator, watch, progress)
            first = self._first_header(frames)
            header = first.header
            host = self._coordinator.get(header.optimizer)

            def receive(staging: Any) -> list[tuple[str, Any]]:
                # On a GPU engine, chunks are copied to the device as they arrive; on the host,
                # a push is received straight into its gradient set (``sharding.gradient_sets``).
                # Gradient statistics are folded into the receive (``FoldedStats``).
                receiver = host.device_receiver()
                folded = FoldedStats()
                try:
                    _, tensors = self._decode(
                        itertools.chain([first], frames),
                        check_tensor=lambda th: host.check_gradient(tensor_meta(th)),
                        allocate=folded.wrap(receiver.allocate if receiver is not None else staging_allocator(staging)),
                    )
                finally:
                    self._watchdog.done(watch)  # received: later waits have their own bounds
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
                return folded.result(values)

            result = host.push(
                header.worker_id, header.request_id, header.step, receive, timeout=self._wait_budget(context),
                progress=progress,
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
                timeout=self._wait_budget(context),
                worker_id=request.worker_id,
            )
        if result.not_modified or result.payload is None:
            head = pb.PullHeader(version=result.version, iterations=result.iterations, not_modified=True)
            yield _wire.header_frame(head)
            return
        # A reply the client does not read blocks this thread in gRPC's send: it gets a budget
        # for its size and may not stall (each resume of this generator means a frame went out).
        watch = self._watchdog.watch(context.cancel, self._call_limits, sum(len(f) for f in result.payload),
                                     what=f"a pull reply to {context.peer()}")  # fmt: skip
        try:
            for frame in result.payload:
                yield frame
                watch.touch()
        finally:
            self._watchdog.done(watch)

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
                # An mTLS caller's ticket only opens a bulk connection with the same certificate.
                ticket=bulk.issue_ticket(request.optimizer, request.worker_id, peer_identities(context)),
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
            op = lookup_enum(ASSIGN_OPS, header.op, "assign op")
            if len(tensors) != 1:
                raise InvalidArgument(f"Assign takes exactly one tensor; received {len(tensors)}")
            host = self._coordinator.get(header.optimizer)
            version, iterations = host.assign(op, tensors[0].header.name, dense_only(tensors[0]))  # type: ignore[arg-type]
            return pb.VersionResponse(version=version, iterations=iterations)

    def SetWeights(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = self._decode(request_iterator)
            host = self._coordinator.get(header.optimizer)
            version, iterations = host.set_weights([dense_only(t) for t in tensors])
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
            version, iterations = host.load_own_variables({t.header.name: dense_only(t) for t in tensors})
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
