"""A push with one stage (a one-shard job) carries its commit: the leader stages it, commits it and
answers with the outcome in one call (the bulk header's ``commit``, or ``stage_push`` over gRPC),
instead of a stage and then a separate commit call.

Results, outcomes, exactly-once retries and errors must be those of the two-call path; a shard
that is not the leader, and a single server, refuse a push carrying ``commit``.
"""

from __future__ import annotations

import numpy as np
import pytest

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_wire import pb
from _ps_helpers import running_server
from _sharding_helpers import remote_grads, remote_values, start_shard_servers, stop_shard_servers


def _record(server) -> list[str]:
    """Methods the shard's registry dispatches from now on (the gRPC and the bulk calls)."""
    registry = server.shard_registry
    seen: list[str] = []
    original = registry.dispatch

    def dispatch(key, method, args):
        seen.append(method)
        return original(key, method, args)

    registry.dispatch = dispatch
    return seen


@pytest.mark.parametrize("bulk", ["tcp", "auto", "off"])
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_one_shard_push_is_one_call_and_equals_the_two_call_path(bulk, mode):
    one, one_targets = start_shard_servers(1)
    two, two_targets = start_shard_servers(2)
    values = remote_values(5)
    kwargs = dict(timeout=30, learning_rate=0.01, global_clipnorm=0.7, mode=mode, bulk=bulk)
    try:
        with RemoteAdamax(one_targets, worker_id="w", optimizer="j", **kwargs) as opt, \
                RemoteAdamax(two_targets, worker_id="w", optimizer="j", **kwargs) as ref:  # fmt: skip
            opt.build(values)
            ref.build(values)
            assert opt._describe_cache["stage_push"]
            seen = _record(one[0])
            for k in range(5):
                got, want = opt.push(remote_grads(values, k)), ref.push(remote_grads(values, k))
                assert (got.outcome, got.version, got.iterations) == (want.outcome, want.version, want.iterations)
                opt.pull(), ref.pull()
            assert seen.count("stage_push") == 5 and "push" not in seen  # no separate commit call
            got, want = opt.pull(), ref.pull()
            for n in values:
                assert got[n].tobytes() == want[n].tobytes(), n
            store, ref_store = {}, {}
            opt.save_own_variables(store)
            ref.save_own_variables(ref_store)
            assert store.keys() == ref_store.keys()
            for n in ref_store:
                assert np.asarray(store[n]).tobytes() == np.asarray(ref_store[n]).tobytes(), n
            # A retry is answered from the leader's table, and its re-staged copy is dropped.
            grads = remote_grads(values, 7)
            first = opt.push(grads, request_id="again")
            retry = opt.push(grads, request_id="again", step=first.version - 1)
            assert retry.duplicate and retry.version == first.version
            assert one[0].shard_registry.host("j").staged_keys() == []
            # Errors come back the same way: a step ahead of the job.
            with pytest.raises(client_errors.FailedPreconditionError, match="ahead of the current version"):
                opt.push(remote_grads(values, 9), step=99)
    finally:
        stop_shard_servers(one + two)


def test_only_the_leader_takes_a_stage_with_its_commit():
    servers, targets = start_shard_servers(2)
    values = remote_values(6)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="j", timeout=30, learning_rate=0.01) as opt:
            opt.build(values)
            with pytest.raises(client_errors.FailedPreconditionError, match="leader of the job is shard 0"):
                opt._callers[1]("j", "stage_push", "w", "r", [], 0, timeout=10)
            assert servers[1].shard_registry.host("j").staged_keys() == []  # refused before staging
            # Bulk: a commit sent to shard 1's channel is refused the same way.
            piece = opt._placement.on_shard(1)
            name, rows = piece[0][0].name, piece[0][0].piece_shape(piece[0][1])
            channels = opt._channels
            with pytest.raises(client_errors.FailedPreconditionError, match="leader of the job is shard 0"):
                channels.stage(1, "r2", 0, [(name, np.zeros(rows, np.dtype(piece[0][0].dtype)))], wire=None,
                               timeout=10, commit=True)  # fmt: skip
            assert servers[1].shard_registry.host("j").staged_keys() == []
    finally:
        stop_shard_servers(servers)


def test_a_single_server_refuses_a_push_carrying_commit():
    values = remote_values(7)
    with running_server() as (target, coordinator):
        with RemoteAdamax(target, worker_id="w", optimizer="j", timeout=30, learning_rate=0.01, bulk="tcp") as opt:
            opt.build(values)
            opt.push(remote_grads(values, 0))  # opens the bulk channel
            header = pb.PushHeader(optimizer="j", worker_id="w", step=1, request_id="c", num_tensors=1, commit=True)
            with pytest.raises(client_errors.InvalidArgumentError, match="sharded job's leader shard"):
                opt._bulk.push(header, [("w", np.zeros((64, 64), np.float32))], wire=None, timeout=10)
            assert coordinator.get("j").version == 1  # nothing applied
            assert opt.push(remote_grads(values, 1)).version == 2  # the connection is still good
