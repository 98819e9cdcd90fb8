"""Sharded pushes and pulls over each shard's bulk channel, against a single server.

Every shard server offers the bulk channel (TCP, and shared memory to workers on its host) by
default; a sharded client stages its slices and pulls its pieces over it, shard by shard, and only the commit (and the job's control calls)
go over gRPC. Weights and store stay bit-identical to a single server; a shard without a bulk
channel is reached over gRPC in the same job ("mixed"), and ``bulk="off"`` uses gRPC only.
"""

from __future__ import annotations

import numpy as np
import pytest
from _ps_helpers import running_server

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.sharding.server import create_shard_server, stop_shard_server
from _sharding_helpers import REMOTE_CONFIG, remote_grads, remote_values, start_shard_servers

CONFIG = REMOTE_CONFIG
_values, _grads = remote_values, remote_grads


def start_shards(n, bulk_for=lambda i: None):
    return start_shard_servers(n, bulk_for=bulk_for)


class _Recorder:
    """Wraps a shard caller: which shard-protocol methods went over gRPC."""

    def __init__(self, caller, calls):
        self._caller, self._calls = caller, calls

    def __call__(self, key, method, *args, **kwargs):
        self._calls.append(method)
        return self._caller(key, method, *args, **kwargs)


def _record(opt):
    calls = [[] for _ in opt._callers]
    opt._callers = [_Recorder(c, calls[i]) for i, c in enumerate(opt._callers)]
    opt._channels._callers = opt._callers  # tickets too
    return calls


def _train_and_compare(opt, ref_opt, values, steps=5):
    opt.build(values)
    ref_opt.build(values)
    for k in range(steps):
        g = _grads(values, k)
        got, ref = opt.push(g, step=k, request_id=f"r{k}"), ref_opt.push(g, step=k, request_id=f"r{k}")
        assert (got.outcome, got.version, got.iterations) == (ref.outcome, ref.version, ref.iterations)
        pulled, ref_pulled = opt.pull(), ref_opt.pull()
        for n in values:
            assert pulled[n].tobytes() == ref_pulled[n].tobytes(), (k, n)
    again = opt.push(_grads(values, steps - 1), step=steps - 1, request_id=f"r{steps - 1}")
    assert again.duplicate  # exactly once: the retry re-staged over bulk and was answered from the table
    store, ref_store = {}, {}
    opt.save_own_variables(store)
    ref_opt.save_own_variables(ref_store)
    for key in ref_store:
        assert np.asarray(store[key]).tobytes() == np.asarray(ref_store[key]).tobytes(), key


@pytest.fixture
def single():
    with running_server(coordinator=Coordinator(device="numba")) as (target, _):
        yield target


@pytest.mark.parametrize(("wire", "mode"), [(None, "auto"), ("bfloat16", "auto"), (None, "tcp"), ("bfloat16", "tcp")])
def test_staging_and_pulls_over_every_shards_bulk_channel(single, wire, mode):
    values = _values(5)
    servers, targets = start_shards(3)
    try:
        assert all(s.bulk is not None and s.bulk.shared_memory for s in servers)
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, gradient_wire_dtype=wire, **CONFIG) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, gradient_wire_dtype=wire, bulk=mode,
                             **CONFIG) as opt:  # fmt: skip
            assert opt.transfer_path == "unknown"
            calls = _record(opt)
            _train_and_compare(opt, ref_opt, values)
            # Same host: shared memory unless the worker asked for TCP.
            assert opt.transfer_path == ("shm" if mode == "auto" else "tcp")
            arenas = [sorted(s.bulk._arenas) for s in servers]  # full pulls map each shard's arena
            assert arenas == ([["job"]] * 3 if mode == "auto" else [[]] * 3)
            for i, methods in enumerate(calls):
                # Slices and pieces travelled over the bulk channel: gRPC only opened it (a
                # ticket per shard) and carried the commit and the control calls.
                assert "stage" not in methods and "pull" not in methods, (i, methods)
                assert methods.count("open_bulk") == 1, (i, methods)
            assert "push" in calls[0]
            # Errors over the bulk channel are the same as over gRPC.
            with pytest.raises(client_errors.InvalidArgumentError, match="shape"):
                bad = _grads(values, 0)
                bad["w"] = np.zeros((64, 63), np.float32)
                opt.push(bad)
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


