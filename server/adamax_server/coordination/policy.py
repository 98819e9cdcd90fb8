"""Policies and the value types of the coordination layer: ``Policy`` (mode, K of N, staleness,
timeouts), ``TensorMeta``, ``PushResult``, ``PullResult``, ``WorkerStatus``, ``OptimizerStatus``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, Protocol, TypeVar

import numpy as np
from adamax_server.errors import InvalidArgument

if TYPE_CHECKING:
    from adamax_server.coordination.stats import GradientStats

Mode = Literal["async", "sync"]
Gradient = Any  # np.ndarray | RowSparseGradient | None
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
T = TypeVar("T")


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"`{name}` must be one of {list(allowed)}. Received: {name}={value!r}")


@dataclass(frozen=True)
class Policy:
    """How pushes turn into applies; see the module docstring."""

    mode: Mode = "async"
    num_workers: int = 1
    min_workers: int | None = None  # K; None means K = num_workers
    aggregation: Literal["mean", "sum"] = "mean"
    round_timeout: float | None = None  # seconds after a round's first push; None: wait forever
    round_timeout_policy: Literal["close", "abort"] = "close"
    max_staleness: int | None = None
    non_finite: Literal["reject", "skip"] = "reject"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("async", "sync"))
        _choice("aggregation", self.aggregation, ("mean", "sum"))
        _choice("round_timeout_policy", self.round_timeout_policy, ("close", "abort"))
        _choice("non_finite", self.non_finite, ("reject", "skip"))
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise InvalidArgument(f"`num_workers` must be an integer >= 1. Received: num_workers={self.num_workers!r}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise InvalidArgument(
                "`min_workers` must be between 1 and `num_workers`. "
                f"Received: min_workers={self.min_workers}, num_workers={self.num_workers}"
            )
        if self.round_timeout is not None and not (self.round_timeout > 0 and math.isfinite(self.round_timeout)):
            raise InvalidArgument(
                f"`round_timeout` must be a positive number of seconds or None. Received: round_timeout={self.round_timeout!r}"
            )
        if self.max_staleness is not None and self.max_staleness < 0:
            raise InvalidArgument(f"`max_staleness` must be >= 0 or None. Received: max_staleness={self.max_staleness!r}")

    @property
    def quorum(self) -> int:
        """Distinct workers that close a sync round (K)."""
        return self.min_workers if self.min_workers is not None else self.num_workers


PushOutcomeName = Literal["applied", "accepted", "round_closed", "dropped_late", "skipped_non_finite"]


# ``staging(name, dtype)``: a writable flat buffer for variable ``name``'s gradient, or None.
StagingLookup = Callable[[str, np.dtype], "np.ndarray | None"]


@dataclass
class ReceiveProgress:
    """How a push's payload is arriving, as its transport reports it to ``OptimizerHost.push``.

    ``received`` grows as bytes arrive; ``cancel()`` stops the receive (the transport closes or
    cancels the stream, and ``receive`` then raises). Once every byte arrived the host clears
    ``cancel``: the push is no longer the transport's to stop.
    """

    min_rate: float = 1 << 20
    received: int = 0
    cancel: Callable[[], None] | None = None

    def add(self, nbytes: int) -> None:
        self.received += nbytes


@dataclass(frozen=True)
class PushResult:
    outcome: PushOutcomeName
    version: int
    iterations: int
    duplicate: bool = False
    detail: str = ""


class TensorMeta(NamedTuple):
    """What a tensor header announces, before its payload is read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sparse: bool
    absent: bool


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    last_step: int
    pushes: int
    seconds_since_seen: float


@dataclass(frozen=True)
class OptimizerStatus:
    key: str
    config: dict[str, Any]
    policy: Policy
    built: bool
    specs: list[tuple[str, tuple[int, ...], np.dtype]]
    version: int
    iterations: int
    learning_rate: float
    learning_rate_is_schedule: bool
    workers: list[WorkerStatus]
    round_arrivals: list[str]


@dataclass(frozen=True)
class PullResult(Generic[T]):
    version: int
    iterations: int
    not_modified: bool
    payload: T | None  # what the ``encode`` callback made; shared between pullers


class CoordinatorObserver(Protocol):
    """Hooks for metrics (``adamax_server.ops.metrics.ServerMetrics``); called under a host's lock."""

    def on_apply(
        self, optimizer: str, seconds: float, stats: Mapping[str, GradientStats], iterations: int,
        config: Mapping[str, Any],
    ) -> None: ...

    def on_round_closed(self, optimizer: str, wait_seconds: float, arrived: int, num_workers: int) -> None: ...


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as plain JSON values, so equal settings compare equal."""
    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"config value of type {type(value).__name__} is not JSON serializable")


def config_to_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=_json_default)


@dataclass
class WorkerRecord:
    """What a host remembers of one worker: its last step, push count and last contact."""

    last_step: int = -1
    pushes: int = 0
    last_seen: float = field(default_factory=time.monotonic)
