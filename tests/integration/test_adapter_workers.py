"""The adapters from several worker processes (multiprocessing spawn) against one server.

Sync rounds over 2 torch workers equal a Keras Adamax run on the mean of their gradients, bit
for bit; K-of-N and async jobs run through; Keras ``model.fit`` on two shards equals a local fit
whose batches hold both shards. Workers on this host use the bulk channel's shared memory.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import _adapter_workers as workers
from _ps_helpers import running_server

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def pool():
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # spawn: the parent runs gRPC threads
        yield pool


def test_two_torch_workers_in_sync_equal_adamax_on_the_mean_gradient(pool):
    steps = 5
    kwargs = {"mode": "sync", "num_workers": 2, "learning_rate": 0.02, "clipnorm": 0.3, "threads": None}
    with running_server() as (target, _):
        logs = pool.starmap(workers.torch_worker, [(target, "sync2", r, steps, kwargs) for r in range(2)])
    assert all(log["paths"] == {"shm"} for log in logs), [log["paths"] for log in logs]
    assert logs[0]["iterations"] == steps
    model = workers.torch_net()
    variables = [keras.Variable(p.detach().numpy().copy()) for p in model.parameters()]
    twin = keras.optimizers.Adamax(learning_rate=0.02, clipnorm=0.3)
    twin.build(variables)
    for step in range(steps):
        mean = []
        for i in range(len(variables)):
            total = np.zeros_like(logs[0]["grads"][step][i])
            for log in logs:  # the server sums in worker-id order, then divides
                total += log["grads"][step][i]
            mean.append(total / np.float32(2))
        twin.apply(mean)
        for log in logs:
            for value, v in zip(log["weights"][step], variables):
                np.testing.assert_array_equal(value, v.numpy(), err_msg=f"step {step}")


def test_k_of_n_and_async_jobs_run_through(pool):
    steps = 4
    with running_server() as (target, coordinator):
        sync_kwargs = {"mode": "sync", "num_workers": 2, "min_workers": 1, "threads": None}
        logs = pool.starmap(workers.torch_worker, [(target, "k1", r, steps, sync_kwargs) for r in range(2)])
        outcomes = [o for log in logs for o in log["outcomes"]]
        assert set(outcomes) <= {"round_closed", "dropped_late"} and "round_closed" in outcomes
        assert coordinator.get("k1").iterations == outcomes.count("round_closed")

        async_kwargs = {"mode": "async", "threads": None}
        logs = pool.starmap(workers.torch_worker, [(target, "async", r, steps, async_kwargs) for r in range(2)])
        assert all(o == "applied" for log in logs for o in log["outcomes"])
        assert coordinator.get("async").iterations == 2 * steps
        assert all(log["paths"] == {"shm"} for log in logs)


@pytest.mark.slow
def test_two_keras_workers_model_fit_equal_a_local_fit_on_both_shards(pool):
    pytest.importorskip("jax")
    kwargs = {"mode": "sync", "num_workers": 2, "learning_rate": 0.01}
    with running_server() as (target, _):
        results = pool.starmap(workers.keras_worker, [(target, "kfit", r, "jax", kwargs) for r in range(2)])
    reference = pool.apply(workers.keras_local_fit, ("jax", 0.01))
    for weights in results:
        for ours, expected in zip(weights, reference):
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)

    # async: every worker's batch is one update of its own
    with running_server() as (target, coordinator):
        pool.starmap(workers.keras_worker, [(target, "kasync", r, "jax", {"mode": "async"}) for r in range(2)])
        assert coordinator.get("kasync").iterations == 2 * 12  # 2 workers x 6 batches x 2 epochs
