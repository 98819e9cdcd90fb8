"""The framework adapters on a sharded job: a shard list as ``target``, the same results as one server.

The torch adapter over 1 and 3 shard servers (pieces small enough that every weight matrix is
split into row ranges) equals ``keras.optimizers.Adamax`` on the same gradients bit for bit, with
clipnorm, global_clipnorm, EMA and accumulation; its ``state_dict`` resumes exactly; the job
lifecycle (``if_exists``, ``delete``, a reused name with other shapes) behaves as on one server.
The Keras adapter runs a jitted ``model.fit`` on 2 shards against a local Keras fit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

from fidelity.test_adapter_keras import run_fit  # noqa: E402
from fidelity.test_adapter_torch import CONFIGS, KerasTwin, batches, grads_of, loss_of, make_net  # noqa: E402

from adamax_client import errors as client_errors  # noqa: E402
from adamax_client.sharded import ShardedRemoteAdamax  # noqa: E402
from adamax_client.torch import RemoteAdamax  # noqa: E402
from _sharding_helpers import start_shard_servers, stop_shard_servers  # noqa: E402

MIN_PIECE = 256  # bytes: the 32x12 and 16x32 weights are split over the shards


def start_shards(n: int):
    return start_shard_servers(n, min_piece=MIN_PIECE)


@pytest.fixture(params=[1, 3], ids=["1shard", "3shards"])
def shards(request):
    servers, targets = start_shards(request.param)
    yield targets
    stop_shard_servers(servers)


@pytest.fixture
def shards3():
    servers, targets = start_shards(3)
    yield targets
    stop_shard_servers(servers)


@pytest.mark.parametrize("config", ["plain", "clipnorm", "global_clipnorm_weight_decay", "ema", "accumulation"])
def test_torch_adapter_on_shards_equals_keras_adamax_bit_for_bit(shards, config):
    kwargs = CONFIGS[config]
    model = make_net()
    twin = KerasTwin(model, **kwargs)
    with RemoteAdamax(model.named_parameters(), shards, optimizer="job", mode="sync", num_workers=1,
                      threads=None, sharded=True, **kwargs) as opt:  # fmt: skip
        assert isinstance(opt.remote, ShardedRemoteAdamax) and opt.remote.num_shards == len(shards)
        if len(shards) == 3:  # the weights really are cut into row ranges
            status = opt.remote.status()["shards"]
            assert all(s["bytes"] > 0 for s in status), status
        for step, (x, y) in enumerate(batches(6)):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            grads = grads_of(model)
            opt.step()
            twin.apply(grads)
            twin.assert_equal(model, f"{config} step {step}")
            assert opt.iterations == int(np.asarray(twin.opt.iterations))
        store = opt.state_dict()["adamax_ps"]["store"]
        expected = twin.store()
        assert list(store) == list(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(store[key].numpy(), np.asarray(value), err_msg=f"store[{key}]")
        assert ",".join(shards) in repr(opt)


def test_torch_state_dict_round_trip_on_shards_resumes_exactly(shards3):
    kwargs = CONFIGS["ema"]
    data = batches(8)
    model = make_net()
    with RemoteAdamax(model.named_parameters(), shards3, optimizer="a", mode="sync", threads=None, **kwargs) as opt:
        for x, y in data[:4]:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        for x, y in data[4:]:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}

    buffer.seek(0)
    saved = torch.load(buffer)
    model = make_net(seed=99)
    model.load_state_dict(saved["model"])
    with RemoteAdamax(model.named_parameters(), shards3, optimizer="b", mode="sync", threads=None, **kwargs) as opt:
        opt.load_state_dict(saved["opt"])
        for x, y in data[4:]:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), reference[name]), name


def test_job_lifecycle_on_shards(shards3):
    model = make_net()
    with RemoteAdamax(model.named_parameters(), shards3, optimizer="life", threads=None) as first:
        x, y = batches(1)[0]
        loss_of(model, x, y).backward()
        first.step()
        assert first.iterations == 1
        # "error": the job exists on every shard.
        with pytest.raises(client_errors.AlreadyExistsError, match="already exists"):
            RemoteAdamax(make_net().named_parameters(), shards3, optimizer="life", if_exists="error", threads=None)
        # A reused name with other shapes names the mismatch.
        other = torch.nn.Linear(3, 2)
        with pytest.raises(client_errors.FailedPreconditionError, match=r"no variable 'weight' in the existing job"):
            RemoteAdamax(other.named_parameters(), shards3, optimizer="life", threads=None)
        # "replace": a fresh job on every shard, from this worker's parameters.
        fresh = make_net(seed=5)
        with RemoteAdamax(fresh.named_parameters(), shards3, optimizer="life", if_exists="replace", threads=None) as again:
            assert again.iterations == 0
            weights = again.remote.pull()
            for name, p in fresh.named_parameters():
                np.testing.assert_array_equal(weights[name], p.detach().numpy())
            assert again.delete() is True
        with pytest.raises(client_errors.NotFoundError):
            first.remote.pull(timeout=5)
        assert first.remote.delete() is False


def test_if_exists_is_checked_on_the_sharded_client(shards3):
    with pytest.raises(ValueError, match="if_exists"):
        ShardedRemoteAdamax(shards3, optimizer="x", if_exists="sometimes")


@pytest.mark.slow
def test_jitted_keras_fit_on_two_shards_matches_local_adamax(tmp_path):
    pytest.importorskip("jax")
    servers, targets = start_shards(2)
    try:
        out = run_fit("jax", ",".join(targets), tmp_path, jit=True)
    finally:
        stop_shard_servers(servers)
    assert out["jit_compile"] is True
    assert out["names"] == out["expected_names"]
    assert out["fit_max_diff"] < 1e-5, out
    ours, local, server = out["iterations"]
    assert ours == local == server == 18
    assert out["store_keys"][0] == out["store_keys"][1]
    assert out["store_max_diff"] < 1e-5, out
    assert out["deleted"] is True
    assert out["restored_iterations"] == 12
    assert out["resume_max_diff"] == 0.0, out


def _run_lr_job(target, sharded):
    """Two sync workers; worker 0 changes the learning rate between rounds and during one."""
    from adamax_client import RemoteAdamax as Client

    rng = np.random.default_rng(3)
    values = {"emb": rng.standard_normal((40, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}
    kwargs = dict(optimizer="lr", mode="sync", num_workers=2, learning_rate=0.05, clipnorm=0.5, timeout=20)
    workers = [Client(target, worker_id=f"w{i}", sharded=sharded, **kwargs) for i in range(2)]
    outcomes, versions, rates = [], [], []
    try:
        workers[0].build(values)
        workers[1].pull()
        for rnd in range(4):
            if rnd in (1, 3):
                workers[0].learning_rate = 0.05 / (rnd + 1)
            versions.append(workers[0].status()["version"])
            for i, w in enumerate(workers):
                g = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in values.items()}
                if rnd == 2 and i == 1:
                    workers[0].learning_rate = 0.007  # inside an open round: the round's step uses it
                outcomes.append(w.push(g).outcome)
            for w in workers:
                w.pull()
            rates.append(float(workers[1].learning_rate))
        store: dict = {}
        workers[1].save_own_variables(store)
        return workers[1].pull(), store, outcomes, versions, rates
    finally:
        for w in workers:
            w.close()


def test_setting_the_learning_rate_on_shards_is_congruent_with_one_server(shards3):
    """On one server a learning-rate change moves no version; a sharded job's must not either,
    or sync workers that computed on the current version would be dropped as late."""
    from _ps_helpers import running_server

    with running_server() as (target, _):
        ref_weights, ref_store, ref_outcomes, ref_versions, ref_rates = _run_lr_job(target, sharded=False)
    weights, store, outcomes, versions, rates = _run_lr_job(shards3, sharded=True)
    assert outcomes == ref_outcomes and "dropped_late" not in outcomes
    assert versions == ref_versions == [0, 1, 2, 3]
    assert rates == ref_rates
    for n in ref_weights:
        assert weights[n].tobytes() == ref_weights[n].tobytes(), n
    assert sorted(store) == sorted(ref_store)
    for k in ref_store:
        assert np.asarray(store[k]).tobytes() == np.asarray(ref_store[k]).tobytes(), k


def test_one_target_that_is_a_shard_server_is_driven_as_a_one_shard_job():
    """``serve --shard-index 0 --shards ADDR``: the plain ``RemoteAdamax("ADDR")`` (and the
    adapters) drive it with the sharded client, the same code a shard list runs."""
    from adamax_client import RemoteAdamax as Client

    servers, targets = start_shards(1)
    try:
        model = make_net()
        twin = KerasTwin(model, learning_rate=0.01)
        with RemoteAdamax(model.named_parameters(), targets[0], mode="sync", threads=None, learning_rate=0.01) as opt:
            assert isinstance(opt.remote, ShardedRemoteAdamax) and opt.remote.num_shards == 1
            for x, y in batches(3):
                opt.zero_grad()
                loss_of(model, x, y).backward()
                grads = grads_of(model)
                opt.step()
                twin.apply(grads)
            twin.assert_equal(model, "one shard")
        plain = Client(targets[0], optimizer="job", mode="sync", learning_rate=0.01)
        try:
            assert isinstance(plain, ShardedRemoteAdamax) and plain.iterations == 3
        finally:
            plain.close()
    finally:
        stop_shard_servers(servers)