def test_a_shard_without_bulk_is_reached_over_grpc(single):
    values = _values(6)
    servers, targets = start_shards(3, bulk_for=lambda i: False if i == 1 else None)
    try:
        assert servers[1].bulk is None
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:  # fmt: skip
            calls = _record(opt)
            _train_and_compare(opt, ref_opt, values)
            assert opt.transfer_path == "mixed"
            assert "stage" in calls[1] and "pull" in calls[1]
            assert "stage" not in calls[0] and "stage" not in calls[2]
        with RemoteAdamax(targets, worker_id="w2", optimizer="job", timeout=60, bulk="off", **CONFIG) as off:
            calls = _record(off)
            off.pull()
            assert off.transfer_path == "grpc" and all("pull" in c and "open_bulk" not in c for c in calls)
        with pytest.raises(ValueError, match="bulk"):
            RemoteAdamax(targets, worker_id="w", optimizer="job", bulk="udp", **CONFIG)
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


def test_bulk_with_tls_is_refused():
    import grpc

    with pytest.raises(ValueError, match="plaintext bulk port next to TLS is refused"):  # SecurityConfigError
        create_shard_server("127.0.0.1:0", 0, ["127.0.0.1:1"], bulk=True,
                            credentials=grpc.ssl_server_credentials([(b"k", b"c")]))  # fmt: skip


def test_a_bulk_channel_lost_mid_job_falls_back_to_grpc_exactly_once(single):
    """Shard 1's bulk listener goes away between two pushes: the stage goes over gRPC instead
    (the same request id), nothing is applied twice, and the job stays equal to one server."""
    values = _values(7)
    servers, targets = start_shards(3)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:  # fmt: skip
            opt.build(values)
            ref_opt.build(values)
            for k in range(4):
                if k == 2:
                    servers[1].bulk.close()  # open connections dropped, the port closed
                g = _grads(values, k)
                got, ref = opt.push(g, step=k, request_id=f"r{k}"), ref_opt.push(g, step=k, request_id=f"r{k}")
                assert (got.outcome, got.version, got.duplicate) == (ref.outcome, ref.version, False)
                pulled, ref_pulled = opt.pull(), ref_opt.pull()
                for n in values:
                    assert pulled[n].tobytes() == ref_pulled[n].tobytes(), (k, n)
            assert opt.transfer_path == "mixed"
            assert opt.status()["version"] == 4
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


def test_shared_memory_on_shards_follows_the_server_and_frees_deleted_jobs(single):
    """A shard started without shared memory serves the same worker over TCP; a deleted job's
    pull arena is released, and a job of the same name re-created with other variables gets a
    new one (never the old layout)."""
    values = _values(8)
    servers, targets = start_shard_servers(2, bulk_for=lambda i: None, shared_memory=False)
    try:
        assert not any(s.bulk.shared_memory for s in servers)
        with RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:
            opt.build(values)
            opt.push(_grads(values, 0))
            opt.pull()
            assert opt.transfer_path == "tcp"
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)

    servers, targets = start_shards(2)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="a", timeout=60, **CONFIG) as a:
            a.build(values)
            a.push(_grads(values, 0))
            first = a.pull()
            assert a.transfer_path == "shm" and all("a" in s.bulk._arenas for s in servers)
            assert a.delete()
        small = {"v": np.arange(12, dtype=np.float32).reshape(4, 3)}
        with RemoteAdamax(targets, worker_id="w", optimizer="b", timeout=60, learning_rate=0.1) as b, \
                RemoteAdamax(single, worker_id="w", optimizer="b", timeout=60, learning_rate=0.1) as ref:  # fmt: skip
            b.build(small)
            ref.build(small)
            assert b.pull()["v"].tobytes() == small["v"].tobytes()
            # One shard holds no piece of this job: its replies carry nothing, and the same
            # connection keeps working pull after pull.
            assert sum(bool(s.shard_registry.host("b").piece_specs()) for s in servers) == 1
            for k in range(3):
                g = np.full((4, 3), 0.5 + k, np.float32)
                b.push({"v": g}, step=k, request_id=f"r{k}")
                ref.push({"v": g}, step=k, request_id=f"r{k}")
                assert b.pull()["v"].tobytes() == ref.pull()["v"].tobytes()
            assert b.transfer_path == "shm"
            owner = [s for s in servers if s.shard_registry.host("b").piece_specs()][0]
            assert sorted(owner.bulk._arenas) == ["b"]  # "a"'s arenas released
            assert all("a" not in s.bulk._arenas for s in servers)
        with RemoteAdamax(targets, worker_id="w", optimizer="a", timeout=60, **CONFIG) as again:
            again.build(small)  # same name, other variables
            got = again.pull()
            assert sorted(got) == ["v"] and got["v"].tobytes() == small["v"].tobytes()
            assert again.transfer_path == "shm"
        assert sorted(first) == sorted(values)
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


