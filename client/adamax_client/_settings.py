"""What ``RemoteAdamax`` sends when it creates an optimizer (Keras defaults, the coordination
policy message, learning-rate serialization), what a push returns, and the re-iterable item
stream of a push."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

KERAS_DEFAULTS: dict[str, Any] = {
    "learning_rate": 0.001,
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-7,
}
IF_EXISTS = {"resume": pb.IF_EXISTS_RESUME, "error": pb.IF_EXISTS_ERROR, "replace": pb.IF_EXISTS_REPLACE}

def serialize_learning_rate(value: Any) -> Any:
    if isinstance(value, (int, float, dict)) or value is None:
        return value
    if isinstance(value, np.floating):
        return float(value)
    get_config = getattr(value, "get_config", None)
    if callable(get_config):  # a LearningRateSchedule object (Keras or ours)
        return {
            "module": "keras.optimizers.schedules",
            "class_name": type(value).__name__,
            "config": get_config(),
            "registered_name": None,
        }
    raise ValueError(
        "Argument `learning_rate` should be float, a LearningRateSchedule or its serialized config "
        f"dict for a remote optimizer. Received instead: learning_rate={value!r}"
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def policy_proto(
    mode: str,
    num_workers: int,
    min_workers: int | None,
    aggregation: str,
    round_timeout: float | None,
    round_timeout_policy: str,
    max_staleness: int | None,
    non_finite: str,
) -> Any:
    def pick(name: str, value: str, table: dict[str, int]) -> int:
        if value not in table:
            raise ValueError(f"`{name}` must be one of {list(table)}. Received: {name}={value!r}")
        return table[value]

    msg = pb.CoordinationPolicy(
        mode=pick("mode", mode, {"async": pb.ASYNC, "sync": pb.SYNC}),
        num_workers=num_workers,
        min_workers=min_workers or 0,
        aggregation=pick("aggregation", aggregation, {"mean": pb.MEAN, "sum": pb.SUM}),
        round_timeout_seconds=round_timeout or 0.0,
        round_timeout_policy=pick(
            "round_timeout_policy", round_timeout_policy, {"close": pb.CLOSE_WITH_ARRIVED, "abort": pb.ABORT_ROUND}
        ),
        non_finite=pick("non_finite", non_finite, {"reject": pb.REJECT, "skip": pb.SKIP_STEP}),
    )
    if max_staleness is not None:
        msg.max_staleness = max_staleness
    return msg


class Replay:
    """An iterable over ``source`` that can be iterated again (a retried push resends)."""

    def __init__(self, source: Iterable[Any]) -> None:
        self._source = iter(source)
        self._seen: list[Any] = []
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            if i < len(self._seen):
                yield self._seen[i]
                i += 1
                continue
            if self._done:
                return
            try:
                item = next(self._source)
            except StopIteration:
                self._done = True
                return
            self._seen.append(item)


def variable_name(variable: Any) -> str:
    """A variable's name on the server: a Keras 3 variable's ``path`` (its ``name`` repeats across
    layers: ``kernel``, ``bias``, ``kernel``...), else its ``name``, else ``str(variable)``."""
    path = getattr(variable, "path", None)
    if isinstance(path, str) and path:
        return path
    return str(getattr(variable, "name", variable))


OUTCOME_NAMES = {
    pb.APPLIED: "applied",
    pb.ACCEPTED: "accepted",
    pb.ROUND_CLOSED: "round_closed",
    pb.DROPPED_LATE: "dropped_late",
    pb.SKIPPED_NON_FINITE: "skipped_non_finite",
}


@dataclass(frozen=True)
class PushResult:
    """What the server did with one push."""

    outcome: Literal["applied", "accepted", "round_closed", "dropped_late", "skipped_non_finite"]
    version: int  # weights version after the push was handled
    iterations: int
    duplicate: bool  # answered from the exactly-once table (a retry)
    detail: str

    @property
    def applied(self) -> bool:
        """True when the gradient is (or, in an open sync round, will be) part of an update."""
        return self.outcome in ("applied", "accepted", "round_closed")


@dataclass(frozen=True)
class VariableSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
