"""Faults: injected transport failures, lost replies, concurrent retries, dead servers."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import numpy as np
import pytest

from _ps_helpers import running_server

from adamax_client import DeadlineExceededError, RemoteAdamax, RetryPolicy, UnavailableError
from adamax_server import Adamax
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.sharding.shard_engine import ShardEngine

VARS = {"w": np.zeros((3, 2), np.float32)}
GRAD = [np.ones((3, 2), np.float32)]
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)


class _InjectedUnavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "injected: connection reset"

    def trailing_metadata(self):
        return ()


class FailFirstCalls(grpc.StreamUnaryClientInterceptor, grpc.UnaryUnaryClientInterceptor):
    """Fails the first ``n`` calls of ``method`` before they reach the server."""

    def __init__(self, method: str, n: int) -> None:
        self.method, self.remaining, self.attempts = method, n, 0

    def _intercept(self, continuation, details, request):
        if details.method.endswith(self.method):
            self.attempts += 1
            if self.remaining > 0:
                self.remaining -= 1
                raise _InjectedUnavailable()
        return continuation(details, request)

    intercept_stream_unary = _intercept
    intercept_unary_unary = _intercept


class LoseReplies(grpc.ServerInterceptor):
    """Runs Push for real, then reports UNAVAILABLE for the first ``n`` calls: a lost reply."""

    def __init__(self, n: int) -> None:
        self.remaining = n
        self.request_ids: list[str] = []

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/Push"):
            return handler
        inner = handler.stream_unary

        def wrapped(request_iterator, context):
            def spy():
                for frame in request_iterator:
                    if not isinstance(frame, memoryview) and frame.WhichOneof("frame") == "header":
                        self.request_ids.append(frame.header.request_id)
                    yield frame

            reply = inner(spy(), context)
            if self.remaining > 0:
                self.remaining -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: reply lost after apply")
            return reply

        return handler._replace(stream_unary=wrapped)


def test_unavailable_before_sending_is_retried_with_backoff():
    with running_server() as (target, _):
        interceptor = FailFirstCalls("/Push", 2)
        # gRPC-level fault injection: pushes must go over gRPC (bulk faults: test_bulk.py)
        with RemoteAdamax(target, name="m", retry=FAST_RETRY, interceptors=[interceptor], bulk="off") as remote:
            remote.build(VARS)
            result = remote.apply(GRAD)
            assert result.outcome == "applied" and result.version == 1
            assert interceptor.attempts == 3 and remote.iterations == 1


def test_lost_reply_is_retried_with_the_same_request_id_and_applied_once():
    lose = LoseReplies(1)
    with running_server(interceptors=[lose]) as (target, coordinator):
        with RemoteAdamax(target, name="m", retry=FAST_RETRY, bulk="off") as remote:
            remote.build(VARS)
            result = remote.apply(GRAD)
            assert result.duplicate and result.version == 1
            assert len(lose.request_ids) == 2 and lose.request_ids[0] == lose.request_ids[1]
            assert remote.iterations == 1
            local = Adamax.from_config(remote.get_config(), device="cpu")
            local.build(VARS)
            local.apply(GRAD)
            np.testing.assert_array_equal(remote.pull()["w"], local.trainable_variables["w"])


class SlowAdamax(ShardEngine):
    def finish_step(self, *args, **kwargs):
        time.sleep(0.5)
        return super().finish_step(*args, **kwargs)


def test_retry_arriving_while_the_first_copy_is_applied_is_not_applied_twice():
    coordinator = Coordinator(engine_factory=lambda cfg: SlowAdamax.from_config(cfg, device="cpu"))
    with running_server(coordinator=coordinator) as (target, _):
        remote = RemoteAdamax(target, worker_id="w0", name="m")
        remote.build(VARS)
        results = []
        threads = [threading.Thread(target=lambda: results.append(remote.push(GRAD, request_id="same")))
                   for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(10)
        assert sorted(r.duplicate for r in results) == [False, True]
        assert {r.version for r in results} == {1}
        assert remote.iterations == 1
        remote.close()


def test_dead_server_raises_unavailable_within_the_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    start = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        RemoteAdamax(f"127.0.0.1:{port}", name="m", timeout=1.0, retry=FAST_RETRY)
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert time.monotonic() - start < 3


def test_waiting_pull_honours_the_call_deadline():
    with running_server() as (target, _):
        with RemoteAdamax(target, name="m", mode="sync", num_workers=2) as remote:
            remote.build(VARS)
            remote.apply(GRAD)  # round stays open: the second worker never comes
            start = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                remote.pull(timeout=0.3)
            assert time.monotonic() - start < 2
            assert isinstance(DeadlineExceededError("x"), TimeoutError)


def test_server_shutdown_wakes_waiting_pulls():
    with running_server() as (target, coordinator):
        remote = RemoteAdamax(target, name="m", mode="sync", num_workers=2, retry=FAST_RETRY, timeout=1)
        remote.build(VARS)
        remote.apply(GRAD)
        errors = []
        waiter = threading.Thread(target=lambda: _capture(errors, remote.pull))
        waiter.start()
        time.sleep(0.2)
        coordinator.close()
        waiter.join(5)
        assert not waiter.is_alive()
        assert errors and isinstance(errors[0], UnavailableError)
        remote.close()


def _capture(errors, fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        errors.append(exc)
