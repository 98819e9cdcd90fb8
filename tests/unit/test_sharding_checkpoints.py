"""Consistent cuts of a sharded job: assembled = the single server's snapshot; restore onto any shard count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.sharding.job import ShardedJob, assemble_checkpoint, split_checkpoint

from _sharding_helpers import MIN_PIECE, grads_ as _grads, values_ as _values

CONFIG = {"learning_rate": 0.01, "global_clipnorm": 0.5, "use_ema": True, "gradient_accumulation_steps": 2}


def _single(policy):
    coord = Coordinator(device="numba")
    _, host = coord.create("job", CONFIG, policy)
    return coord, host


def _push_single(host, w, r, step, grads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return host.push(w, r, step, lambda staging: list(grads.items()))


def _same_arrays(a, b):
    assert list(a) == list(b)
    for k in a:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k


@pytest.mark.parametrize("new_count", [1, 2, 3, 4])
def test_cut_assembles_to_the_single_server_snapshot_and_restores_onto_any_count(new_count):
    rng = np.random.default_rng(0)
    values = _values(rng)
    grads = [_grads(rng, values, sparse=k % 2 == 1, none=("b",) if k == 3 else ()) for k in range(8)]
    coord, host = _single(Policy())
    job = ShardedJob("job", CONFIG, Policy(), 3, device="numba", min_piece_bytes=MIN_PIECE)
    try:
        host.build(list(values.items()))
        job.build(values)
        for k in range(5):
            _push_single(host, "w", f"r{k}", k, grads[k])
            job.push("w", f"r{k}", k, grads[k])
        ckpt = job.checkpoint()
        assert {s.version for s in ckpt.shards} == {5}
        snap = assemble_checkpoint(ckpt)
        expected = host.snapshot()
        _same_arrays(snap.variables, expected.variables)
        _same_arrays(snap.store, expected.store)
        assert (snap.version, snap.iterations) == (expected.version, expected.iterations)
        assert snap.dedup == expected.dedup

        # Continue on the single server, and on a job of another shard count restored from the cut.
        other = ShardedJob("job", CONFIG, Policy(), new_count, device="numba", min_piece_bytes=MIN_PIECE)
        try:
            other.build(values)  # a fresh job; the restore replaces everything
            other.restore(ckpt)
            assert other.pull()[0] == 5
            retry = other.push("w", "r4", 4, grads[4])  # the exactly-once table came along
            assert retry.duplicate
            for k in range(5, 8):
                _push_single(host, "w", f"r{k}", k, grads[k])
                other.push("w", f"r{k}", k, grads[k])
            _same_arrays(other.pull()[2], host.pull((), lambda v, it, arrays: dict(arrays)).payload)
            _same_arrays(other.save_own_variables(), host.save_own_variables())
        finally:
            other.close()
    finally:
        job.close()
        coord.close()


def test_single_server_snapshot_splits_onto_shards():
    rng = np.random.default_rng(1)
    values = _values(rng)
    coord, host = _single(Policy())
    try:
        host.build(list(values.items()))
        for k in range(3):
            _push_single(host, "w", f"r{k}", k, _grads(rng, values))
        ckpt = split_checkpoint(host.snapshot(), 3, MIN_PIECE)
        assert ckpt.num_shards == 3 and any(len(v["pieces"]) > 1 for v in ckpt.placement["variables"])
        job = ShardedJob("job", CONFIG, Policy(), 3, device="numba", min_piece_bytes=MIN_PIECE)
        try:
            job.build(values)
            job.restore(ckpt)
            _same_arrays(job.save_own_variables(), host.save_own_variables())
        finally:
            job.close()
    finally:
        coord.close()


def test_open_sync_round_is_part_of_the_cut():
    rng = np.random.default_rng(2)
    values = _values(rng)
    policy = Policy(mode="sync", num_workers=3)
    g = [_grads(rng, values, sparse=True) for _ in range(3)]
    coord, host = _single(policy)
    job = ShardedJob("job", CONFIG, policy, 3, device="numba", min_piece_bytes=MIN_PIECE)
    try:
        host.build(list(values.items()))
        job.build(values)
        for w in (0, 1):
            _push_single(host, f"w{w}", "a", 0, g[w])
            job.push(f"w{w}", "a", 0, g[w])
        ckpt = job.checkpoint()
        assert sorted(assemble_checkpoint(ckpt).round, key=lambda c: c.worker_id)[0].worker_id == "w0"
        restored = ShardedJob("job", CONFIG, policy, 2, device="numba", min_piece_bytes=MIN_PIECE)
        try:
            restored.build(values)
            restored.restore(ckpt)
            assert restored.push("w2", "a", 0, g[2]).outcome == "round_closed"
            _push_single(host, "w2", "a", 0, g[2])
            _same_arrays(restored.pull()[2], host.pull((), lambda v, it, arrays: dict(arrays)).payload)
        finally:
            restored.close()
    finally:
        job.close()
        coord.close()
