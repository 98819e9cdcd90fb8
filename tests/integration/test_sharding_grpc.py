"""A sharded job over real gRPC servers on 127.0.0.1:0 against a single server, call for call.

Three (and one) shard servers, ``RemoteAdamax([...])`` from the client package, pushes with
every clipping kind, None and row-sparse gradients, async and sync: identical weights, Keras
store, outcomes and errors as one server. Plus the job-wide views (status bytes per shard)
and checkpoints restored onto every shard.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_wire.tensors import RowSparseGradient
from adamax_client.sharded import ShardedRemoteAdamax
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.optim.engine import RowSparseGradient as EngineSparse
from adamax_server.sharding.server import stop_shard_server
from _sharding_helpers import start_shard_servers

MIN_PIECE = 2048


def start_shards(n, tmp_path=None, **kwargs):
    return start_shard_servers(n, tmp_path, min_piece=MIN_PIECE, **kwargs)


@pytest.fixture
def shards3():
    servers, targets = start_shards(3)
    yield targets
    for s in servers:
        stop_shard_server(s, grace=0)


@pytest.fixture
def shards1():
    servers, targets = start_shards(1)
    yield targets
    for s in servers:
        stop_shard_server(s, grace=0)


def _values(rng):
    return {
        "emb": rng.standard_normal((600, 32)).astype(np.float32),
        "w": rng.standard_normal((64, 64)).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
        "d": rng.standard_normal((50, 20)).astype(np.float64),
    }


def _grads(rng, values, k):
    out = {n: rng.standard_normal(np.shape(v)).astype(v.dtype) for n, v in values.items()}
    if k % 3 == 1:
        idx = rng.integers(0, 600, 30)
        out["emb"] = RowSparseGradient(idx, rng.standard_normal((30, 32)).astype(np.float32))
    if k % 4 == 2:
        out["b"] = None
    return out


def _engine_grads(g):
    return {n: EngineSparse(*v) if isinstance(v, RowSparseGradient) else v for n, v in g.items()}


CONFIGS = [
    {"learning_rate": 0.01, "clipnorm": 0.3},
    {"learning_rate": 0.01, "global_clipnorm": 0.5, "use_ema": True, "ema_overwrite_frequency": 2},
    {"learning_rate": 0.01, "gradient_accumulation_steps": 2, "clipnorm": 0.4},
]


@pytest.mark.parametrize("which", ["shards1", "shards3"])
@pytest.mark.parametrize("config", CONFIGS, ids=["clipnorm", "global+ema", "acc"])
def test_remote_sharded_equals_single_server(which, config, request):
    targets = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    values = _values(rng)
    coord = Coordinator(device="numba")
    _, single = coord.create("job", config, Policy())
    single.build(list(values.items()))
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=20, sharded=True, **config)
    try:
        assert isinstance(opt, ShardedRemoteAdamax)
        opt.build(values)
        for k in range(6):
            g = _grads(rng, values, k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = single.push("w", f"r{k}", k, lambda staging: list(_engine_grads(g).items()))
            got = opt.push(g, request_id=f"r{k}")
            assert (got.outcome, got.version, got.iterations) == (expected.outcome, expected.version, expected.iterations)
            opt.pull()
        again = opt.push(g, request_id="r5", step=5)
        assert again.duplicate
        weights = opt.pull()
        ref = single.pull((), lambda v, it, arrays: dict(arrays)).payload
        for n in values:
            assert weights[n].tobytes() == ref[n].tobytes(), n
        store = {}
        opt.save_own_variables(store)
        ref_store = single.save_own_variables()
        assert sorted(store) == sorted(ref_store)
        for key in ref_store:
            assert np.asarray(store[key]).tobytes() == np.asarray(ref_store[key]).tobytes(), key
        assert opt.iterations == single.iterations
        with pytest.raises(client_errors.FailedPreconditionError, match="ahead"):
            opt.push(g, step=99)
        with pytest.raises(client_errors.InvalidArgumentError, match="No gradients"):
            opt.push({n: None for n in values})
        with pytest.raises(KeyError):
            opt.push({"nope": np.zeros(3, np.float32)})
        status = opt.status()
        assert len(status["shards"]) == len(targets) and sum(s["bytes"] for s in status["shards"]) == sum(v.nbytes for v in values.values())
    finally:
        opt.close()
        coord.close()


def test_sync_round_over_grpc_matches_single_server(shards3):
    rng = np.random.default_rng(1)
    values = _values(rng)
    policy = dict(mode="sync", num_workers=2)
    coord = Coordinator(device="numba")
    _, single = coord.create("job", {"learning_rate": 0.01, "global_clipnorm": 1.0}, Policy(**policy))
    single.build(list(values.items()))
    workers = [RemoteAdamax(shards3, worker_id=f"w{i}", optimizer="job", learning_rate=0.01, global_clipnorm=1.0, timeout=20, **policy) for i in range(2)]
    try:
        workers[0].build(values)
        workers[1].pull()
        for rnd in range(3):
            for i, w in enumerate(workers):
                g = _grads(rng, values, rnd + i)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    single.push(f"w{i}", f"r{rnd}", rnd, lambda staging: list(_engine_grads(g).items()))
                w.push(g, request_id=f"r{rnd}")
            for w in workers:
                w.pull()
        ref = single.pull((), lambda v, it, arrays: dict(arrays)).payload
        got = workers[1].pull()
        for n in values:
            assert got[n].tobytes() == ref[n].tobytes()
    finally:
        for w in workers:
            w.close()
        coord.close()


def test_checkpoint_and_restore_on_every_shard(tmp_path):
    servers, targets = start_shards(3, tmp_path)
    rng = np.random.default_rng(2)
    values = _values(rng)
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, clipnorm=0.5, timeout=20)
    try:
        opt.build(values)
        for k in range(3):
            opt.push(_grads(rng, values, k))
        cut = opt.checkpoint()
        assert cut["version"] == 3
        saved = opt.pull()
        store = {}
        opt.save_own_variables(store)
        for k in range(3, 5):
            opt.push(_grads(rng, values, k), step=k)
        assert opt.list_checkpoints() == [cut["id"]]
        restored = opt.restore(cut["id"])
        assert restored["version"] == 3
        now = opt.pull(min_version=0)
        for n in values:
            assert now[n].tobytes() == saved[n].tobytes()
        after = {}
        opt.save_own_variables(after)
        for key in store:
            assert np.asarray(after[key]).tobytes() == np.asarray(store[key]).tobytes()
    finally:
        opt.close()
        for s in servers:
            stop_shard_server(s, grace=0)


def test_after_a_sharded_restore_pull_waits_for_the_restored_version(tmp_path):
    """A sharded restore takes the version back. A sync worker's pull() waits by default for the
    version its last push closes; after restore() it waits for the restored version instead,
    and the job goes on from the cut."""
    servers, targets = start_shards(2, tmp_path)
    rng = np.random.default_rng(5)
    values = _values(rng)
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, timeout=20, mode="sync", num_workers=1)
    try:
        opt.build(values)
        opt.push(_grads(rng, values, 0))
        cut = opt.checkpoint()
        saved = opt.pull()
        for k in (1, 2):
            opt.push(_grads(rng, values, k), step=k)
        assert opt.pull() is not None and opt.version == 3
        opt.push(_grads(rng, values, 3), step=3)  # closes version 4: pull() would wait for 4
        assert opt.restore(cut["id"])["version"] == 1
        now = opt.pull(timeout=15)
        assert opt.version == 1
        for n in values:
            assert now[n].tobytes() == saved[n].tobytes()
        opt.push(_grads(rng, values, 4), step=1)  # the job goes on from the cut
        assert opt.pull(timeout=15) is not None and opt.version == 2
    finally:
        opt.close()
        for s in servers:
            stop_shard_server(s, grace=0)


def test_a_pull_during_a_heal_settles_on_the_restored_cut(tmp_path):
    """Shard 1 comes back at its newest cut (as after a restart) two versions behind shard 0. A
    pull then sees versions more than one event apart: it asks again for what it asked rather
    than waiting for shard 0's version (which the heal takes back), and returns the cut."""
    servers, targets = start_shards(2, tmp_path, watch_interval=0.3)
    rng = np.random.default_rng(8)
    values = _values(rng)
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, timeout=20)
    def cut_then_restart_shard_1(k: int) -> dict:
        """A cut, two pushes past it, then shard 1 back at the cut: returns the cut's weights."""
        opt.push(_grads(rng, values, k))
        opt.checkpoint()
        saved = opt.pull()
        for j in (k + 1, k + 2):
            opt.push(_grads(rng, values, j))
        time.sleep(0.8)  # the watch has seen every shard's incarnation
        assert servers[1].shard_registry.restore_latest_on_start() != []  # shard 1 "restarted"
        return saved

    try:
        opt.build(values)
        for k, version in ((0, 1), (3, 2)):  # the second restart is healed by the watch as well
            saved = cut_then_restart_shard_1(k)
            got = opt.pull()
            assert opt.version == version
            for n in values:
                assert got[n].tobytes() == saved[n].tobytes()
    finally:
        opt.close()
        for s in servers:
            stop_shard_server(s, grace=0)


