"""The assembled job over real gRPC shard servers, against a single server doing the same calls.

* ``CheckpointClient(shard_list).download()`` returns the single server's checkpoint format
  (manifest and files equal to a single server's download of the same training, live state and
  stored cut alike); ``upload()`` re-splits one onto a 2-shard job, which then pulls and stores
  what the single server holds.
* ``gradient_wire_dtype`` ("bfloat16", "float16") on a sharded job: bit-identical weights and
  store to a single server using the same wire dtype (norm clipping included).
* ``stateless_apply`` on a sharded job: the single server's results, job state untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from _ps_helpers import running_server

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_client.checkpoints import CheckpointClient
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.storage.checkpointing import CheckpointManager
from _sharding_helpers import REMOTE_CONFIG, remote_grads, remote_values, start_shard_servers, stop_shard_servers

# Manifest fields that name the download itself, not the job's state.
_ABOUT_THE_FILE = ("checkpoint_id", "created_unix", "reason")
CONFIG = REMOTE_CONFIG
_values, _grads = remote_values, remote_grads
start_shards, stop_shards = start_shard_servers, stop_shard_servers


def _train(opt, values, steps):
    opt.build(values)
    for k in range(steps):
        opt.push(_grads(values, k), step=k, request_id=f"r{k}")
        opt.pull()


def _state_of(manifest):
    return [{k: v for k, v in opt.items() if k not in _ABOUT_THE_FILE} for opt in manifest["optimizers"]]


def _assert_same_checkpoint(got, ref):
    (_, m_got, f_got), (_, m_ref, f_ref) = got, ref
    assert _state_of(m_got) == _state_of(m_ref)
    assert sorted(f_got) == sorted(f_ref)
    for name in f_ref:
        assert sorted(f_got[name]) == sorted(f_ref[name])
        for t in f_ref[name]:
            a, b = np.asarray(f_got[name][t]), np.asarray(f_ref[name][t])
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), (name, t)


@pytest.fixture
def single():
    coordinator = Coordinator(device="numba")
    with running_server(coordinator=coordinator, checkpoints=CheckpointManager(coordinator, None)) as (target, _):
        yield target


def test_download_of_a_sharded_job_equals_a_single_server_download(single, tmp_path):
    values = _values()
    servers, targets = start_shards(3, tmp_path)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:  # fmt: skip
            _train(ref_opt, values, 5)
            _train(opt, values, 5)
            with CheckpointClient(single, timeout=30) as ref_client, CheckpointClient(targets, timeout=30) as client:
                ref = ref_client.download()
                seen = []
                live = client.download(progress=lambda done, total: seen.append((done, total)))
                assert live[0] == "live" and seen and seen[-1][0] == seen[-1][1] > 0
                _assert_same_checkpoint(live, ref)
                # A stored cut (every shard's part under one id) assembles to the same checkpoint.
                saved = client.save("test")
                stored = client.download("latest")
                assert stored[0] == saved.checkpoint_id
                _assert_same_checkpoint(stored, ref)
                assert client.download(saved.checkpoint_id)[0] == saved.checkpoint_id
                with pytest.raises(client_errors.NotFoundError):
                    client.download("no-such-cut")
                with pytest.raises(client_errors.NotFoundError):
                    client.download(optimizers=["nope"])
    finally:
        stop_shards(servers)


def test_upload_onto_a_two_shard_job_then_pulls_equal(single, tmp_path):
    values = _values(1)
    servers, targets = start_shards(2, tmp_path)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt:
            _train(ref_opt, values, 4)
            with CheckpointClient(single, timeout=30) as ref_client:
                _, manifest, files = ref_client.download()
            ref_weights = ref_opt.pull()
            ref_store = {}
            ref_opt.save_own_variables(ref_store)
        with CheckpointClient(targets, timeout=30) as client:
            # A corrupt checkpoint is refused before anything is written or restored.
            file_name = manifest["optimizers"][0]["file"]
            bad = {f: dict(t) for f, t in files.items()}
            bad[file_name]["var/0"] = bad[file_name]["var/0"] + np.float32(1)
            with pytest.raises(client_errors.DataLossError):
                client.upload(manifest, bad, restore=True)
            assert client.list() == []

            saved, restored = client.upload(manifest, files, save=True, restore=True)
            assert saved is not None and saved.checkpoint_id
            assert [(r.optimizer, r.version, r.iterations) for r in restored] == [("job", 4, 4)]
            assert [c.checkpoint_id for c in client.list()] == [saved.checkpoint_id]
            # The upload is a cut like any other: a download of it is the uploaded checkpoint.
            _assert_same_checkpoint(client.download(saved.checkpoint_id), ("", manifest, files))

        with RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:
            weights = opt.pull(min_version=0)
            assert list(weights) == list(ref_weights)
            for n in values:
                assert weights[n].tobytes() == ref_weights[n].tobytes(), n
            store = {}
            opt.save_own_variables(store)
            assert sorted(store) == sorted(ref_store)
            for key in ref_store:
                assert np.asarray(store[key]).tobytes() == np.asarray(ref_store[key]).tobytes(), key
            assert opt.status()["version"] == 4 and len(opt.status()["shards"]) == 2
            # Training goes on from it exactly as on the single server.
            opt.push(_grads(values, 4), step=4, request_id="r4")
            with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt:
                ref_opt.push(_grads(values, 4), step=4, request_id="r4")
                ref_next = ref_opt.pull()
            nxt = opt.pull()
            for n in values:
                assert nxt[n].tobytes() == ref_next[n].tobytes(), n
    finally:
        stop_shards(servers)


def test_upload_restore_without_checkpoint_dir(single):
    """restore=True, save=False: loaded on every shard from memory (no --checkpoint-dir needed)."""
    values = _values(2)
    servers, targets = start_shards(2)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt:
            _train(ref_opt, values, 3)
            with CheckpointClient(single, timeout=30) as ref_client:
                _, manifest, files = ref_client.download()
            ref_weights = ref_opt.pull()
        with CheckpointClient(targets, timeout=30) as client:
            with pytest.raises(client_errors.FailedPreconditionError, match="checkpoint directory"):
                client.upload(manifest, files, save=True)
            saved, restored = client.upload(manifest, files, save=False, restore=True)
            assert saved is None and [r.version for r in restored] == [3]
        with RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:
            weights = opt.pull(min_version=0)
            for n in values:
                assert weights[n].tobytes() == ref_weights[n].tobytes(), n
    finally:
        stop_shards(servers)


@pytest.mark.parametrize("bulk", ["auto", "tcp", "off"])  # each shard's bulk channel (shared memory here, TCP), gRPC
@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
@pytest.mark.parametrize("config", [{"learning_rate": 0.01, "clipnorm": 0.3}, CONFIG], ids=["clipnorm", "global"])
def test_gradient_wire_dtype_equals_single_server(single, wire, config, bulk):
    values = _values(3)
    servers, targets = start_shards(3)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, gradient_wire_dtype=wire, bulk="off", **config) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, gradient_wire_dtype=wire, bulk=bulk, **config) as opt:  # fmt: skip
            _train(ref_opt, values, 5)
            _train(opt, values, 5)
            assert opt.transfer_path == {"auto": "shm", "tcp": "tcp", "off": "grpc"}[bulk]
            ref, got = ref_opt.pull(), opt.pull()
            for n in values:
                assert got[n].tobytes() == ref[n].tobytes(), n
            ref_store, store = {}, {}
            ref_opt.save_own_variables(ref_store)
            opt.save_own_variables(store)
            for key in ref_store:
                assert np.asarray(store[key]).tobytes() == np.asarray(ref_store[key]).tobytes(), key
        # The narrowing is real: full-precision pushes give other weights.
        with RemoteAdamax(targets, worker_id="w", optimizer="full", timeout=60, **config) as full:
            _train(full, values, 5)
            assert full.pull()["w"].tobytes() != got["w"].tobytes()
        with pytest.raises(ValueError, match="gradient_wire_dtype"):
            RemoteAdamax(targets, worker_id="w", optimizer="job", gradient_wire_dtype="int8", **config)
    finally:
        stop_shards(servers)


def test_stateless_apply_equals_single_server(single):
    values = _values(4)
    servers, targets = start_shards(3)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="job", timeout=60, **CONFIG) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:  # fmt: skip
            with pytest.raises(client_errors.InvalidArgumentError, match="must be built"):
                opt.stateless_apply([], [], [])
            ref_opt.exclude_from_weight_decay(var_names=["b"])
            opt.exclude_from_weight_decay(var_names=["b"])
            _train(ref_opt, values, 2)
            _train(opt, values, 2)
            ref_opt.save_own_variables(store := {})
            optimizer_variables = [store[str(i)] for i in range(len(store))]
            trainable = [np.asarray(v) * 0.5 for v in ref_opt.pull().values()]
            grads = list(_grads(values, 7).values())
            before = opt.pull()
            expected = ref_opt.stateless_apply(optimizer_variables, grads, trainable)
            got = opt.stateless_apply(optimizer_variables, grads, trainable)
            for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
                assert (np.asarray(a).dtype, np.asarray(a).tobytes()) == (np.asarray(b).dtype, np.asarray(b).tobytes())
            assert len(got[1]) == len(optimizer_variables)
            after = opt.pull()  # the job's own state is untouched
            for n in values:
                assert after[n].tobytes() == before[n].tobytes()
            with pytest.raises(client_errors.InvalidArgumentError, match="1:1"):
                opt.stateless_apply(optimizer_variables[:-1], grads, trainable)
    finally:
        stop_shards(servers)


def test_an_unbuilt_optimizer_downloads_and_uploads_like_on_a_single_server(single):
    servers, targets = start_shards(2)
    try:
        with RemoteAdamax(single, worker_id="w", optimizer="fresh", learning_rate=0.1) as ref_opt, \
                RemoteAdamax(targets, worker_id="w", optimizer="fresh", learning_rate=0.1) as opt:  # fmt: skip
            assert not ref_opt.built and not opt.built
            with CheckpointClient(single) as ref_client, CheckpointClient(targets) as client:
                ref = ref_client.download()
                _assert_same_checkpoint(client.download(), ref)
        other, other_targets = start_shards(3)
        try:
            with CheckpointClient(other_targets) as client:
                saved, restored = client.upload(ref[1], ref[2], save=False, restore=True)
                assert saved is None and [(r.optimizer, r.version) for r in restored] == [("fresh", 0)]
                _assert_same_checkpoint(client.download(), ref)
        finally:
            stop_shards(other)
    finally:
        stop_shards(servers)


def test_download_and_upload_with_a_shard_down_fail_cleanly(tmp_path):
    import time

    values = _values(8)
    servers, targets = start_shards(3, tmp_path)
    try:
        with RemoteAdamax(targets, worker_id="w", optimizer="job", timeout=60, **CONFIG) as opt:
            _train(opt, values, 2)
        with CheckpointClient(targets, timeout=30) as client:
            _, manifest, files = client.download()
            stop_shards([servers[2]])
            started = time.monotonic()
            with pytest.raises(client_errors.UnavailableError, match="shard 2"):
                client.download()
            with pytest.raises(client_errors.UnavailableError, match="shard 2"):
                client.upload(manifest, files, save=False, restore=True)
            assert time.monotonic() - started < 25  # bounded by the leader's shard-call deadline
    finally:
        stop_shards(servers[:2])
