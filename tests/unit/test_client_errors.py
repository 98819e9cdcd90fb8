"""Client unit tests: status -> exception mapping, retries, argument validation. No server."""

from __future__ import annotations

import time

import grpc
import pytest

import _ps_helpers  # noqa: F401  (puts client/ and server/ on sys.path)

from adamax_client import errors
from adamax_client import RemoteAdamax, RetryPolicy
from adamax_client.transport import Transport


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details="boom", metadata=()):
        self._code, self._details, self._metadata = code, details, metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


@pytest.mark.parametrize("code, cls, builtin", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError, ValueError),
    (grpc.StatusCode.NOT_FOUND, errors.NotFoundError, KeyError),
    (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError, errors.AdamaxError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError, errors.AdamaxError),
    (grpc.StatusCode.ABORTED, errors.AbortedError, errors.AdamaxError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError, TimeoutError),
    (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError, ConnectionError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError, errors.AdamaxError),
    (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError, errors.AdamaxError),
    (grpc.StatusCode.UNIMPLEMENTED, errors.UnimplementedError, NotImplementedError),
    (grpc.StatusCode.INTERNAL, errors.InternalError, errors.AdamaxError),
])
def test_every_status_maps_to_one_exception_class(code, cls, builtin):
    exc = errors.from_rpc_error(FakeRpcError(code, "what went wrong"))
    assert type(exc) is cls and isinstance(exc, builtin) and isinstance(exc, errors.AdamaxError)
    assert str(exc) == "what went wrong" and not isinstance(exc, grpc.RpcError)


def test_metadata_refines_the_class_and_carries_the_current_version():
    stale = errors.from_rpc_error(FakeRpcError(
        grpc.StatusCode.ABORTED, "old", ((errors.ERROR_TYPE_KEY, "StaleGradient"), (errors.CURRENT_VERSION_KEY, "17"))))
    assert isinstance(stale, errors.StaleGradientError) and stale.current_version == 17
    typed = errors.from_rpc_error(FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, "no", ((errors.ERROR_TYPE_KEY, "TypeError"),)))
    assert isinstance(typed, TypeError) and isinstance(typed, ValueError)
    # a type hint that does not fit the code is ignored
    odd = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "x", ((errors.ERROR_TYPE_KEY, "StaleGradient"),)))
    assert type(odd) is errors.NotFoundError


def make_transport(**kwargs):
    return Transport("127.0.0.1:1", timeout=kwargs.pop("timeout", 2.0),
                     retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02, jitter=0.0, **kwargs))


def test_only_unavailable_is_retried():
    transport = make_transport()
    calls = []

    def flaky(remaining):
        calls.append(remaining)
        if len(calls) < 3:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        return "ok"

    assert transport._with_retries(flaky, None) == "ok" and len(calls) == 3
    assert calls[0] > calls[1] > calls[2]  # each attempt gets what is left of one deadline

    calls.clear()

    def invalid(remaining):
        calls.append(remaining)
        raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad")

    with pytest.raises(errors.InvalidArgumentError, match="bad") as info:
        transport._with_retries(invalid, None)
    assert len(calls) == 1 and isinstance(info.value.__cause__, grpc.RpcError)
    transport.close()


def test_retries_stop_at_max_attempts_and_at_the_deadline():
    transport = make_transport(max_attempts=3)
    calls = []

    def down(remaining):
        calls.append(1)
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")

    with pytest.raises(errors.UnavailableError):
        transport._with_retries(down, None)
    assert len(calls) == 3
    transport.close()

    slow = Transport("127.0.0.1:1", timeout=0.2, retry=RetryPolicy(initial_backoff=0.15, max_backoff=0.15, jitter=0))
    start = time.monotonic()
    with pytest.raises(errors.UnavailableError):
        slow._with_retries(down, None)
    assert time.monotonic() - start < 0.5
    slow.close()


def test_backoff_grows_exponentially_up_to_the_cap():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2, max_backoff=0.5, jitter=0)
    assert [policy.backoff(a) for a in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_every_call_has_a_deadline():
    with pytest.raises(ValueError, match="`timeout` must be a positive number"):
        Transport("127.0.0.1:1", timeout=None)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": ["a:1", "b:2"], "mode": "eventually"}, "`mode` must be one of"),  # a sharded job checks first too
    ({"target": ["a:1", "b:2"], "sharded": False}, "one 'host:port' with sharded=False"),
    ({"target": ["a:1", "b:2"], "bogus": 3}, "not recognized"),
    ({"gradient_wire_dtype": "int8"}, "`gradient_wire_dtype` must be one of"),
    ({"mode": "eventually"}, "`mode` must be one of"),
    ({"aggregation": "max"}, "`aggregation` must be one of"),
    ({"bogus": 3}, "not recognized"),
    ({"learning_rate": object()}, "`learning_rate` should be float"),
])
def test_constructor_validates_locally(kwargs, match):
    kwargs = {"target": "127.0.0.1:1", **kwargs}
    with pytest.raises(ValueError, match=match):
        RemoteAdamax(timeout=0.5, **kwargs)


def test_from_config_requires_a_target():
    with pytest.raises(ValueError, match="`target`"):
        RemoteAdamax.from_config({"learning_rate": 0.1})
