"""Requests that used to be accepted and quietly did the wrong thing (issue 12, items 6-8).

Each is refused with INVALID_ARGUMENT naming the problem, and changes nothing on the server.
"""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest
from _ps_helpers import assert_same_state, running_server, snapshot

from adamax_client import RemoteAdamax
from adamax_client.errors import InvalidArgumentError
from adamax_client.transport import Transport
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

VALUES = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def _keras_skip_message(store_size: int) -> str:
    """What Keras says (a warning) when a store of the wrong size is loaded."""
    kvars = [keras.Variable(v, name=n) for n, v in VALUES.items()]
    kopt = keras.optimizers.Adamax(name="m")
    kopt.build(kvars)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kopt.load_own_variables({str(i): np.zeros(1) for i in range(store_size)})
    assert caught, "Keras no longer warns on a store of the wrong size"
    return str(caught[0].message)


@pytest.mark.parametrize("store_size", [0, 3])
def test_load_own_variables_of_the_wrong_size_is_refused_and_changes_nothing(store_size):
    keras_message = _keras_skip_message(store_size)  # Keras warns and loads nothing; we refuse
    with running_server() as (target, coordinator):
        with RemoteAdamax(target, name="m", worker_id="w0", bulk="off") as opt:
            opt.build(VALUES)
            opt.apply([np.ones((2, 3), np.float32), np.ones(3, np.float32)])
            host = coordinator.get("m")
            before = snapshot(host)
            with pytest.raises(InvalidArgumentError) as info:
                opt.load_own_variables({str(i): np.zeros(1, np.float32) for i in range(store_size)})
            assert_same_state(before, snapshot(host))
        # The server's refusal carries Keras's own explanation (counts of both sides).
        expected = keras_message.split("because", 1)[1].strip()
        assert expected.split(".")[0] in str(info.value), (str(info.value), keras_message)


def test_build_with_duplicate_variable_names_is_refused():
    with running_server() as (target, coordinator):
        transport = Transport(target)
        try:
            transport.unary("CreateOptimizer", pb.CreateOptimizerRequest(optimizer="m", config_json="{}"))
            from adamax_wire import tensors as wire

            header = pb.BuildHeader(optimizer="m", worker_id="w0")
            items = [("w", np.zeros(3, np.float32)), ("w", np.ones(3, np.float32))]

            def frames():
                yield wire.header_frame(header)
                yield from wire.named_tensor_frames(items)

            with pytest.raises(InvalidArgumentError, match=r"more than one variable named \['w'\]"):
                transport.stream_unary("Build", frames)
        finally:
            transport.close()
        host = coordinator.get("m")
        assert not host.status().built and host.version == 0


@pytest.mark.parametrize(
    "config_json, name",
    [
        ('{"learning_rate": NaN}', "learning_rate"),
        ('{"learning_rate": Infinity}', "learning_rate"),
        ('{"learning_rate": 1e400}', "learning_rate"),
        ('{"learning_rate": 1e39}', "learning_rate"),  # finite as float64, not as float32
        ('{"beta_1": NaN}', "beta_1"),
        ('{"beta_2": -Infinity}', "beta_2"),
        ('{"epsilon": 1e400}', "epsilon"),
        ('{"clipnorm": NaN}', "clipnorm"),
        ('{"weight_decay": Infinity}', "weight_decay"),
        ('{"use_ema": true, "ema_momentum": NaN}', "ema_momentum"),
        ('{"loss_scale_factor": Infinity}', "loss_scale_factor"),
        (json.dumps({"learning_rate": {"module": "keras.optimizers.schedules", "class_name": "ExponentialDecay",
                     "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": float("nan")},
                     "registered_name": None}}), "learning_rate.config.decay_rate"),
    ],
)
def test_create_optimizer_refuses_non_finite_numbers(config_json, name):
    with running_server() as (target, coordinator):
        transport = Transport(target)
        try:
            with pytest.raises(InvalidArgumentError, match=rf"`{name}` must be a finite float32 number"):
                transport.unary("CreateOptimizer", pb.CreateOptimizerRequest(optimizer="m", config_json=config_json))
            # The same request with a finite value is accepted (the check is not over-eager).
            fine = config_json.replace("-Infinity", "0.5").replace("Infinity", "0.5").replace("NaN", "0.5")
            fine = fine.replace("1e400", "0.5").replace("1e39", "0.5")
            transport.unary("CreateOptimizer", pb.CreateOptimizerRequest(optimizer="ok", config_json=fine))
        finally:
            transport.close()
        assert [h.key for h in coordinator.hosts()] == ["ok"]
