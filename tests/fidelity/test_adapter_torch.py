"""``adamax_client.torch.RemoteAdamax`` against ``keras.optimizers.Adamax`` (numpy backend).

One worker in sync mode, gradients from real torch backward passes: after every step the
parameters equal what Keras's Adamax computes from the same gradients, bit for bit.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

from _ps_helpers import running_server  # noqa: E402

from adamax_client.torch import RemoteAdamax, parameter_names  # noqa: E402


class Net(torch.nn.Module):
    """An MLP plus a parameter that never gets a gradient (absent on the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
        self.head = torch.nn.Linear(16, 4)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(steps: int, seed: int = 1, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


class KerasTwin:
    """Keras Adamax over copies of the net's initial parameters, fed the adapter's gradients."""

    def __init__(self, model: torch.nn.Module, **kwargs) -> None:
        self.names = [n for n, _ in model.named_parameters()]
        self.vars = [
            keras.Variable(p.detach().numpy().copy(), dtype=str(p.dtype).removeprefix("torch."), name=n.replace(".", "_"))
            for n, p in model.named_parameters()
        ]
        self.opt = keras.optimizers.Adamax(**kwargs)
        self.opt.build(self.vars)

    def apply(self, grads: list) -> None:
        self.opt.apply(grads)

    def assert_equal(self, model: torch.nn.Module, label: str) -> None:
        for (name, p), v in zip(model.named_parameters(), self.vars):
            np.testing.assert_array_equal(p.detach().numpy(), v.numpy(), err_msg=f"{label}: {name}")

    def store(self) -> dict:
        store: dict = {}
        self.opt.save_own_variables(store)
        return store


def grads_of(model) -> list:
    return [None if p.grad is None else p.grad.detach().numpy().copy() for p in model.parameters()]


CONFIGS = {
    "plain": {"learning_rate": 0.01},
    "clipnorm": {"learning_rate": 0.02, "clipnorm": 0.05},
    "global_clipnorm_weight_decay": {"learning_rate": 0.01, "global_clipnorm": 0.1, "weight_decay": 0.004},
    "ema": {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    "accumulation": {"learning_rate": 0.01, "gradient_accumulation_steps": 3},
}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "at_step"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_sync_worker_equals_keras_adamax_bit_for_bit(config, overlap):
    kwargs = CONFIGS[config]
    model = make_net()
    twin = KerasTwin(model, **kwargs)
    with running_server() as (target, _):
        # A tiny bucket cap: every parameter is its own bucket, streamed during backward.
        with RemoteAdamax(model.named_parameters(), target, optimizer="job", mode="sync", num_workers=1,
                          overlap=overlap, bucket_cap_mb=1e-4, threads=None, **kwargs) as opt:  # fmt: skip
            for step, (x, y) in enumerate(batches(7)):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                grads = grads_of(model)
                assert grads[0] is None  # `unused` has no gradient: sent as an absent entry
                opt.step()
                twin.apply(grads)
                twin.assert_equal(model, f"{config} step {step}")
                assert opt.iterations == int(np.asarray(twin.opt.iterations))
            store = opt.state_dict()["adamax_ps"]["store"]
            expected = twin.store()
            assert list(store) == list(expected)
            for key, value in expected.items():
                np.testing.assert_array_equal(store[key].numpy(), np.asarray(value), err_msg=f"store[{key}]")


def test_a_torch_lr_scheduler_reaches_the_server():
    model = make_net()
    twin = KerasTwin(model, learning_rate=0.05)
    with running_server() as (target, _):
        with RemoteAdamax(model.parameters(), target, lr=0.05, mode="sync", threads=None) as opt:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            for step, (x, y) in enumerate(batches(6)):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                twin.opt.learning_rate = opt.param_groups[0]["lr"]
                grads = grads_of(model)
                opt.step()
                twin.apply(grads)
                twin.assert_equal(model, f"step {step}")
                sched.step()
            assert float(opt.remote.learning_rate) == np.float32(0.05 * 0.5**2)


def test_param_groups_weight_decay_off_and_generated_names():
    model = make_net()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    names = parameter_names(groups)
    assert names == [[f"group0.param{i}" for i in range(len(decay))], [f"group1.param{i}" for i in range(len(no_decay))]]
    vars_decay = [keras.Variable(p.detach().numpy().copy()) for p in decay]
    vars_plain = [keras.Variable(p.detach().numpy().copy()) for p in no_decay]
    kopt = keras.optimizers.Adamax(learning_rate=0.01, weight_decay=0.1)
    kopt.exclude_from_weight_decay(var_list=vars_plain)
    kopt.build(vars_decay + vars_plain)
    with running_server() as (target, _):
        with RemoteAdamax(groups, target, learning_rate=0.01, weight_decay=0.1, mode="sync", threads=None) as opt:
            assert [n for n, _, _ in opt.remote.variable_specs] == names[0] + names[1]
            for x, y in batches(3):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                grads = [None if p.grad is None else p.grad.numpy().copy() for p in decay + no_decay]
                opt.step()
                kopt.apply(grads)
                for p, v in zip(decay + no_decay, vars_decay + vars_plain):
                    np.testing.assert_array_equal(p.detach().numpy(), v.numpy())
        with pytest.raises(ValueError, match="one learning rate"):
            with RemoteAdamax([{"params": decay, "lr": 0.1}, {"params": no_decay, "lr": 0.2}], target,
                              optimizer="two_lr", threads=None) as opt:  # fmt: skip
                opt.step()


def _train(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("config", ["plain", "ema", "accumulation"])
def test_state_dict_round_trip_through_torch_save_resumes_exactly(config):
    kwargs = CONFIGS[config]
    data = batches(8)
    with running_server() as (target, _):
        model = make_net()
        with RemoteAdamax(model.named_parameters(), target, optimizer="a", mode="sync", threads=None, **kwargs) as opt:
            _train(model, opt, data[:4])
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            _train(model, opt, data[4:])
            reference = {n: p.detach().clone() for n, p in model.named_parameters()}
            reference_store = opt.state_dict()["adamax_ps"]["store"]

    with running_server() as (target, _):  # a new server: nothing left of the first job
        buffer.seek(0)
        saved = torch.load(buffer)  # weights_only: the state dict holds tensors and plain values
        model = make_net(seed=123)
        model.load_state_dict(saved["model"])
        with RemoteAdamax(model.named_parameters(), target, optimizer="b", mode="sync", threads=None, **kwargs) as opt:
            opt.load_state_dict(saved["opt"])
            _train(model, opt, data[4:])
            for name, p in model.named_parameters():
                assert torch.equal(p.detach(), reference[name]), name
            store = opt.state_dict()["adamax_ps"]["store"]
            for key, value in reference_store.items():
                assert torch.equal(store[key], value), key


def test_gradients_leave_while_backward_still_runs():
    """The first layer's gradient is the last one backward computes; by then the comm thread
    has already streamed the later layers' buckets into the push."""
    model = make_net()
    seen = {}
    with running_server() as (target, _):
        with RemoteAdamax(model.named_parameters(), target, mode="sync", bucket_cap_mb=1e-4, overlap=True,
                          threads=None) as opt:  # fmt: skip

            def before_first_layer_grad(module, grad_output):
                state = opt._step_state
                deadline = time.monotonic() + 10
                while state is not None and state.streamed == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
                seen["streamed"] = 0 if state is None else state.streamed
                seen["thread"] = threading.current_thread().name

            model.body[0].register_full_backward_pre_hook(before_first_layer_grad)
            x, y = batches(1)[0]
            x.requires_grad_(True)  # so the first layer's backward hook runs
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
    assert seen["streamed"] >= 2, seen  # head weight and bias at least, before body[0]'s grads exist


def test_no_sync_accumulates_and_a_second_backward_without_it_is_refused():
    model = make_net()
    twin = KerasTwin(model, learning_rate=0.01)
    (x1, y1), (x2, y2) = batches(2)
    with running_server() as (target, _):
        with RemoteAdamax(model.named_parameters(), target, learning_rate=0.01, mode="sync", overlap=True,
                          threads=None) as opt:  # fmt: skip
            opt.zero_grad()
            with opt.no_sync():
                loss_of(model, x1, y1).backward()
            loss_of(model, x2, y2).backward()  # pushes the accumulated sum
            grads = grads_of(model)
            opt.step()
            twin.apply(grads)
            twin.assert_equal(model, "accumulated step")

            opt.zero_grad()
            loss_of(model, x1, y1).backward()
            with pytest.raises(RuntimeError, match="no_sync"):
                loss_of(model, x2, y2).backward()
            assert opt.iterations == 1  # the cut push changed nothing on the server

            opt.zero_grad()  # and the optimizer carries on
            loss_of(model, x2, y2).backward()
            grads = grads_of(model)
            opt.step()
            twin.apply(grads)
            twin.assert_equal(model, "after the refused step")


def test_hooks_step_closure_and_zero_grad_behave_like_torch():
    model = make_net()
    calls = []
    with running_server() as (target, _):
        with RemoteAdamax(model.named_parameters(), target, mode="sync", threads=None) as opt:
            opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
            opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
            x, y = batches(1)[0]

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            before = model.head.weight.detach().clone()
            loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
            assert not torch.equal(before, model.head.weight)
            assert model.head.weight.dtype == torch.float32 and model.head.weight.is_leaf
            opt.zero_grad()
            assert all(p.grad is None for p in model.parameters())
            with pytest.raises(RuntimeError, match="fixed once"):
                opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_float64_parameters_keep_their_dtype():
    """float64 stays float64. The reference is the in-process engine: Keras 3.15's numpy backend
    computes float64 variables in float32 (a known difference, see test_engine_fidelity)."""
    from adamax_server import Adamax

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).double()
    engine = Adamax(learning_rate=0.1, device="cpu")
    engine.build({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    with running_server() as (target, _):
        with RemoteAdamax(model.named_parameters(), target, learning_rate=0.1, mode="sync", threads=None) as opt:
            x = torch.randn(8, 5, dtype=torch.float64)
            for step in range(3):
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                grads = grads_of(model)
                opt.step()
                engine.apply(grads)
                for (name, p), value in zip(model.named_parameters(), engine.trainable_variables.values()):
                    np.testing.assert_array_equal(p.detach().numpy(), value, err_msg=f"step {step}: {name}")
            assert model.weight.dtype == torch.float64
        with pytest.raises(TypeError, match="bfloat16"):
            RemoteAdamax([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], target, optimizer="bf", threads=None)
