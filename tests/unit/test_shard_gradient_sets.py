"""A shard's staged pushes received into pooled gradient sets and swapped in at prepare
(``sharding.gradient_sets``): no copy, and never a gradient overwritten while its push is staged.

Each scenario runs twice on a one-shard ``ShardHost``: with every push received into a gradient
set (as the bulk channel stages), and with plain arrays (as the gRPC ``stage`` does, copied in at
prepare). Weights and the Keras store must be equal bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from adamax_server.coordination.stats import ReceivedGradients
from adamax_server.sharding.shard import ShardHost
from adamax_server.sharding.pairwise import Piece
from adamax_server.sharding.shard_engine import CLIP_GLOBAL, CLIP_NORM, ClipDecision, ShardEngine, decide_clipping

SPECS = [("w", (64, 16), "float32"), ("b", (16,), "float32"), ("d", (8, 4), "float64")]


def _host(config=None, policy=None) -> ShardHost:
    config = {"learning_rate": 0.01, **(config or {})}
    host = ShardHost("opt", 0, 1, lambda cfg: ShardEngine.from_config(dict(cfg), device="cpu"), config,
                     policy or {"mode": "async", "num_workers": 2})  # fmt: skip
    rng = np.random.default_rng(0)
    host.build(SPECS, {n: rng.standard_normal(s).astype(d) for n, s, d in SPECS})
    return host


def _grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(d) for n, s, d in SPECS}


def _stage(host: ShardHost, key: tuple[str, str], grads: dict[str, np.ndarray], in_set: bool) -> list:
    if not in_set:
        host.stage(*key, list(grads.items()))
        return []
    taken: list = []
    lookup = host.receive_lookup(taken)
    assert lookup is not None
    received = ReceivedGradients()
    for name, g in grads.items():
        buf = lookup(name, g.dtype)
        buf[...] = g.reshape(-1)  # "received" in place
        received.append((name, buf.reshape(g.shape)))
    received.gradient_sets = taken
    host.stage(*key, received)
    return taken


def _state(host: ShardHost) -> dict[str, np.ndarray]:
    _, store, _ = host.save_own_variables()
    return {**host.pull()[2], **{f"store:{k}": v for k, v in store.items()}}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _engine_buffers(host: ShardHost) -> dict:
    return host.read_engine(lambda e: e.current_gradient_set())


def test_a_lone_push_lands_in_the_engine_buffers_and_an_overlapping_one_is_swapped_in():
    host = _host()
    engine_set = _engine_buffers(host)
    taken = _stage(host, ("w0", "r0"), _grads(1), in_set=True)
    assert all(taken[0][1][g] is engine_set[g] for g in engine_set)  # idle: the engine's own buffers
    host.prepare(1, [("w0", "r0")], False, "sum")
    assert all(_engine_buffers(host)[g] is engine_set[g] for g in engine_set)  # nothing to swap
    # Received while event 1 is prepared: its own set (the engine's buffers hold event 1).
    taken2 = _stage(host, ("w1", "r1"), _grads(2), in_set=True)
    other = taken2[0][1]
    assert all(not np.shares_memory(other[g], engine_set[g]) for g in engine_set)
    host.commit(1, "apply", ClipDecision(0))
    host.prepare(2, [("w1", "r1")], False, "sum")
    assert all(_engine_buffers(host)[g] is other[g] for g in other)  # swapped in: read in place
    host.commit(2, "apply", ClipDecision(0))
    # The buffers it replaced went back to the pool; the next lone push gets the engine's own.
    assert any(s["float32"] is engine_set["float32"] for s in host._sets._free[taken2[0][0]])
    taken3 = _stage(host, ("w0", "r2"), _grads(3), in_set=True)
    assert all(taken3[0][1][g] is other[g] for g in other)


@pytest.mark.parametrize("config", [{}, {"clipnorm": 0.5}, {"global_clipnorm": 0.3},
                                    {"use_ema": True, "gradient_accumulation_steps": 2}],
                         ids=["plain", "clipnorm", "global", "ema-acc"])
def test_in_place_equals_copy_for_async_pushes(config):
    results = []
    for in_set in (True, False):
        host = _host(config)
        for k in range(5):
            _stage(host, ("w0", f"r{k}"), _grads(10 + k), in_set)
            reply = host.prepare(k + 1, [("w0", f"r{k}")], False, "sum")
            host.commit(k + 1, "apply", _decision(host, reply))
        results.append(_state(host))
    _assert_same(*results)


def _decision(host: ShardHost, reply) -> ClipDecision:
    """The leader's decision for a one-shard job (``Leader._decide``)."""
    if reply.clip_mode not in (CLIP_NORM, CLIP_GLOBAL):
        return ClipDecision(reply.clip_mode)
    by_name = host.placement.by_name()
    pieces = {n: [Piece(*by_name[n].element_range(p), reply.unit_sums[n]) for p in by_name[n].pieces] for n in reply.present}
    variables = [(n, by_name[n].size, by_name[n].dtype) for n in reply.present]
    return decide_clipping(host.engine_settings()[0], reply.clip_mode, variables, pieces)