def test_a_cut_is_not_written_on_a_shard_at_another_version(tmp_path):
    """A shard that came back at an older cut refuses its part of a new cut: it writes nothing
    and prunes nothing, so the cut every shard holds is still there for the heal."""
    servers, targets = start_shards(2, tmp_path, watch_interval=None, keep_cuts=1)
    rng = np.random.default_rng(9)
    values = _values(rng)
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, timeout=20)
    try:
        opt.build(values)
        opt.push(_grads(rng, values, 0))
        first = opt.checkpoint()["id"]
        opt.push(_grads(rng, values, 1))
        assert servers[1].shard_registry.restore_latest_on_start() == [("job", first)]  # back at version 1
        with pytest.raises(client_errors.FailedPreconditionError, match="at version 1, not the cut's 2"):
            opt.checkpoint()
        assert [s.shard_registry.list_cuts("job") for s in servers] == [[first], [first]]
    finally:
        opt.close()
        for s in servers:
            stop_shard_server(s, grace=0)


def test_bytes_per_shard_in_status_and_metrics():
    from adamax_server.ops.metrics import MetricsInterceptor, ServerMetrics

    metrics = [ServerMetrics() for _ in range(3)]
    servers, targets = start_shards(3, kwargs_for=lambda i: {"interceptors": [MetricsInterceptor(metrics[i])],
                                                             "metrics": metrics[i]})  # fmt: skip
    rng = np.random.default_rng(3)
    values = _values(rng)
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, timeout=20)
    try:
        opt.build(values)
        opt.push(_grads(rng, values, 0))
        status = opt.status()
        per_shard = [s["bytes"] for s in status["shards"]]
        assert sum(per_shard) == sum(v.nbytes for v in values.values()) and min(per_shard) > 0
        for i, m in enumerate(metrics):
            assert m.registry.get_sample_value("adamax_ps_shard_bytes", {"optimizer": "job", "shard": str(i)}) == per_shard[i]
            assert m.registry.get_sample_value("adamax_ps_shard_version", {"optimizer": "job", "shard": str(i)}) == 1
        assert metrics[0].registry.get_sample_value("adamax_ps_shards_lagging", {"optimizer": "job"}) == 0
        assert metrics[1].registry.get_sample_value("adamax_ps_rpcs_total", {"method": "ShardService.Call", "code": "OK"}) > 0
    finally:
        opt.close()
        for s in servers:
            stop_shard_server(s, grace=0)


