"""Unit tests of the coordinator: rounds, staleness, exactly-once, validation. No gRPC."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from _ps_helpers import assert_bitwise_equal, assert_same_state, snapshot

from adamax_server import Adamax, RowSparseGradient
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import TensorMeta
from adamax_server.coordination.policy import Policy
from adamax_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RoundAborted,
    StaleGradient,
    WaitTimeout,
)

CONFIG = {"name": "m", "learning_rate": 0.01}
INITIAL = {"w": np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "b": np.zeros(3, np.float32)}


def make_host(policy=Policy(), config=CONFIG):
    coordinator = Coordinator(device="cpu")
    _, host = coordinator.create("m", config, policy)
    host.build(list(INITIAL.items()))
    return host


def grads(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [("w", (rng.standard_normal((4, 3)) * scale).astype(np.float32)),
            ("b", (rng.standard_normal(3) * scale).astype(np.float32))]


def push(host, worker, request, step, items):
    return host.push(worker, request, step, lambda _staging: items, timeout=5)


def local_engine():
    engine = Adamax.from_config(CONFIG, device="cpu")
    engine.build(INITIAL)
    return engine


# ---------------------------------------------------------------- registry and policy

def test_create_is_idempotent_for_the_same_config_and_rejects_a_different_one():
    coordinator = Coordinator(device="cpu")
    created, host = coordinator.create("m", CONFIG, Policy())
    again, same = coordinator.create("m", {**CONFIG, "learning_rate": 0.01}, Policy())
    assert created and not again and same is host
    with pytest.raises(AlreadyExists, match="different config"):
        coordinator.create("m", {**CONFIG, "learning_rate": 0.1}, Policy())
    with pytest.raises(AlreadyExists, match="coordination policy"):
        coordinator.create("m", CONFIG, Policy(mode="sync"))
    with pytest.raises(NotFound, match="no optimizer named 'x'"):
        coordinator.get("x")


def test_bad_keras_config_is_a_value_error():
    with pytest.raises(ValueError, match="not recognized"):
        Coordinator(device="cpu").create("m", {**CONFIG, "bogus": 1}, Policy())


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "semi"}, "`mode` must be one of"),
    ({"num_workers": 0}, "`num_workers` must be an integer >= 1"),
    ({"num_workers": 2, "min_workers": 3}, "`min_workers` must be between 1 and `num_workers`"),
    ({"round_timeout": -1.0}, "`round_timeout` must be a positive"),
    ({"max_staleness": -1}, "`max_staleness` must be >= 0"),
    ({"non_finite": "ignore"}, "`non_finite` must be one of"),
])
def test_policy_validation(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        Policy(**kwargs)


def test_build_is_idempotent_and_refuses_different_specs():
    host = make_host()
    assert host.build(list(INITIAL.items())) is False
    with pytest.raises(FailedPrecondition, match="already built with different variables"):
        host.build([("w", np.zeros((4, 4), np.float32))])


def test_calls_before_build_fail_with_a_precondition():
    _, host = Coordinator(device="cpu").create("m", CONFIG, Policy())
    with pytest.raises(FailedPrecondition, match="not built yet"):
        push(host, "w0", "r", 0, [])
    with pytest.raises(FailedPrecondition, match="not built yet"):
        host.pull([], lambda *a: a)


# ---------------------------------------------------------------- async

def test_async_push_sequence_equals_the_engine_bitwise():
    host, engine = make_host(), local_engine()
    for i in range(6):
        items = grads(i)
        result = push(host, "w0", f"r{i}", i, items)
        engine.apply(dict(items))
        assert result.outcome == "applied" and result.version == i + 1
    pulled = host.pull([], lambda v, it, items: dict(items))
    for name, value in engine.trainable_variables.items():
        assert_bitwise_equal(pulled.payload[name], value)


def test_async_staleness_rejects_old_gradients_with_the_current_version():
    host = make_host(Policy(max_staleness=1))
    for i in range(3):
        push(host, "w0", f"r{i}", i, grads(i))
    before = snapshot(host)
    with pytest.raises(StaleGradient, match="3 versions old; max_staleness is 1") as info:
        push(host, "w1", "x", 0, grads(9))
    assert info.value.current_version == 3
    assert_same_state(before, snapshot(host))
    assert push(host, "w1", "y", 2, grads(9)).outcome == "applied"  # 1 version old is fine


def test_a_step_from_the_future_is_a_precondition_failure():
    host = make_host()
    with pytest.raises(FailedPrecondition, match="ahead of the current version 0"):
        push(host, "w0", "r", 5, grads(0))


# ---------------------------------------------------------------- exactly once

def test_retried_push_is_answered_again_and_applied_once():
    host = make_host()
    first = push(host, "w0", "r1", 0, grads(1))
    before = snapshot(host)
    retry = push(host, "w0", "r1", 0, grads(1))
    assert retry.duplicate and retry.outcome == first.outcome and retry.version == first.version
    assert_same_state(before, snapshot(host))
    # the same request id from another worker is a different push
    assert not push(host, "w1", "r1", 0, grads(1)).duplicate


def test_retry_arriving_while_the_first_copy_is_in_flight_is_applied_once():
    """A retry sent while the first copy still streams is not held up by it: it is staged and
    committed, and the first copy, once it arrives, is answered from the exactly-once table."""
    host = make_host()
    release = threading.Event()
    started = threading.Event()

    def slow_receive(_staging=None):
        started.set()
        release.wait(5)
        return grads(1)

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", host.push("w0", "r1", 0, slow_receive)))
    first.start()
    started.wait(5)
    second = threading.Thread(target=lambda: results.setdefault("second", push(host, "w0", "r1", 0, grads(1))))
    second.start()
    second.join(5)
    assert results["second"].version == 1 and not results["second"].duplicate  # did not wait
    release.set()
    first.join(5)
    assert results["first"].version == 1 and results["first"].duplicate
    assert host.version == 1
    assert host._shard.staged_keys() == []  # the late copy's slices were dropped


def test_a_failed_first_copy_lets_the_retry_apply():
    host = make_host()

    def broken(_staging=None):
        raise ConnectionError("stream broke")

    with pytest.raises(ConnectionError):
        host.push("w0", "r1", 0, broken)
    assert push(host, "w0", "r1", 0, grads(1)).duplicate is False
    assert host.version == 1


def test_dedup_table_is_bounded_per_worker():
    coordinator = Coordinator(device="cpu", dedup_capacity=3)
    _, host = coordinator.create("m", CONFIG, Policy())
    host.build(list(INITIAL.items()))
    for i in range(5):
        push(host, "w0", f"r{i}", i, grads(i))
    assert len(host._leader._dedup._by_worker["w0"]) == 3
    assert push(host, "w0", "r4", 0, grads(4)).duplicate


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("meta, error, match", [
    (TensorMeta("nope", "float32", (3,), False, False), NotFound, "has no variable 'nope'"),
    (TensorMeta("w", "float32", (3, 4), False, False), InvalidArgument, r"shape \(3, 4\), but the variable has shape \(4, 3\)"),
    (TensorMeta("w", "int32", (4, 3), False, False), InvalidArgument, "must be one of"),
    (TensorMeta("b", "float32", (2, 3), True, False), InvalidArgument, "Row-sparse gradient"),
])
def test_gradient_headers_are_checked_before_payload(meta, error, match):
    host = make_host()
    with pytest.raises(error, match=match):
        host.check_gradient(meta)


def test_sparse_rows_out_of_range_change_nothing():
    host = make_host()
    before = snapshot(host)
    bad = RowSparseGradient(np.array([0, 4]), np.ones((2, 3), np.float32))
    with pytest.raises(InvalidArgument, match=r"row indices must be in \[0, 4\)"):
        push(host, "w0", "r", 0, [("w", bad)])
    assert_same_state(before, snapshot(host))


def test_non_finite_gradients_are_rejected_by_default():
    host = make_host()
    before = snapshot(host)
    items = grads(0)
    items[0][1][0, 0] = np.nan
    with pytest.raises(InvalidArgument, match=r"'w' \(1 NaN/Inf\).*non_finite='skip'"):
        push(host, "w0", "r", 0, items)
    assert_same_state(before, snapshot(host))


def test_non_finite_gradients_skip_the_step_under_skip_policy():
    host = make_host(Policy(non_finite="skip"))
    before = snapshot(host)
    items = grads(0)
    items[1][1][1] = np.inf
    result = push(host, "w0", "r", 0, items)
    assert result.outcome == "skipped_non_finite" and "step skipped" in result.detail
    assert_same_state(before, snapshot(host))


# ---------------------------------------------------------------- sync rounds

def test_sync_round_closes_with_the_mean_of_k_equals_n_workers():
    host = make_host(Policy(mode="sync", num_workers=3))
    engine = local_engine()
    contributions = [grads(i) for i in range(3)]
    outcomes = [push(host, f"w{i}", "r", 0, contributions[i]).outcome for i in range(3)]
    assert outcomes == ["accepted", "accepted", "round_closed"]
    mean = {n: (contributions[0][k][1] + contributions[1][k][1] + contributions[2][k][1]) / np.float32(3)
            for k, n in enumerate(["w", "b"])}
    engine.apply(mean)
    pulled = host.pull([], lambda v, it, items: dict(items))
    assert pulled.version == 1
    for name, value in engine.trainable_variables.items():
        assert_bitwise_equal(pulled.payload[name], value)


def test_sync_sum_and_k_less_than_n_and_late_pushes_are_dropped():
    host = make_host(Policy(mode="sync", num_workers=3, min_workers=2, aggregation="sum"))
    engine = local_engine()
    a, b = grads(1), grads(2)
    push(host, "w1", "r", 0, a)
    assert push(host, "w0", "r", 0, b).outcome == "round_closed"
    engine.apply({n: b[k][1] + a[k][1] for k, n in enumerate(["w", "b"])})  # worker-id order: w0, w1
    before = snapshot(host)
    late = push(host, "w2", "r", 0, grads(3))
    assert late.outcome == "dropped_late" and "already closed" in late.detail and late.version == 1
    assert_same_state(before, snapshot(host))
    pulled = host.pull([], lambda v, it, items: dict(items))
    for name, value in engine.trainable_variables.items():
        assert_bitwise_equal(pulled.payload[name], value)


def test_one_push_per_worker_per_round():
    host = make_host(Policy(mode="sync", num_workers=2))
    push(host, "w0", "r1", 0, grads(0))
    with pytest.raises(FailedPrecondition, match="already pushed a gradient for version 0"):
        push(host, "w0", "r2", 0, grads(1))


def test_sync_sparse_contributions_stay_sparse_and_match_dense():
    host = make_host(Policy(mode="sync", num_workers=2))
    rows = [RowSparseGradient(np.array([1, 3]), np.ones((2, 3), np.float32)),
            RowSparseGradient(np.array([3]), np.full((1, 3), 2.0, np.float32))]
    push(host, "w0", "r", 0, [("w", rows[0])])
    push(host, "w1", "r", 0, [("w", rows[1]), ("b", np.ones(3, np.float32))])
    engine = local_engine()
    dense = np.zeros((4, 3), np.float32)
    dense[1] += 1
    dense[3] += 1 + 2
    engine.apply({"w": dense / np.float32(2), "b": np.ones(3, np.float32) / np.float32(2)})
    pulled = host.pull([], lambda v, it, items: dict(items))
    for name, value in engine.trainable_variables.items():
        np.testing.assert_array_equal(pulled.payload[name], value)


def test_round_timeout_close_applies_what_arrived():
    host = make_host(Policy(mode="sync", num_workers=3, round_timeout=0.2))
    push(host, "w0", "r", 0, grads(0))
    assert host.wait_for_version(1, timeout=5) == 1
    assert host.status().iterations == 1


def test_round_timeout_abort_discards_the_round_and_wakes_waiters():
    host = make_host(Policy(mode="sync", num_workers=2, round_timeout=0.2, round_timeout_policy="abort"))
    before = snapshot(host)
    push(host, "w0", "r", 0, grads(0))
    with pytest.raises(RoundAborted, match="aborted: timed out after 0.2s with 1 of 2 workers"):
        host.wait_for_version(1, timeout=5)
    assert_same_state(before, snapshot(host))
    # the aborted push may be retried with the same request id and counts again
    assert not push(host, "w0", "r", 0, grads(0)).duplicate


def test_pull_waits_for_a_version_with_a_deadline():
    host = make_host(Policy(mode="sync", num_workers=2))
    with pytest.raises(WaitTimeout, match="did not reach version 1"):
        host.pull([], lambda *a: a, min_version=1, timeout=0.1)
    threading.Timer(0.1, lambda: [push(host, f"w{i}", "r", 0, grads(i)) for i in range(2)]).start()
    result = host.pull([], lambda v, it, items: v, min_version=1, timeout=5)
    assert result.version == 1


def test_pull_is_encoded_once_per_version_and_skipped_when_known():
    host = make_host()
    calls = []

    def encode(version, iterations, items):
        calls.append(version)
        return object()

    first = host.pull([], encode)
    assert host.pull([], encode).payload is first.payload and calls == [0]
    assert host.pull([], encode, known_version=0).not_modified
    push(host, "w0", "r", 0, grads(0))
    host.pull([], encode)
    assert calls == [0, 1]
    with pytest.raises(NotFound, match="no variable"):
        host.pull(["nope"], encode)


def test_state_changing_calls_bump_the_version():
    host = make_host()
    host.assign("assign_add", "b", np.ones(3, np.float32))
    store = host.save_own_variables()
    host.load_own_variables(store)
    assert host.version == 2


# ---------------------------------------------------------------- receive buffers and folded statistics

def _pooled_receive(items):
    """A receive that fills what the host lends (as the transports' allocators do)."""
    used = []

    def receive(lookup):
        out = []
        for name, value in items:
            buf = lookup(name, value.dtype) if lookup is not None else None
            if buf is None:
                out.append((name, value))
                continue
            flat = buf.reshape(-1)
            flat[...] = value.reshape(-1)
            used.append(flat)
            out.append((name, flat.reshape(value.shape)))
        return out

    return receive, used


def test_sync_contributions_reuse_pooled_receive_buffers_across_rounds():
    host = make_host(Policy(mode="sync", num_workers=2))
    engine = local_engine()
    seen = []
    for step in range(3):
        contributions = [grads(10 * step + i) for i in range(2)]
        for i in range(2):
            receive, used = _pooled_receive(contributions[i])
            assert host.push(f"w{i}", f"r{step}", step, receive, timeout=5).outcome in ("accepted", "round_closed")
            seen.append({id(u.base if u.base is not None else u) for u in used})
        engine.apply({n: (contributions[0][k][1] + contributions[1][k][1]) / np.float32(2) for k, n in enumerate(["w", "b"])})
    # Rounds 2 and 3 receive into buffers earlier pushes gave back: no fresh memory per push
    # (the two contributions, the engine's buffers the round is summed into, and one spare).
    assert len(set().union(*seen)) <= 4, seen
    pulled = host.pull([], lambda v, it, items: dict(items))
    for name, value in engine.trainable_variables.items():
        assert_bitwise_equal(pulled.payload[name], value)


def test_a_rejected_sync_push_returns_its_buffers_and_changes_nothing():
    host = make_host(Policy(mode="sync", num_workers=2))
    before = snapshot(host)
    items = grads(0)
    items[0][1][1, 1] = np.inf
    receive, used = _pooled_receive(items)
    with pytest.raises(InvalidArgument, match="non-finite"):
        host.push("w0", "r", 0, receive, timeout=5)
    assert_same_state(before, snapshot(host))
    assert host.status().round_arrivals == []
    receive2, used2 = _pooled_receive(grads(1))
    host.push("w0", "r2", 0, receive2, timeout=5)
    assert {id(u.base) for u in used2} == {id(u.base) for u in used}  # given back, taken again


def test_statistics_computed_while_receiving_are_used(monkeypatch):
    from adamax_server.coordination import stats as stats_module
    from adamax_server.coordination.stats import GradientStats, ReceivedGradients

    host = make_host()
    items = grads(0)
    claimed = {"w": GradientStats(1.0, 1.0, 0), "b": GradientStats(1.0, 1.0, 3)}  # b "had" NaNs
    calls = []
    monkeypatch.setattr(stats_module, "gradient_stats", lambda v: calls.append(v) or GradientStats(0.0, 0.0, 0))
    with pytest.raises(InvalidArgument, match=r"'b' \(3 NaN/Inf\)"):
        host.push("w0", "r", 0, lambda _lookup: ReceivedGradients(items, claimed), timeout=5)
    assert calls == []  # no second pass over the gradients


def test_gradient_statistics_run_outside_the_optimizer_lock():
    host = make_host()
    inside = threading.Event()
    release = threading.Event()
    from adamax_server.sharding import shard as host_module

    original = host_module._gradient_stats

    def slow_stats(grads, known=None):
        inside.set()
        release.wait(5)
        return original(grads, known)

    host_module._gradient_stats = slow_stats
    try:
        t = threading.Thread(target=lambda: push(host, "w0", "r", 0, grads(0)))
        t.start()
        assert inside.wait(5)
        assert host.version == 0  # the lock is free while the statistics are computed
        host.status()
        release.set()
        t.join(5)
    finally:
        host_module._gradient_stats = original
    assert host.version == 1


def test_an_overlapping_async_push_is_applied_where_it_landed_without_waiting():
    """A push that arrives while a slow one still streams is not held up: it is applied first,
    from the gradient set it was received into (no copy), and then the slow one, from its own."""
    host = make_host()
    engine = local_engine()
    first_in = threading.Event()
    release = threading.Event()
    g1, g2 = grads(1), grads(2)

    receive1, used1 = _pooled_receive(g1)

    def slow(lookup):
        first_in.set()
        release.wait(5)
        return receive1(lookup)

    receive2, used2 = _pooled_receive(g2)
    t = threading.Thread(target=lambda: host.push("w0", "r1", 0, slow, timeout=5))
    t.start()
    assert first_in.wait(5)
    results = {}
    t2 = threading.Thread(target=lambda: results.setdefault("r2", host.push("w1", "r2", 0, receive2, timeout=5)))
    t2.start()
    t2.join(5)
    assert results["r2"].outcome == "applied" and results["r2"].version == 1
    staged = host._shard.read_engine(lambda e: {e.gradient_buffer(n).ctypes.data for n in ("w", "b")})
    assert staged == {u.ctypes.data for u in used2}  # applied where it landed
    release.set()
    t.join(5)
    assert host.version == 2
    staged = host._shard.read_engine(lambda e: {e.gradient_buffer(n).ctypes.data for n in ("w", "b")})
    assert staged == {u.ctypes.data for u in used1}
    engine.apply(dict(g2))
    engine.apply(dict(g1))
    pulled = host.pull([], lambda v, it, items: dict(items))
    for name, value in engine.trainable_variables.items():
        assert_bitwise_equal(pulled.payload[name], value)


def test_a_push_naming_an_unknown_variable_is_refused_in_server_terms():
    host = make_host()
    with pytest.raises(NotFound, match=r"optimizer 'm' has no variable 'nope'\. Known variables: \['w', 'b'\]"):
        host.push("w0", "r", 0, lambda lookup: [("nope", np.zeros(2, np.float32))])
    assert host.version == 0 and host.in_flight() == [] and host._shard.staged_keys() == []