def test_an_aborted_prepared_push_keeps_its_gradients_while_others_are_applied():
    """A prepared push is aborted (another shard failed) and stays staged; a push staged over gRPC
    (copied in) and one received in place are applied meanwhile; the first is then prepared
    again. Its gradients must be intact: equal to a run that never used sets."""
    results = []
    for in_set in (True, False):
        host = _host()
        _stage(host, ("w0", "a"), _grads(1), in_set)
        host.prepare(1, [("w0", "a")], False, "sum")
        host.abort(1)
        host.stage("w1", "b", list(_grads(2).items()))  # copied in: must not write into a's set
        host.prepare(1, [("w1", "b")], False, "sum")
        host.commit(1, "apply", ClipDecision(0, {}))
        _stage(host, ("w1", "c"), _grads(3), in_set)
        host.prepare(2, [("w1", "c")], False, "sum")
        host.commit(2, "apply", ClipDecision(0, {}))
        host.prepare(3, [("w0", "a")], False, "sum")
        host.commit(3, "apply", ClipDecision(0, {}))
        results.append(_state(host))
    _assert_same(*results)


def test_a_restaged_prepared_push_and_a_sync_round_sum_in_place_equal_copies():
    results = []
    for in_set in (True, False):
        host = _host(policy={"mode": "sync", "num_workers": 2})
        _stage(host, ("w0", "a"), _grads(1), in_set)
        host.prepare(1, [("w0", "a")], False, "sum")
        _stage(host, ("w0", "a"), _grads(1), in_set)  # a retry re-sent the same push while it was prepared
        host.commit(1, "apply", ClipDecision(0, {}))
        _stage(host, ("w0", "s0"), _grads(4), in_set)
        _stage(host, ("w1", "s1"), _grads(5), in_set)
        host.prepare(2, [("w0", "s0"), ("w1", "s1")], True, "mean")  # a round's mean: copied in
        host.commit(2, "apply", ClipDecision(0, {}))
        _stage(host, ("w0", "e"), _grads(6), in_set)
        host.prepare(3, [("w0", "e")], False, "sum")
        host.commit(3, "apply", ClipDecision(0, {}))
        assert host.staged_keys() == []  # the commit of event 1 took the re-sent copy too
        results.append(_state(host))
    _assert_same(*results)


def test_snapshot_copies_staged_gradients_out_of_their_sets():
    host = _host(policy={"mode": "sync", "num_workers": 2})
    taken = _stage(host, ("w0", "s0"), _grads(4), in_set=True)
    snap = host.snapshot(keep=[("w0", "s0")])
    host.drop([("w0", "s0")])
    for g in taken[0][1].values():
        g[...] = 7.0  # the set is reused by another push
    for name, g in snap.staged["w0\x00s0"].items():
        np.testing.assert_array_equal(g, _grads(4)[name])


def test_a_closed_host_lends_no_set():
    host = _host()
    host.close()
    assert host.receive_lookup([]) is None