def test_checkpoint_client_takes_the_shard_list(tmp_path):
    from adamax_client.checkpoints import CheckpointClient

    servers, targets = start_shards(2, tmp_path)
    rng = np.random.default_rng(4)
    values = _values(rng)
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", learning_rate=0.01, timeout=20)
    try:
        opt.build(values)
        opt.push(_grads(rng, values, 0))
        with CheckpointClient(",".join(targets), timeout=20) as client:
            saved = client.save("test")
            assert saved.optimizers[0]["version"] == 1
            assert [c.checkpoint_id for c in client.list()] == [saved.checkpoint_id]
            before = opt.pull()
            opt.push(_grads(rng, values, 1), step=1)
            used, restored = client.restore("latest")
            assert used == saved.checkpoint_id and restored[0].version == 1
            after = opt.pull(min_version=0)
            assert all(after[n].tobytes() == before[n].tobytes() for n in values)
            used, manifest, files = client.download("latest")  # assembled (tests/integration/test_sharding_assembled.py)
            assert used == saved.checkpoint_id and manifest["optimizers"][0]["version"] == 1
    finally:
        opt.close()
        for s in servers:
            stop_shard_server(s, grace=0)


def test_a_push_lost_on_a_restarted_shard_is_staged_again_by_the_client():
    """Between stage and commit a shard loses the staged push (it restarted, or the staged copy
    expired): the leader answers NotStaged with nothing applied, and ``push`` stages the same
    request again and commits it once; a persistent loss surfaces as NotStagedError."""
    servers, targets = start_shards(3)
    rng = np.random.default_rng(4)
    values = _values(rng)
    coord = Coordinator(device="numba")
    _, single = coord.create("job", {}, Policy())
    single.build(list(values.items()))
    opt = RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=20)
    commits = []
    forward = opt._one

    def losing(shard, method, *args, **kwargs):  # shard 2 forgets every staged push before the commit
        if method == "push":
            commits.append(args[1])
            if len(commits) <= losses[0]:
                servers[2].shard_registry._hosts["job"].drop([("w", args[1])])
        return forward(shard, method, *args, **kwargs)

    opt._one = losing
    try:
        opt.build(values)
        for k, lost in enumerate([1, 0, 2]):
            losses = [len(commits) + lost]
            g = _grads(rng, values, k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                single.push("w", f"r{k}", k, lambda staging: list(_engine_grads(g).items()))
            got = opt.push(g, request_id=f"r{k}")
            assert (got.outcome, got.version, got.duplicate) == ("applied", k + 1, False)
            assert commits[-(lost + 1):] == [f"r{k}"] * (lost + 1)
        weights = opt.pull()
        ref = single.pull((), lambda v, it, arrays: dict(arrays)).payload
        for n in values:
            assert weights[n].tobytes() == ref[n].tobytes(), n
        losses = [len(commits) + 10]
        with pytest.raises(client_errors.NotStagedError, match="not staged on shard 2") as info:
            opt.push(_grads(rng, values, 3), request_id="gone")
        assert isinstance(info.value, client_errors.FailedPreconditionError)
        assert opt.status()["version"] == 3  # nothing applied
    finally:
        opt.close()
        coord.close()
        for s in servers:
            stop_shard_server(s, grace=0)
