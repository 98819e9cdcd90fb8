"""Faults of a sharded job, in process: a shard cut off before, during and after a push, a worker
that dies between staging and commit, a shard that restarts from its checkpoint.

Invariant checked each time: no shard applies a push the others do not (all or none), a decided
push is applied exactly once, and the job ends equal to a single server given the pushes that
took effect.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest


from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.errors import FailedPrecondition, Unavailable
from adamax_server.sharding.job import ShardedJob
from adamax_server.sharding.leader import DecidedUnconfirmed, ShardUnavailable

from _sharding_helpers import MIN_PIECE, grads_ as _grads, values_ as _values

CONFIG = {"learning_rate": 0.01, "clipnorm": 0.3}


@pytest.fixture
def setup():
    rng = np.random.default_rng(7)
    values = _values(rng)
    grads = [_grads(rng, values, sparse=k % 2 == 0) for k in range(10)]
    coord = Coordinator(device="numba")
    _, single = coord.create("job", CONFIG, Policy())
    single.build(list(values.items()))
    job = ShardedJob("job", CONFIG, Policy(), 3, device="numba", min_piece_bytes=MIN_PIECE)
    job.build(values)
    yield job, single, grads
    job.close()
    coord.close()


def _apply_single(single, k, grads, step=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single.push("w", f"r{k}", k if step is None else step, lambda staging: list(grads[k].items()))


def _versions(job):
    return [h.version for h in job.hosts]


def _assert_equal(job, single):
    version, _, weights = job.pull()
    expected = single.pull((), lambda v, it, arrays: dict(arrays))
    assert version == expected.version
    for name, value in expected.payload.items():
        assert weights[name].tobytes() == value.tobytes(), name


def test_shard_cut_before_commit_applies_nothing_and_the_retry_applies_once(setup):
    job, single, grads = setup
    job.push("w", "r0", 0, grads[0])
    _apply_single(single, 0, grads)
    job.stage("w", "r1", grads[1])
    job.links[2].cut = True
    with pytest.raises(ShardUnavailable, match="shard 2 .*nothing was applied"):
        job.leader.push("w", "r1", 1)
    assert _versions(job) == [1, 1, 1] and job.leader.version == 1
    job.links[2].cut = False
    assert job.leader.push("w", "r1", 1).outcome == "applied"  # staged data was kept
    _apply_single(single, 1, grads)
    assert job.leader.push("w", "r1", 1).duplicate
    _assert_equal(job, single)


def test_shard_cut_while_staging_fails_the_push_cleanly(setup):
    job, single, grads = setup
    job.links[1].cut = True
    with pytest.raises(ShardUnavailable):
        job.push("w", "r0", 0, grads[0])
    assert _versions(job) == [0, 0, 0]
    job.links[1].cut = False
    job.push("w", "r0", 0, grads[0])
    _apply_single(single, 0, grads)
    _assert_equal(job, single)


class _CutAfterCommit:
    """Let the commit reach the shard, then lose the reply and the link (a cut mid-call)."""

    def __init__(self, link):
        self.link = link
        self.inner = link.host

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != "commit":
            return attr

        def commit(*args):
            out = attr(*args)
            self.link.cut = True
            return out

        return commit


def test_reply_lost_during_commit_is_decided_and_redelivered(setup):
    job, single, grads = setup
    job.links[1].host = _CutAfterCommit(job.links[1])
    with pytest.raises(DecidedUnconfirmed, match="decided"):
        job.push("w", "r0", 0, grads[0])
    job.links[1].host = job.hosts[1]
    # Every shard applied it (shard 1 too: only its reply was lost); nothing else is decided.
    assert _versions(job) == [1, 1, 1]
    with pytest.raises(Unavailable):
        job.leader.push("w", "r1", 1)  # refused while shard 1 has not confirmed
    job.links[1].cut = False
    again = job.leader.push("w", "r0", 0)  # the retry learns the outcome; applied once
    assert again.outcome == "applied" and again.duplicate
    _apply_single(single, 0, grads)
    job.push("w", "r1", 1, grads[1])
    _apply_single(single, 1, grads)
    _assert_equal(job, single)


def test_commit_that_never_reached_a_shard_is_redelivered(setup):
    job, single, grads = setup
    job.stage("w", "r0", grads[0])
    real = job.hosts[2]

    class DropCommit:
        def __getattr__(self, name):
            if name == "commit":
                def commit(*args):
                    job.links[2].cut = True
                    raise ShardUnavailable("shard 2 is unreachable")
                return commit
            return getattr(real, name)

    job.links[2].host = DropCommit()
    with pytest.raises(DecidedUnconfirmed):
        job.leader.push("w", "r0", 0)
    assert _versions(job) == [1, 1, 0]  # decided; shard 2 has it prepared, not applied
    job.links[2].host = real
    job.links[2].cut = False
    assert job.leader.push("w", "r0", 0).duplicate  # redelivered first, then answered
    assert _versions(job) == [1, 1, 1]
    _apply_single(single, 0, grads)
    _assert_equal(job, single)


def test_worker_dying_between_stage_and_commit_leaves_nothing_applied(setup):
    job, single, grads = setup
    now = [0.0]
    for h in job.hosts:
        h._clock = lambda: now[0]
    job.stage("dead", "r0", grads[3], shards=[0, 1])  # died mid-push: never staged on 2, never committed
    job.push("w", "r0", 0, grads[0])
    _apply_single(single, 0, grads)
    now[0] += job.staging_ttl + 1
    job.push("w", "r1", 1, grads[1])  # staging a new push expires the dead worker's slices
    _apply_single(single, 1, grads)
    assert all(("dead", "r0") not in h.staged_keys() for h in job.hosts)
    with pytest.raises(FailedPrecondition, match="not staged"):
        job.leader.push("dead", "r0", 2)
    _assert_equal(job, single)


def test_restarted_shard_makes_the_job_restore_one_cut(setup):
    job, single, grads = setup
    for k in range(3):
        job.push("w", f"r{k}", k, grads[k])
        _apply_single(single, k, grads)
    ckpt = job.checkpoint()
    expected_store = single.save_own_variables()
    job.push("w", "r3", 3, grads[3])  # acknowledged after the cut: lost by the restart below
    job.replace_shard(1, ckpt.shards[1])  # kill -9, then serve --restore latest
    with pytest.raises(FailedPrecondition, match="restarted"):
        job.push("w", "r4", 4, grads[4])
    assert job.leader.version == 4 and _versions(job) == [4, 3, 4]
    with pytest.raises(FailedPrecondition, match="restore"):
        job.push("w", "r4", 4, grads[4])
    job.restore(ckpt)
    assert _versions(job) == [3, 3, 3]
    saved = job.save_own_variables()
    for k, v in expected_store.items():
        assert np.asarray(saved[k]).tobytes() == np.asarray(v).tobytes()
    for k in (3, 4):  # the lost push is pushed again
        job.push("w", f"r{k}", k, grads[k])
        _apply_single(single, k, grads)
    _assert_equal(job, single)


def test_sync_round_with_a_shard_cut_keeps_one_decision():
    rng = np.random.default_rng(8)
    values = _values(rng)
    policy = Policy(mode="sync", num_workers=2)
    job = ShardedJob("job", CONFIG, policy, 3, device="numba", min_piece_bytes=MIN_PIECE)
    coord = Coordinator(device="numba")
    try:
        _, single = coord.create("job", CONFIG, policy)
        single.build(list(values.items()))
        job.build(values)
        g = [_grads(rng, values) for _ in range(2)]
        assert job.push("w0", "a", 0, g[0]).outcome == "accepted"
        job.stage("w1", "a", g[1])
        job.links[0].cut = True  # the leader cannot reach its own shard host
        with pytest.raises(ShardUnavailable):
            job.leader.push("w1", "a", 0)
        assert _versions(job) == [0, 0, 0]
        job.links[0].cut = False
        assert job.leader.push("w1", "a", 0).outcome == "round_closed"
        for w in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                single.push(f"w{w}", "a", 0, lambda staging, w=w: list(g[w].items()))
        _assert_equal(job, single)
    finally:
        job.close()
        coord.close()