@pytest.mark.parametrize("mode", ["auto", "tcp", "off"])
def test_non_finite_slices_are_caught_on_every_path(single, mode):
    """Shards count NaN/Inf from the statistics folded into the receive's copy (shared memory,
    TCP) or from their own pass (gRPC): a bad value on any shard's slice is refused, or skips the
    step with non_finite="skip", exactly as on a single server."""
    values = _values(9)
    servers, targets = start_shards(3)
    try:
        for policy in ("reject", "skip"):
            key = f"nf-{policy}"
            with RemoteAdamax(single, worker_id="w", optimizer=key, timeout=60, non_finite=policy, **CONFIG) as ref, \
                    RemoteAdamax(targets, worker_id="w", optimizer=key, timeout=60, non_finite=policy, bulk=mode,
                                 **CONFIG) as opt:  # fmt: skip
                ref.build(values)
                opt.build(values)
                for k, (name, where) in enumerate((("emb", (599, 31)), ("w", (0, 0)), ("d", (49, 19)))):
                    bad = _grads(values, 0)  # dense everywhere (step 0)
                    bad[name] = np.array(bad[name], copy=True)
                    bad[name][where] = np.nan if k % 2 else np.inf
                    if policy == "reject":
                        for target in (ref, opt):
                            with pytest.raises(client_errors.InvalidArgumentError, match=f"'{name}' \\(1 NaN/Inf\\)"):
                                target.push(bad, step=k, request_id=f"bad{k}")
                        ref.push(_grads(values, k), step=k, request_id=f"good{k}")
                        opt.push(_grads(values, k), step=k, request_id=f"good{k}")
                    else:
                        got, want = opt.push(bad, step=0, request_id=f"bad{k}"), ref.push(bad, step=0, request_id=f"bad{k}")
                        assert (got.outcome, got.version) == (want.outcome, want.version) == ("skipped_non_finite", 0)
                assert opt.transfer_path == {"auto": "shm", "tcp": "tcp", "off": "grpc"}[mode]
                got, want = opt.pull(), ref.pull()
                for n in values:
                    assert got[n].tobytes() == want[n].tobytes(), n
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)


@pytest.mark.parametrize("mode", ["auto", "tcp", "off"])
def test_pull_into_lands_in_the_callers_arrays(mode):
    """``pull_into`` on a sharded job (the framework adapters' pull) equals ``pull``: over a bulk
    channel each shard's pieces are received straight into the caller's arrays (a split
    variable's piece into its rows), and arrays of another dtype or layout get a copy."""
    values = _values(10)
    servers, targets = start_shards(3)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="into", timeout=60, bulk=mode, **CONFIG) as opt:
            opt.build(values)
            for k in range(2):
                opt.push(_grads(values, k))
            expected = opt.pull()
            by_name = opt._need_placement().by_name()
            assert any(v.split for v in by_name.values())  # "emb" is cut over several shards
            out = {n: np.zeros(v.shape, v.dtype) for n, v in values.items()}
            out["w"] = np.zeros(values["w"].shape, np.float64)  # another dtype: cast in
            out["d"] = np.zeros(values["d"].shape, values["d"].dtype, order="F")  # not C-contiguous
            seen = []
            pull = opt._channels.pull

            def recording(shard, names, min_version, timeout, out=None):
                seen.append(out)
                return pull(shard, names, min_version, timeout, out=out)

            opt._channels.pull = recording
            version = opt.pull_into(out)
            assert version == opt.version == 2
            for n in values:
                np.testing.assert_array_equal(out[n], expected[n].astype(out[n].dtype), err_msg=n)
            if mode != "off":  # every shard was asked to write its pieces of "emb" and "b" in place
                asked = {n: [] for n in ("emb", "b")}
                for views in seen:
                    for n, view in (views or {}).items():
                        assert np.shares_memory(view, out[n]) and n not in ("w", "d")
                        asked[n].append(view.shape[0] if view.ndim else 0)
                assert sum(asked["emb"]) == values["emb"].shape[0] and len(asked["emb"]) == len(by_name["emb"].pieces)
                assert asked["b"] == [values["b"].shape[0]]
                assert opt.transfer_path == ("shm" if mode == "auto" else "tcp")
            with pytest.raises(client_errors.InvalidArgumentError, match="shape"):
                opt.pull_into({"b": np.zeros(3, np.float32)})
            with pytest.raises(client_errors.InvalidArgumentError, match="no variable"):
                opt.pull_into({"nope": np.zeros(3, np.float32)})
    finally:
        for s in servers:
            stop_shard_server(s, grace=0)
