"""``ShardService.CallOnce``: the shard protocol's small calls in one message each way.

A streamed gRPC call costs several times a unary one in gRPC Python, and a sharded step makes
several small calls (the worker's commit at the leader; the leader's prepare and commit of the
event on every other shard). Those go as ``CallOnce``; calls with tensors of any size stream.
A server without ``CallOnce`` (an older release) answers UNIMPLEMENTED and the caller streams.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_server.ops.metrics import MetricsInterceptor, ServerMetrics
from adamax_server.sharding.server import stop_shard_server
from adamax_server.transport.security import TokenAuthInterceptor, TokenTable
from adamax_wire import pb
from adamax_wire import shard_codec as codec
from adamax_wire import tensors as _wire
from _sharding_helpers import remote_grads, remote_values, start_shard_servers


def _calls(metrics, method):
    return metrics.registry.get_sample_value("adamax_ps_rpcs_total", {"method": f"ShardService.{method}", "code": "OK"}) or 0


def _start(n, interceptors_for=lambda i: [], **kwargs):
    return start_shard_servers(n, kwargs_for=lambda i: {"interceptors": interceptors_for(i)}, **kwargs)


def test_batch_encoding_and_which_calls_go_once():
    frames = [_wire.header_frame(pb.ShardCallHeader(optimizer="j", method="commit", args_json="x" * 300, num_tensors=1))]
    frames += list(_wire.tensor_frames("t", np.arange(70_000, dtype=np.float32)))  # several chunks
    batch = pb.ShardCallBatch.FromString(codec.batch_bytes(frames))
    assert [f.SerializeToString() for f in batch.frames] == frames
    assert codec.batch_bytes([]) == b""
    small = codec.encode([np.zeros(10, np.float32)])[1]
    big = codec.encode([np.zeros(codec.ONCE_MAX_REQUEST_BYTES // 4 + 1, np.float32)])[1]
    assert codec.call_once("commit", []) and codec.call_once("mutate", small)
    assert not codec.call_once("mutate", big)  # a large assignment streams
    assert not codec.call_once("stage", small) and not codec.call_once("pull", [])  # tensors travel streamed


def test_every_steps_small_calls_go_once_and_match_streamed_ones():
    metrics = [ServerMetrics() for _ in range(2)]
    servers, targets = _start(2, lambda i: [MetricsInterceptor(metrics[i])], metrics=None)
    values = remote_values(1)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="once", timeout=30, learning_rate=0.01,
                          global_clipnorm=0.5) as opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="streamed", timeout=30, learning_rate=0.01,
                             global_clipnorm=0.5) as streamed:  # fmt: skip
            opt.build(values)
            streamed.build(values)
            for link in servers[0].shard_registry._leaders["streamed"].links:
                if hasattr(link, "_once_ok"):
                    link._once_ok = False  # the leader streams to shard 1 for this job
            for caller in streamed._callers:
                caller._once_ok = False
            before = [_calls(m, "CallOnce") for m in metrics]
            for k in range(4):
                assert opt.push(remote_grads(values, k)).outcome == streamed.push(remote_grads(values, k)).outcome
            after = [_calls(m, "CallOnce") for m in metrics]
            # Shard 0 took 4 commits, shard 1 a prepare and a commit per step, in one message each.
            assert after[0] - before[0] >= 4 and after[1] - before[1] >= 8
            got, want = opt.pull(), streamed.pull()
            for n in values:
                assert got[n].tobytes() == want[n].tobytes(), n
            # Errors come back the same way: a step ahead of the job.
            for target in (opt, streamed):
                with pytest.raises(client_errors.FailedPreconditionError, match="ahead of the current version 4"):
                    target.push(remote_grads(values, 9), step=9)
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


def test_a_server_without_call_once_is_streamed_to(monkeypatch):
    """An older shard server (no CallOnce): the client and the leader's links fall back, once."""
    from adamax_server.sharding import server as shard_server

    original = grpc.method_handlers_generic_handler

    def without_once(service, handlers):
        return original(service, {k: v for k, v in handlers.items() if k != "CallOnce"})

    monkeypatch.setattr(shard_server.grpc, "method_handlers_generic_handler", without_once)
    servers, targets = _start(2)
    monkeypatch.undo()
    values = remote_values(2)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="old", timeout=30, learning_rate=0.01) as opt:
            opt.build(values)
            for k in range(3):
                assert opt.push(remote_grads(values, k)).outcome == "applied"
            assert opt.pull(min_version=3)
            assert not any(c._once_ok for c in opt._callers)
            links = [link for link in servers[0].shard_registry._leaders["old"].links if hasattr(link, "_once_ok")]
            assert links and not any(link._once_ok for link in links)
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


def test_scoped_tokens_are_checked_on_call_once():
    """A token limited to some optimizers may commit to them through CallOnce, and not to others."""
    table = TokenTable.from_tokens({"all-secret": [], "scoped-secret": ["mine"]})
    servers, targets = _start(2, lambda i: [TokenAuthInterceptor(table)], link_token="all-secret")
    values = remote_values(3)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="mine", timeout=30, learning_rate=0.01,
                          token="scoped-secret") as mine:  # fmt: skip
            mine.build(values)
            assert mine.push(remote_grads(values, 0)).outcome == "applied"
            assert all(c._once_ok for c in mine._callers)  # the commit went once, and was allowed
        with RemoteAdamax(targets, worker_id="w", optimizer="theirs", timeout=30, learning_rate=0.01,
                          token="all-secret") as theirs:  # fmt: skip
            theirs.build(values)
        caller = RemoteAdamax(targets, worker_id="w", optimizer="mine", timeout=30, learning_rate=0.01,
                              token="scoped-secret")  # fmt: skip
        try:
            with pytest.raises(client_errors.PermissionDeniedError, match="theirs"):
                caller._callers[0]("theirs", "status", timeout=10)  # a small call: CallOnce
        finally:
            caller.close()
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)
