"""Integration: every RPC through RemoteAdamax against an in-process server on port 0.

Congruence: the remote optimizer and the in-process engine answer the same calls with the
same (bitwise) results for one worker and the same gradient sequence.
"""

from __future__ import annotations

import itertools
import warnings

import grpc
import numpy as np
import pytest

from _ps_helpers import assert_bitwise_equal, assert_same_state, running_server, snapshot

from adamax_client import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RemoteAdamax,
    RowSparseGradient as ClientSparse,
    StaleGradientError,
)
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server import Adamax, RowSparseGradient

_keys = itertools.count()


@pytest.fixture(scope="module")
def server():
    with running_server() as (target, coordinator):
        yield target, coordinator


def fresh_key(prefix="opt"):
    return f"{prefix}{next(_keys)}"


def model(seed=0, rows=6):
    rng = np.random.default_rng(seed)
    return {
        "dense/kernel": rng.standard_normal((rows, 4)).astype(np.float32),
        "dense/bias": np.zeros(4, np.float32),
        "embedding": rng.standard_normal((10, 3)).astype(np.float32),
    }


def gradient_sequence(seed=1, steps=6):
    """Lists, mappings with None, float16/float64, sparse rows: what workers send."""
    rng = np.random.default_rng(seed)
    for i in range(steps):
        kernel = rng.standard_normal((6, 4)).astype(np.float32)
        bias = rng.standard_normal(4).astype(np.float32)
        rows = np.array([1, 7, 1, 3])
        values = rng.standard_normal((4, 3)).astype(np.float32)
        if i % 3 == 0:
            yield "list", [kernel, bias, rng.standard_normal((10, 3)).astype(np.float32)]
        elif i % 3 == 1:
            yield "mapping", {"dense/kernel": kernel.astype(np.float16), "dense/bias": None,
                              "embedding": (rows, values)}
        else:
            yield "pairs", [(kernel.astype(np.float64), "dense/kernel"), (bias, "dense/bias")]


def apply_both(remote, local, kind, grads):
    if kind == "list":
        remote.apply(grads)
        local.apply(grads)
    elif kind == "mapping":
        rows, values = grads["embedding"]
        remote.apply({**grads, "embedding": ClientSparse(rows, values)})
        local.apply({**grads, "embedding": RowSparseGradient(rows, values)})
    else:
        remote.apply_gradients(grads)
        local.apply_gradients(grads)


