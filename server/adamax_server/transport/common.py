"""Translation shared by both transports (gRPC servicer and bulk channel).

Proto enums <-> policy strings, ``OptimizerStatus`` -> ``OptimizerInfo``, tensor headers ->
``TensorMeta``, decoded tensors -> engine values, the receive allocator that lets a push land
straight in its gradient set (the engine's staging buffers once it is applied), and ``FoldedStats``, which computes a push's gradient
statistics piece by piece as its bytes land (while they are still in the cache), and
``PullArena``, the shared-memory segment a bulk listener answers full pulls from. No grpc here:
the bulk channel uses it without a server.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

from adamax_server.coordination.policy import OptimizerStatus, Policy, TensorMeta, config_to_json
from adamax_server.coordination.stats import GradientStats, ReceivedGradients
from adamax_server.errors import InvalidArgument
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.optim.kernels.stats import EMPTY, copy_with_stats, gradient_stats

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
ASSIGN_OPS = {pb.ASSIGN: "assign", pb.ASSIGN_ADD: "assign_add", pb.ASSIGN_SUB: "assign_sub"}
IF_EXISTS = {
    pb.IF_EXISTS_UNSPECIFIED: "resume",
    pb.IF_EXISTS_RESUME: "resume",
    pb.IF_EXISTS_ERROR: "error",
    pb.IF_EXISTS_REPLACE: "replace",
}


def lookup_enum(table: dict[int, str], value: int, what: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"unknown {what} value {value}") from None


def policy_from_proto(msg: Any) -> Policy:
    return Policy(
        mode=lookup_enum(_MODES, msg.mode, "mode"),  # type: ignore[arg-type]
        num_workers=msg.num_workers or 1,
        min_workers=msg.min_workers or None,
        aggregation=lookup_enum(_AGGREGATIONS, msg.aggregation, "aggregation"),  # type: ignore[arg-type]
        round_timeout=msg.round_timeout_seconds or None,
        round_timeout_policy=lookup_enum(_TIMEOUT_POLICIES, msg.round_timeout_policy, "round_timeout_policy"),  # type: ignore[arg-type]
        max_staleness=msg.max_staleness if msg.HasField("max_staleness") else None,
        non_finite=lookup_enum(_NON_FINITE, msg.non_finite, "non_finite"),  # type: ignore[arg-type]
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


def dense_only(tensor: _wire.DecodedTensor) -> np.ndarray:
    if tensor.value is None or isinstance(tensor.value, _wire.RowSparseGradient):
        raise InvalidArgument(f"tensor '{tensor.header.name}' must be a dense array here")
    return tensor.value



def staging_allocator(staging: Any) -> _wire.Allocator | None:
    """A wire-decoder allocator over a push's receive lookup (None: none lent).

    Dense tensors sent in their variable's dtype are received into the push's gradient set
    (``sharding.gradient_sets``); anything else (row-sparse, narrowed on the wire) gets a
    buffer of its own.
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


_FOLDED_DTYPES = {pb.FLOAT32: np.dtype(np.float32), pb.FLOAT64: np.dtype(np.float64)}


class _Tracker:
    """The ``on_filled`` hook of one tensor's receive buffer: statistics of each piece as it lands,
    then the allocator's own hook (a GPU server's host-to-device copy) if any."""

    __slots__ = ("folded", "name", "buffer", "start", "dtype", "done", "stats", "inner")

    def __init__(self, folded: FoldedStats, name: str, buffer: np.ndarray, start: int, dtype: np.dtype,
                 inner: Any) -> None:
        self.folded, self.name, self.buffer, self.start, self.dtype = folded, name, buffer, start, dtype
        self.done = start  # bytes of the values accounted for
        self.stats = EMPTY
        self.inner = inner

    def __call__(self, start: int, end: int) -> None:
        item = self.dtype.itemsize
        stop = self.start + (end - self.start) // item * item if end > self.start else self.start
        if stop > self.done:
            piece = self.buffer[self.done : stop].view(self.dtype)
            self.stats = self.stats.merge(gradient_stats(piece))
            self.done = stop
        if self.done == self.buffer.size:
            self.folded.stats[self.name] = self.stats
        if self.inner is not None:
            self.inner(start, end)

    def copy_from(self, raw: np.ndarray) -> None:
        """Fill the whole buffer from ``raw`` (uint8, same size) with the statistics in the same read."""
        if self.start:
            np.copyto(self.buffer[: self.start], raw[: self.start])
        dst = self.buffer[self.start :].view(self.dtype)
        self.stats = copy_with_stats(dst, raw[self.start :].view(self.dtype))
        self.done = self.buffer.size
        self.folded.stats[self.name] = self.stats


class FoldedStats:
    """A push's gradient statistics, computed while its payload is received.

    ``wrap(allocate)`` returns an allocator handing out the same buffers, with an ``on_filled``
    hook that accounts for each piece as it lands (the socket's pieces, gRPC chunks) or, for a
    copy out of shared memory, a ``copy_from`` that copies and counts in one read. float32 and
    float64 payloads are folded; others (narrowed on the wire) are left to ``push_stats``.
    """

    def __init__(self) -> None:
        self.stats: dict[str, GradientStats] = {}

    def wrap(self, allocate: _wire.Allocator | None) -> _wire.Allocator:
        def folded(header: Any, nbytes: int) -> Any:
            supplied = allocate(header, nbytes) if allocate is not None else None
            dtype = _FOLDED_DTYPES.get(header.dtype)
            if dtype is None or header.layout not in (pb.DENSE, pb.ROW_SPARSE):
                return supplied
            buffer, inner = supplied if supplied is not None else (np.empty(nbytes, dtype=np.uint8), None)
            start = header.num_rows * 8 if header.layout == pb.ROW_SPARSE else 0
            if (buffer.size - start) % dtype.itemsize:
                return supplied  # malformed; the decoder reports it
            return buffer, _Tracker(self, header.name, buffer, start, dtype, inner)

        return folded

    def result(self, values: list[tuple[str, Any]]) -> ReceivedGradients:
        return ReceivedGradients(values, self.stats)


def shm_copy(on_filled: Any, private: np.ndarray, raw: np.ndarray) -> None:
    """Copy a shared-memory payload into its private buffer; statistics in the same read when the
    buffer's hook folds them."""
    copy = getattr(on_filled, "copy_from", None)
    if copy is not None:
        copy(raw)
    else:
        np.copyto(private, raw)


@dataclass
class PullArena:
    """One optimizer's shared-memory pull segment: the weights of ``version``, in build order."""

    segment: Any
    layout: list[tuple[str, tuple[int, ...], np.dtype, int]]  # name, shape, dtype, byte offset
    host: Any = None  # the host it belongs to (OptimizerHost, or a shard's view; a re-created optimizer gets a new one)
    stamp: tuple[Any, int] = (-1, -1)  # (restore epoch or shard incarnation, version) of the weights it holds
    iterations: int = 0
    version: int = -1
    readers: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def views(self) -> dict[str, np.ndarray]:
        buf = self.segment.buf
        out = {}
        for name, shape, dtype, offset in self.layout:
            count = math.prod(shape)
            out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        return out
