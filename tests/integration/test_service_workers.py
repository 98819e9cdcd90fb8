"""Several worker processes (multiprocessing spawn) against one in-process server."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from _ps_helpers import assert_bitwise_equal, host_weights, running_server
import _ps_workers as workers

from adamax_server import Adamax

CONFIG = {"learning_rate": 0.01}


@pytest.fixture(scope="module")
def pool():
    # spawn, never fork: the parent runs gRPC threads.
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        yield pool


def test_sync_k_equals_n_matches_the_mean_of_every_worker_each_round(pool):
    steps, n = 5, 3
    with running_server() as (target, coordinator):
        logs = pool.starmap(
            workers.sync_worker, [(target, "sync", w, steps, {"num_workers": n, **CONFIG}) for w in range(n)]
        )
        host = coordinator.get("sync")
        assert host.version == steps
        # every worker took part in every round, none was dropped
        for log in logs:
            assert [s for s, _ in log] == list(range(steps))
            assert {o for _, o in log} <= {"accepted", "round_closed"}
        assert sum(o == "round_closed" for log in logs for _, o in log) == steps

        local = Adamax.from_config(host.get_config(), device="cpu")
        local.build(workers.initial_variables())
        for version in range(steps):
            weights = local.trainable_variables
            per_worker = [workers.gradient(weights, w, version) for w in range(n)]
            mean = {}
            for name in weights:
                total = np.zeros_like(weights[name])
                for g in per_worker:  # the server sums in worker-id order
                    total += g[name]
                mean[name] = total / np.float32(n)
            local.apply(mean)
        pulled = host_weights(host)
        for name, value in local.trainable_variables.items():
            assert_bitwise_equal(pulled[name], value)


def test_sync_k_less_than_n_closes_rounds_and_drops_late_pushes(pool):
    steps, n, k = 6, 3, 2
    kwargs = {"num_workers": n, "min_workers": k, "round_timeout": 2.0, **CONFIG}
    with running_server() as (target, coordinator):
        logs = pool.starmap(workers.sync_worker, [(target, "k_lt_n", w, steps, kwargs) for w in range(n)])
        host = coordinator.get("k_lt_n")
        assert host.version == steps and host.status().iterations == steps
        outcomes = [o for log in logs for _, o in log]
        assert set(outcomes) <= {"accepted", "round_closed", "dropped_late"}
        # each round is closed by exactly one push
        assert outcomes.count("round_closed") <= steps
        assert all(np.isfinite(v).all() for v in host_weights(host).values())


def test_async_workers_with_max_staleness(pool):
    pushes, n, limit = 6, 3, 1
    kwargs = {"max_staleness": limit, **CONFIG}
    with running_server() as (target, coordinator):
        logs = pool.starmap(workers.async_worker, [(target, "async", w, pushes, kwargs) for w in range(n)])
        host = coordinator.get("async")
        applied = [entry for log in logs for entry in log if entry[2] == "applied"]
        assert len(applied) == n * pushes == host.version == host.status().iterations
        versions = sorted(v for _, v, _ in applied)
        assert versions == list(range(1, n * pushes + 1))  # each push was its own apply
        for step, version, outcome in applied:
            assert version - 1 - step <= limit  # applied on weights at most `limit` versions old
        for step, current, outcome in (e for log in logs for e in log if e[2] == "stale"):
            assert current - step > limit
