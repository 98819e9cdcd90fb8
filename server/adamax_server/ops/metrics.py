"""Prometheus metrics of a parameter server (prometheus-client), and the hooks that feed them.

Two sources feed one :class:`ServerMetrics` (its own ``CollectorRegistry``, so several servers
in one process, as in the tests, do not collide):

* :class:`MetricsInterceptor` sees every RPC: bytes in and out (counted in the
  (de)serializers, so chunk frames are counted without parsing them), push outcomes, rejected
  pushes by reason (the error type the server reported, else the status code).
* the coordinator calls the :class:`CoordinatorObserver` methods under the optimizer's lock:
  apply latency, iteration, gradient norm and clipping, round wait time and stragglers.
* the checkpoint code calls :meth:`ServerMetrics.observe_checkpoint`.

Metric names start with ``adamax_ps_``; ``ServerMetrics.serve_http(port)`` exposes
``/metrics``. The ``adamax-ps status --metrics host:port`` view reads the same endpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from adamax_server.errors import ERROR_TYPE_KEY

_log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_NORM_BUCKETS = tuple(10.0**e for e in range(-6, 7))
_ADAMAX_PREFIX = "/adamax.v1.AdamaxService/"
_SHARD_PREFIX = "/adamax.v1.ShardService/"


class ServerMetrics:
    """Every metric of one server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpcs = Counter("adamax_ps_rpcs", "RPCs handled, by method and status code", ["method", "code"], registry=r)
        self.bytes_in = Counter("adamax_ps_received_bytes", "Request bytes received, by method", ["method"], registry=r)
        self.bytes_out = Counter("adamax_ps_sent_bytes", "Response bytes sent, by method", ["method"], registry=r)
        self.pushes = Counter("adamax_ps_pushes", "Pushes answered, by optimizer and outcome", ["optimizer", "outcome"], registry=r)
        self.duplicates = Counter("adamax_ps_duplicate_pushes", "Retried pushes answered from the exactly-once table", ["optimizer"], registry=r)
        self.late_pushes = Counter("adamax_ps_late_pushes", "Sync pushes for an already closed round (dropped)", ["optimizer"], registry=r)
        self.rejected = Counter("adamax_ps_rejected_pushes", "Pushes refused, by reason", ["reason"], registry=r)
        self.apply_seconds = Histogram("adamax_ps_apply_seconds", "Engine apply latency", ["optimizer"], buckets=_LATENCY_BUCKETS, registry=r)
        self.round_wait = Histogram("adamax_ps_round_wait_seconds", "Sync rounds: first push to close", ["optimizer"], buckets=_WAIT_BUCKETS, registry=r)
        self.stragglers = Counter("adamax_ps_stragglers", "Sync rounds: workers missing when a round closed", ["optimizer"], registry=r)
        self.iterations = Gauge("adamax_ps_iterations", "Optimizer iterations", ["optimizer"], registry=r)
        self.grad_norm = Histogram("adamax_ps_gradient_norm", "Global L2 norm of applied gradients (unscaled)", ["optimizer"], buckets=_NORM_BUCKETS, registry=r)
        self.applies = Counter("adamax_ps_applies", "Engine applies (one per async push or sync round)", ["optimizer"], registry=r)
        self.clipped = Counter("adamax_ps_clipped_applies", "Applies whose gradient exceeded the clip threshold", ["optimizer"], registry=r)
        self.clip_rate = Gauge("adamax_ps_clip_rate", "clipped_applies / applies", ["optimizer"], registry=r)
        self.checkpoint_seconds = Histogram("adamax_ps_checkpoint_seconds", "Checkpoint write duration", buckets=_WAIT_BUCKETS, registry=r)
        self.checkpoint_bytes = Gauge("adamax_ps_checkpoint_bytes", "Size of the last checkpoint written", registry=r)
        self.checkpoints = Counter("adamax_ps_checkpoints", "Checkpoints written", registry=r)
        self.checkpoint_failures = Counter("adamax_ps_checkpoint_failures", "Checkpoint writes that failed", registry=r)
        self.checkpoint_failing = Gauge(
            "adamax_ps_checkpoint_consecutive_failures", "Failed checkpoint writes since the last one that succeeded",
            registry=r,
        )
        self.checkpoint_error = Gauge(
            "adamax_ps_checkpoint_last_error_info", "1, labelled with the error of the newest failed checkpoint write "
            "(absent once a write succeeds)", ["error"], registry=r,
        )
        # Sharded jobs: what each shard holds and how far it is (one series per optimizer and shard).
        self.shard_bytes = Gauge("adamax_ps_shard_bytes", "Model-variable bytes this shard holds (slots scale with them)", ["optimizer", "shard"], registry=r)
        self.shard_version = Gauge("adamax_ps_shard_version", "Weights version this shard has applied", ["optimizer", "shard"], registry=r)
        self.shard_staged = Gauge("adamax_ps_shard_staged_pushes", "Pushes staged on this shard, not yet decided", ["optimizer", "shard"], registry=r)
        self.shards_lagging = Gauge("adamax_ps_shards_lagging", "Leader: shards that have not confirmed the last decided version", ["optimizer"], registry=r)
        self._http: Any = None

    # -------------------------------------------------------------- coordinator hooks

    def on_apply(self, optimizer: str, seconds: float, stats: Mapping[str, Any], iterations: int, config: Mapping[str, Any]) -> None:
        """One engine apply took ``seconds``; ``stats`` are its gradients' ``GradientStats``."""
        self.apply_seconds.labels(optimizer).observe(seconds)
        self.iterations.labels(optimizer).set(iterations)
        self.applies.labels(optimizer).inc()
        norm, per_variable, max_abs = _norms(stats)
        scale = config.get("loss_scale_factor") or 1.0
        norm, per_variable, max_abs = norm / scale, [n / scale for n in per_variable], max_abs / scale
        if math.isfinite(norm):
            self.grad_norm.labels(optimizer).observe(norm)
        if _clipped(config, norm, per_variable, max_abs):
            self.clipped.labels(optimizer).inc()
        applies = self.applies.labels(optimizer)._value.get()
        self.clip_rate.labels(optimizer).set(self.clipped.labels(optimizer)._value.get() / max(applies, 1))

    def on_round_closed(self, optimizer: str, wait_seconds: float, arrived: int, num_workers: int) -> None:
        self.round_wait.labels(optimizer).observe(wait_seconds)
        if arrived < num_workers:
            self.stragglers.labels(optimizer).inc(num_workers - arrived)

    def on_iterations(self, optimizer: str, iterations: int) -> None:
        self.iterations.labels(optimizer).set(iterations)

    def observe_shard(self, optimizer: str, shard: int, nbytes: int, version: int, staged: int, lagging: int | None = None) -> None:
        label = str(shard)
        self.shard_bytes.labels(optimizer, label).set(nbytes)
        self.shard_version.labels(optimizer, label).set(version)
        self.shard_staged.labels(optimizer, label).set(staged)
        if lagging is not None:
            self.shards_lagging.labels(optimizer).set(lagging)

    def observe_checkpoint(self, seconds: float, nbytes: int) -> None:
        """Called by the checkpoint code after each checkpoint written."""
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_bytes.set(nbytes)
        self.checkpoint_failing.set(0)
        self.checkpoint_error.clear()

    def observe_checkpoint_failure(self, consecutive: int, error: str) -> None:
        """Called by the checkpoint code after each failed checkpoint write."""
        self.checkpoint_failures.inc()
        self.checkpoint_failing.set(consecutive)
        self.checkpoint_error.clear()
        self.checkpoint_error.labels(error[:200]).set(1)

    # -------------------------------------------------------------- exposition

    def serve_http(self, port: int, host: str = "127.0.0.1", labels: Mapping[str, str] | None = None) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port.

        ``labels`` are added to every series (a shard of a sharded job serves ``shard="<i>"``, so
        the same metric from every shard of a job stays apart after scraping).
        """
        registry = self.registry
        if labels:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Labelled(self.registry, dict(labels)))
        server, _thread = start_http_server(port, addr=host, registry=registry)
        self._http = server
        return int(server.server_address[1])

    # ------------------------------------------------------------ calls (gRPC and bulk channel)

    def observe_push(self, optimizer: str, worker_id: str, response: Any) -> None:
        """A handled push (``PushResponse``): outcome, retries answered from the dedup table."""
        from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb  # the servicer imported it already

        outcome = pb.PushOutcome.Name(response.outcome).lower()
        self.pushes.labels(optimizer, outcome).inc()
        if response.duplicate:
            self.duplicates.labels(optimizer).inc()
        if response.outcome == pb.DROPPED_LATE:
            self.late_pushes.labels(optimizer).inc()
        _log.debug(
            "push %s%s", outcome, " (retry)" if response.duplicate else "",
            extra={"optimizer": optimizer, "worker": worker_id, "version": response.version},
        )

    def observe_push_rejected(self, optimizer: str, worker_id: str, step: int, reason: str, details: str) -> None:
        self.rejected.labels(reason).inc()
        _log.info(
            "push rejected (%s): %s", reason, details,
            extra={"optimizer": optimizer, "worker": worker_id, "version": step, "reason": reason},
        )

    def observe_call(self, method: str, code: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """One finished call that no gRPC interceptor saw (the bulk channel's "BulkPush", ...)."""
        self.rpcs.labels(method, code).inc()
        if bytes_in:
            self.bytes_in.labels(method).inc(bytes_in)
        if bytes_out:
            self.bytes_out.labels(method).inc(bytes_out)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _norms(stats: Mapping[str, Any]) -> tuple[float, list[float], float]:
    """Global L2 norm, per-variable L2 norms and the largest magnitude, from the coordinator's
    one-pass ``GradientStats``. A gradient with non-finite elements has an infinite norm."""
    per_variable = []
    max_abs = 0.0
    for st in stats.values():
        per_variable.append(math.inf if st.non_finite else math.sqrt(st.sumsq))
        max_abs = math.inf if st.non_finite else max(max_abs, st.max_abs)
    return math.sqrt(sum(n * n for n in per_variable)), per_variable, max_abs


def _clipped(config: Mapping[str, Any], norm: float, per_variable: list[float], max_abs: float) -> bool:
    if config.get("global_clipnorm"):
        return norm > config["global_clipnorm"]
    if config.get("clipnorm"):
        return any(n > config["clipnorm"] for n in per_variable)
    if config.get("clipvalue"):
        return max_abs > config["clipvalue"]
    return False


# ---------------------------------------------------------------- the interceptor


def _counting_deserializer(fn: Any, counter: Any) -> Any:
    def deserialize(raw: bytes) -> Any:
        counter.inc(len(raw))
        return raw if fn is None else fn(raw)

    return deserialize


def _counting_serializer(fn: Any, counter: Any) -> Any:
    def serialize(message: Any) -> bytes:
        raw = message if fn is None else fn(message)
        counter.inc(len(raw))
        return raw

    return serialize


class _Labelled:
    """A collector that yields another registry's series with extra labels (kept where a series has them)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Any:
        for family in self._registry.collect():
            family.samples = [s._replace(labels={**self._labels, **s.labels}) for s in family.samples]
            yield family


class _PushSpy:
    """Remembers the push header of a request stream as it passes by."""

    __slots__ = ("optimizer", "worker_id", "step")

    def __init__(self) -> None:
        self.optimizer, self.worker_id, self.step = "", "", -1

    def frames(self, request_iterator: Any) -> Any:
        for frame in request_iterator:
            if self.step < 0 and hasattr(frame, "WhichOneof") and frame.WhichOneof("frame") == "header":
                header = frame.header
                self.optimizer, self.worker_id, self.step = header.optimizer, header.worker_id, header.step
            yield frame


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC (outermost interceptor, so refused calls are counted too) and logs
    push outcomes with optimizer, worker and version."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if method.startswith(_ADAMAX_PREFIX):
            name = method[len(_ADAMAX_PREFIX):]
        elif method.startswith(_SHARD_PREFIX):  # sharded jobs: counted as "ShardService.Call"
            name = "ShardService." + method[len(_SHARD_PREFIX):]
        else:
            return handler
        m = self._m
        handler = handler._replace(
            request_deserializer=_counting_deserializer(handler.request_deserializer, m.bytes_in.labels(name)),
            response_serializer=_counting_serializer(handler.response_serializer, m.bytes_out.labels(name)),
        )
        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        inner = getattr(handler, kind)
        is_push = name == "Push"

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            spy = _PushSpy() if is_push else None
            try:
                response = inner(spy.frames(request) if spy else request, context)
            except BaseException:
                code = _code_name(context)
                m.rpcs.labels(name, code).inc()
                if spy is not None:
                    m.observe_push_rejected(spy.optimizer, spy.worker_id, spy.step,
                                            _error_type(context) or code, _details(context))  # fmt: skip
                raise
            if spy is not None:
                self._observe_push(spy, response)
            if not handler.response_streaming:
                m.rpcs.labels(name, "OK").inc()
                return response
            return self._count_stream(name, response, context)

        return handler._replace(**{kind: observed})

    def _observe_push(self, spy: _PushSpy, response: Any) -> None:
        self._m.observe_push(spy.optimizer, spy.worker_id, response)

    def _count_stream(self, name: str, frames: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from frames
        except BaseException:
            self._m.rpcs.labels(name, _code_name(context)).inc()
            raise
        self._m.rpcs.labels(name, "OK").inc()


def _details(context: Any) -> str:
    try:
        return str(context.details() or "")
    except Exception:  # noqa: BLE001
        return ""


def _code_name(context: Any) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio contexts have no code()
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _error_type(context: Any) -> str | None:
    try:
        for key, value in context.trailing_metadata() or ():
            if key == ERROR_TYPE_KEY:
                return str(value)
    except Exception:  # noqa: BLE001
        return None
    return None