CONFIGS = {
    "plain": {"learning_rate": 0.01},
    "weight_decay": {"learning_rate": 0.02, "weight_decay": 0.1},
    "clipnorm": {"clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.1},
    "global_clipnorm": {"global_clipnorm": 1.0},
    "ema": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 2},
    "accumulation": {"gradient_accumulation_steps": 2, "learning_rate": 0.05},
    "loss_scale": {"loss_scale_factor": 4.0},
    "schedule": {"learning_rate": {"module": "keras.optimizers.schedules", "class_name": "ExponentialDecay",
                                   "config": {"initial_learning_rate": 0.1, "decay_steps": 2, "decay_rate": 0.5,
                                              "staircase": False, "name": "ExponentialDecay"},
                                   "registered_name": None}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_remote_equals_in_process_engine_bitwise(server, name):
    target, _ = server
    key = fresh_key(name)
    with RemoteAdamax(target, worker_id="w0", name=key, **CONFIGS[name]) as remote:
        local = Adamax.from_config(remote.get_config(), device="cpu")
        assert remote.get_config() == local.get_config()
        variables = model()
        if name == "weight_decay":
            remote.exclude_from_weight_decay(var_names=["bias"])
            local.exclude_from_weight_decay(var_names=["bias"])
        remote.build(variables)
        local.build(variables)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Gradients do not exist for variables ..."
            for kind, grads in gradient_sequence():
                apply_both(remote, local, kind, grads)
        assert remote.iterations == local.iterations
        assert float(remote.learning_rate) == float(local.learning_rate)
        pulled = remote.pull()
        assert list(pulled) == list(local.trainable_variables)
        for var_name, value in local.trainable_variables.items():
            assert_bitwise_equal(pulled[var_name], value)
        remote_store, local_store = {}, {}
        remote.save_own_variables(remote_store)
        local.save_own_variables(local_store)
        assert list(remote_store) == list(local_store)
        for k in local_store:
            assert_bitwise_equal(remote_store[k], local_store[k])
        remote.finalize_variable_values()
        local.finalize_variable_values()
        for var_name, value in local.trainable_variables.items():
            assert_bitwise_equal(remote.pull()[var_name], value)


def test_learning_rate_set_assign_set_weights_load_and_stateless_apply_match(server):
    target, _ = server
    key = fresh_key()
    remote = RemoteAdamax(target, name=key, learning_rate=0.01)
    local = Adamax.from_config(remote.get_config(), device="cpu")
    variables = model()
    remote.build(variables)
    local.build(variables)
    steps = list(gradient_sequence(steps=3))
    for kind, grads in steps[:1]:
        apply_both(remote, local, kind, grads)

    remote.learning_rate = 0.003
    local.learning_rate = 0.003
    assert remote.learning_rate == local.learning_rate
    remote.assign("dense/bias", np.full(4, 0.5, np.float32))
    local.assign("dense/bias", np.full(4, 0.5, np.float32))
    remote.assign_add("dense/kernel", np.ones((6, 4), np.float64))
    local.assign_add("dense/kernel", np.ones((6, 4), np.float64))
    remote.assign_sub("embedding", np.full((10, 3), 0.25, np.float32))
    local.assign_sub("embedding", np.full((10, 3), 0.25, np.float32))

    store = {}
    local.save_own_variables(store)
    weights = [np.asarray(v) * (2 if v.dtype.kind == "f" else 1) for v in store.values()]
    remote.set_weights(weights)
    local.set_weights(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kind, grads = steps[1]
        apply_both(remote, local, kind, grads)
    for var_name, value in local.trainable_variables.items():
        assert_bitwise_equal(remote.pull()[var_name], value)

    local_store = {}
    local.save_own_variables(local_store)
    remote.load_own_variables(local_store)
    remote_store = {}
    remote.save_own_variables(remote_store)
    for k in local_store:
        assert_bitwise_equal(remote_store[k], local_store[k])

    opt_vars = list(local_store.values())
    grad_list = [np.ones((6, 4), np.float32), None, np.full((10, 3), 0.5, np.float32)]
    trainable = list(local.trainable_variables.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = local.stateless_apply(opt_vars, grad_list, trainable)
        before = remote.save_own_variables({}) or remote.pull()
        got = remote.stateless_apply(opt_vars, grad_list, trainable)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        assert_bitwise_equal(a, b)
    for var_name, value in before.items():  # stateless: the server's state is unchanged
        assert_bitwise_equal(remote.pull()[var_name], value)
    remote.close()


def test_create_is_idempotent_and_a_second_worker_attaches(server):
    target, coordinator = server
    key = fresh_key()
    first = RemoteAdamax(target, worker_id="a", name=key, learning_rate=0.01)
    first.build(model())
    first.apply([np.ones((6, 4), np.float32), np.ones(4, np.float32), np.ones((10, 3), np.float32)])
    second = RemoteAdamax.from_config(first.get_config(), target=target, worker_id="b")
    assert second.built
    second.build(model(seed=5))  # same specs: attaches, keeps the server's values
    pulled = second.pull()
    assert second.version == 1
    np.testing.assert_array_equal(pulled["dense/bias"], first.pull()["dense/bias"])
    assert second.attach() == first.variable_specs
    with pytest.raises(AlreadyExistsError, match="different config"):
        RemoteAdamax(target, name=key, learning_rate=0.5)
    with pytest.raises(FailedPreconditionError, match="already built with different variables"):
        second.build({"x": np.zeros(2, np.float32)})
    status = first.status()
    assert set(status["workers"]) == {"a", "b"} and status["version"] == 1
    first.close()
    second.close()


def test_pull_of_named_variables_skips_the_transfer_when_current(server):
    target, coordinator = server
    key = fresh_key()
    with RemoteAdamax(target, name=key) as remote:
        remote.build(model())
        bias = remote.pull(["dense/bias"])
        assert list(bias) == ["dense/bias"]
        again = remote.pull(["dense/bias"])
        assert again["dense/bias"] is bias["dense/bias"]  # not modified: nothing transferred
        assert not again["dense/bias"].flags.writeable
        with pytest.raises(NotFoundError, match="no variable"):
            remote.pull(["nope"])


def test_remote_errors_are_keras_shaped_and_change_nothing(server):
    target, coordinator = server
    key = fresh_key()
    remote = RemoteAdamax(target, name=key, learning_rate=0.01, max_staleness=1)
    remote.build(model())
    remote.apply([np.ones((6, 4), np.float32), np.ones(4, np.float32), np.ones((10, 3), np.float32)])
    host = coordinator.get(key)
    before = snapshot(host)
    nan = np.ones((6, 4), np.float32)
    nan[2, 1] = np.nan
    cases = [
        (lambda: remote.apply({"nope": np.ones(3, np.float32)}), NotFoundError, "has no variable 'nope'"),
        (lambda: remote.apply({"dense/bias": np.ones(5, np.float32)}), InvalidArgumentError, r"shape \(5,\)"),
        (lambda: remote.apply({"dense/bias": np.ones(4, np.int32)}), InvalidArgumentError, "gradients must be"),
        (lambda: remote.apply({"dense/kernel": nan}), InvalidArgumentError, "non-finite values in 'dense/kernel'"),
        (lambda: remote.apply({"embedding": ClientSparse(np.array([10]), np.ones((1, 3), np.float32))}),
         InvalidArgumentError, r"row indices must be in \[0, 10\)"),
        (lambda: remote.apply([None, None, None]), InvalidArgumentError, "No gradients provided"),
        (lambda: remote.apply([np.ones(4, np.float32)]), ValueError, "one-to-on"),
        (lambda: remote.assign("dense/bias", np.ones(3, np.float32)), InvalidArgumentError, "must match"),
        (lambda: remote.assign("nope", np.ones(3, np.float32)), NotFoundError, "Unknown variable"),
        (lambda: remote.set_weights([np.ones(3)]), InvalidArgumentError, "not compatible"),
        (lambda: remote.exclude_from_weight_decay(var_names=["x"]), InvalidArgumentError, "before"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
        assert_same_state(before, snapshot(host))
    with pytest.raises(KeyError):  # NotFoundError is a KeyError, like the engine's
        remote.apply({"nope": np.ones(3, np.float32)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            remote.pull()
            remote.apply([np.ones((6, 4), np.float32), None, None])
        before = snapshot(host)
        with pytest.raises(StaleGradientError, match="max_staleness is 1") as info:
            remote.push([np.ones((6, 4), np.float32), None, None], step=0)
    assert info.value.current_version == 3 and isinstance(info.value, grpc.RpcError) is False
    assert_same_state(before, snapshot(host))
    remote.close()


def test_setting_a_scheduled_learning_rate_is_a_type_error(server):
    target, _ = server
    with RemoteAdamax(target, name=fresh_key(), **CONFIGS["schedule"]) as remote:
        with pytest.raises(TypeError, match="not settable"):
            remote.learning_rate = 0.1


def test_unknown_keras_argument_is_rejected_locally(server):
    target, _ = server
    with pytest.raises(ValueError, match="not recognized"):
        RemoteAdamax(target, name=fresh_key(), bogus=1)


def test_list_get_delete_and_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from adamax_client.transport import Transport

    target, _ = server
    key = fresh_key()
    RemoteAdamax(target, name=key).close()
    transport = Transport(target, timeout=10)
    names = [o.optimizer for o in transport.unary("ListOptimizers", pb.ListOptimizersRequest()).optimizers]
    assert key in names
    assert transport.unary("GetOptimizer", pb.OptimizerRef(optimizer=key)).optimizer == key
    assert transport.unary("DeleteOptimizer", pb.OptimizerRef(optimizer=key)).deleted
    with pytest.raises(NotFoundError):
        transport.unary("GetOptimizer", pb.OptimizerRef(optimizer=key))
    transport.close()

    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="adamax.v1.AdamaxService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        services = {s.name for r in responses for s in r.list_services_response.service}
        assert "adamax.v1.AdamaxService" in services and "grpc.health.v1.Health" in services


def test_bfloat16_and_float16_gradients_on_the_wire(server):
    target, _ = server
    key = fresh_key()
    with RemoteAdamax(target, name=key, gradient_wire_dtype="bfloat16") as remote:
        local = Adamax.from_config(remote.get_config(), device="cpu")
        variables = {"w": np.linspace(-1, 1, 12, dtype=np.float32)}
        remote.build(variables)
        local.build(variables)
        grad = np.linspace(-3, 3, 12, dtype=np.float32) + np.float32(1e-3)
        remote.apply([grad])
        # bfloat16 keeps the top 16 bits (rounded); the engine sees the widened float32
        widened = (grad.view(np.uint32) + 0x7FFF + ((grad.view(np.uint32) >> 16) & 1)) >> 16 << 16
        local.apply([widened.astype(np.uint32).view(np.float32)])
        assert_bitwise_equal(remote.pull()["w"], local.trainable_variables["w"])
