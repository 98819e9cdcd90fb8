"""Bad input over the wire is refused as a whole, with a status that says what is wrong.

Complements tests/test_service_remote.py (unknown names, shapes, dtypes, NaN, rows out of
range through the client) with what only hand-made frames can send: byte lengths that do not
match the shape, truncated streams, one bad tensor after good ones, and non-finite settings.
"""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest

from _ps_helpers import assert_same_state, running_server, snapshot

from adamax_client import InvalidArgumentError, RemoteAdamax, RowSparseGradient
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server import Adamax
from adamax_server.transport.server import SERVICE_NAME

VARS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32), "e": np.zeros((5, 2), np.float32)}


@pytest.fixture()
def server():
    with running_server() as (target, coordinator):
        with RemoteAdamax(target, name="m", worker_id="w0", learning_rate=0.1) as remote:
            remote.build(VARS)
            yield target, coordinator, remote


def _push(target, frames):
    with grpc.insecure_channel(target) as channel:
        stub = channel.stream_unary(f"/{SERVICE_NAME}/Push", request_serializer=lambda b: b,
                                    response_deserializer=pb.PushResponse.FromString)
        try:
            stub(iter(frames), timeout=30)  # a first GPU push in a fresh process can take seconds
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _header(request_id="r1", step=0):
    return _wire.header_frame(pb.PushHeader(optimizer="m", worker_id="raw", step=step, request_id=request_id))


def _tensor(name, array, **overrides):
    frames = list(_wire.tensor_frames(name, array))
    if overrides:
        header = pb.TensorHeader.FromString(bytes(frames[0][2:]))  # tag + 1-byte length for small headers
        for key, value in overrides.items():
            setattr(header, key, value) if not isinstance(value, list) else header.ClearField(key) or getattr(header, key).extend(value)
        frames[0] = _wire.message_frame(_wire.TENSOR_FIELD, header)
    return frames


GOOD = [*_tensor("w", np.ones((3, 2), np.float32)), *_tensor("b", np.ones(4, np.float32))]


@pytest.mark.parametrize(
    "frames, match",
    [
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32), nbytes=39)], "header announces 39 bytes"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32))[:-1]], "stream ended after 0 of 40 bytes"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32)), b"\x7a\x04abcd"], "more than the announced"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32), shape=[5, 3])], r"has shape \(5, 3\)"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float64))], None),  # float64 gradient of a float32 variable
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.int64))], "gradients must be one of"),
        ([*GOOD, *_tensor("e", np.full((5, 2), np.inf, np.float32))], "non-finite values in 'e'"),
        ([*GOOD, *_tensor("zz", np.ones(2, np.float32))], "has no variable 'zz'"),
        ([*GOOD, *_tensor("w", np.ones((3, 2), np.float32))], "two gradients for variable 'w'"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32), dtype=99)], "unknown wire dtype 99"),
        ([*GOOD, *_tensor("e", RowSparseGradient(np.array([0, 5]), np.ones((2, 2), np.float32)))],
         r"row indices must be in \[0, 5\)"),
        ([*GOOD, *_tensor("e", RowSparseGradient(np.array([0, -1]), np.ones((2, 2), np.float32)))],
         r"row indices must be in \[0, 5\)"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32), shape=[5, -2])], r"has shape \(5, -2\)"),
        ([*GOOD, *_tensor("e", np.ones((5, 2), np.float32), shape=[2**40, 2**40])], "but the variable has shape"),
        ([_header(), *GOOD], "the call header must be the first frame"),
        ([*GOOD[:1], *GOOD], None),
        ([b"\xff\xff"], "malformed"),
    ],
)
def test_one_bad_tensor_among_good_ones_rejects_the_whole_push(server, frames, match):
    target, coordinator, _ = server
    host = coordinator.get("m")
    before = snapshot(host)
    code, details = _push(target, [_header(), *frames])
    if match is None:  # accepted forms: check they are applied as a whole instead
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), details
        if code != grpc.StatusCode.OK:
            assert_same_state(before, snapshot(host))
        return
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, details)
    assert re.search(match, details), details
    assert_same_state(before, snapshot(host))
    code, _ = _push(target, [_header(), *GOOD])  # the same request id applies once it is well formed
    assert code == grpc.StatusCode.OK and host.version == 1


def test_duplicate_sparse_rows_add_up_like_keras(server):
    target, coordinator, remote = server
    rows = RowSparseGradient(np.array([1, 3, 1]), np.array([[1, 2], [3, 4], [5, 6]], np.float32))
    remote.apply({"e": rows})
    local = Adamax(learning_rate=0.1, device="cpu")
    local.build(VARS)
    dense = np.zeros((5, 2), np.float32)
    dense[1] = [6, 8]
    dense[3] = [3, 4]
    local.apply({"e": dense})
    np.testing.assert_array_equal(remote.pull()["e"], local.trainable_variables["e"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_non_finite_learning_rate_is_refused(server, value):
    _, coordinator, remote = server
    before = snapshot(coordinator.get("m"))
    with pytest.raises(InvalidArgumentError, match="finite float32"):
        remote.learning_rate = value
    assert_same_state(before, snapshot(coordinator.get("m")))


def test_nan_in_a_sync_round_changes_nothing(server):
    target, coordinator, _ = server
    with RemoteAdamax(target, name="s", worker_id="w0", mode="sync", num_workers=2) as remote:
        remote.build(VARS)
        host = coordinator.get("s")
        before = snapshot(host)
        bad = np.ones((3, 2), np.float32)
        bad[0, 0] = np.nan
        with pytest.raises(InvalidArgumentError, match="non-finite"):
            remote.apply({"w": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32), "e": None} | {"w": bad})
        assert_same_state(before, snapshot(host))  # not counted in the round either


def _counted_header(num_tensors, request_id="cut-1"):
    return _wire.header_frame(
        pb.PushHeader(optimizer="m", worker_id="raw", step=0, request_id=request_id, num_tensors=num_tensors)
    )


def test_a_push_cut_between_two_tensors_is_not_taken_for_a_whole_push(server):
    """A cancelled call can end like a complete stream; the announced count catches it.

    Without it, the first tensor alone would be applied (a partial update) and recorded as the
    request's outcome, so the worker's retry of the whole push would be answered as a duplicate.
    """
    target, coordinator, _ = server
    host = coordinator.get("m")
    before = snapshot(host)
    code, details = _push(target, [_counted_header(2), *GOOD[: len(GOOD) // 2]])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "announced 2 tensors" in details, (code, details)
    assert_same_state(before, snapshot(host))
    code, details = _push(target, [_counted_header(2)])  # the header alone, then the cut
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert_same_state(before, snapshot(host))
    code, _ = _push(target, [_counted_header(2), *GOOD])  # the retry, whole: applied once
    assert code == grpc.StatusCode.OK and host.version == 1


def test_a_push_without_tensors_is_rejected(server):
    target, coordinator, _ = server
    host = coordinator.get("m")
    before = snapshot(host)
    code, details = _push(target, [_header(request_id="empty")])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no tensors" in details, (code, details)
    assert_same_state(before, snapshot(host))
