"""Request checks at the wire boundary: malformed messages and per-optimizer resource limits.

* gRPC answers a request its deserializer cannot parse with INTERNAL ("Exception
  deserializing request!"), which reads like a server bug. :func:`tolerant_handler` parses
  with a deserializer that turns a parse failure into a :class:`MalformedMessage` value, and
  the wrapped method answers it with the status ``errors.status_for`` gives a
  ``WireFormatError`` (INVALID_ARGUMENT) before the servicer sees it.
* :class:`ResourceLimits` caps what one optimizer may hold (variables, bytes of model
  variables); a Build over a limit is RESOURCE_EXHAUSTED, naming the limit, and is refused
  from the tensor headers, before the payload is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from adamax_wire.errors import WireFormatError

from adamax_server.errors import Cancelled, InvalidArgument, ResourceExhausted, status_for

_FLOAT32_MAX = 3.4028234663852886e38


class MalformedMessage:
    """Stands in for a request (or stream frame) that did not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, others ValueError
            return MalformedMessage(f"{type(exc).__name__}: {exc}")

    return parse


def _abort_malformed(context: grpc.ServicerContext, reason: str) -> None:
    info = status_for(WireFormatError(f"malformed request message ({reason})"))
    context.abort(grpc.StatusCode[info.code], info.message)


def _checked_frames(frames: Iterator[Any]) -> Iterator[Any]:
    try:
        for frame in frames:
            if isinstance(frame, MalformedMessage):
                raise WireFormatError(f"malformed stream frame ({frame.reason})")
            yield frame
    except grpc.RpcError as exc:  # gRPC's request iterator raises it when the client goes away
        raise Cancelled("the client cancelled the call or its connection dropped mid-stream") from exc


def tolerant_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises; unparsable input -> INVALID_ARGUMENT."""
    handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
    if handler.request_streaming:
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
        inner = getattr(handler, kind)

        def streaming(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return inner(_checked_frames(request_iterator), context)

        return handler._replace(**{kind: streaming})
    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    inner = getattr(handler, kind)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, MalformedMessage):
            _abort_malformed(context, request.reason)
        return inner(request, context)

    return handler._replace(**{kind: unary})


def require_finite_float32(name: str, value: float) -> float:
    """``value`` if it is finite as a float32 (what the engine stores), else InvalidArgument."""
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise InvalidArgument(f"`{name}` must be a finite float32 number. Received: {name}={value!r}")
    return value


def require_finite_config(config: Any, path: str = "") -> None:
    """Refuse a NaN, an infinity or a float beyond float32 anywhere in an optimizer config.

    ``json.loads`` accepts ``NaN``, ``Infinity`` and ``1e400`` (-> inf), and Keras takes any
    number for ``beta_1``, ``epsilon``, ``clipnorm``... as well as for a learning-rate
    schedule's parameters; the engine stores them as float32, where they would poison every
    step. Nested dicts and lists (schedules) are checked too; ``path`` names the argument.
    """
    if isinstance(config, bool):
        return
    if isinstance(config, float):
        name = path or "value"
        if not math.isfinite(config) or abs(config) > _FLOAT32_MAX:
            raise InvalidArgument(f"`{name}` must be a finite float32 number. Received: {name}={config!r}")
    elif isinstance(config, dict):
        for key, value in config.items():
            require_finite_config(value, f"{path}.{key}" if path else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            require_finite_config(value, f"{path}[{i}]")


# ---------------------------------------------------------------- resource limits


@dataclass(frozen=True)
class ResourceLimits:
    """Per-optimizer caps; None means no cap.

    ``max_bytes_per_optimizer`` counts the model variables as sent to Build; the server
    holds about three times that (variables, ``momentum`` and ``norm`` slots), more with EMA
    or gradient accumulation.
    """

    max_variables_per_optimizer: int | None = None
    max_bytes_per_optimizer: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_variables_per_optimizer", "max_bytes_per_optimizer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None. Received: {name}={value!r}")

    def build_check(self) -> Callable[[Any], None]:
        """A ``check_tensor`` callback for one Build stream (counts as the headers arrive)."""
        count = 0
        total = 0

        def check(header: Any) -> None:
            nonlocal count, total
            count += 1
            if self.max_variables_per_optimizer is not None and count > self.max_variables_per_optimizer:
                raise ResourceExhausted(
                    f"limit max_variables_per_optimizer={self.max_variables_per_optimizer} exceeded: "
                    f"this Build has more variables"
                )
            # nbytes is checked against shape and dtype right after this callback
            total += max(int(header.nbytes), 0)
            if self.max_bytes_per_optimizer is not None and total > self.max_bytes_per_optimizer:
                raise ResourceExhausted(
                    f"limit max_bytes_per_optimizer={self.max_bytes_per_optimizer} exceeded: this Build "
                    f"announces at least {total} bytes of variables"
                )

        return check
