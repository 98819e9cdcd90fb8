"""Checkpoints without gRPC: bit-identical round trips, atomic writes, corruption, retention, safety.

Covers ``adamax_server.storage.checkpoint`` (format, atomic write, verified read, ids) and
``adamax_server.storage.checkpointing`` (the manager), plus the coordinator's snapshot/restore fence.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adamax_server.storage import checkpoint as ckpt
from adamax_server.storage.checkpoint import CheckpointCorrupt, CheckpointStore
from adamax_server.storage.checkpointing import CheckpointManager, CheckpointPolicy
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.errors import InvalidArgument, NotFound, StateRestored

VALUES = {
    "dense": np.arange(12, dtype=np.float32).reshape(4, 3) / 7,
    "bias": np.linspace(-1, 1, 3, dtype=np.float32),
    "emb": np.arange(10, dtype=np.float64).reshape(5, 2) / 3,
}


def grads_for(step: int, worker: int = 0) -> list[tuple[str, Any]]:
    rng = np.random.default_rng(1000 * worker + step)
    return [(n, rng.standard_normal(v.shape).astype(v.dtype)) for n, v in VALUES.items()]


def push(host, worker: str, request: str, step: int, grads) -> Any:
    return host.push(worker, request, step, lambda _staging: grads)


def populated_coordinator() -> Coordinator:
    """An async optimizer with EMA + accumulation + schedule, and a sync one with an open round."""
    coordinator = Coordinator(device="cpu")
    lr = {"module": "keras.optimizers.schedules", "class_name": "ExponentialDecay",
          "config": {"initial_learning_rate": 0.05, "decay_steps": 2, "decay_rate": 0.8}, "registered_name": None}
    _, a = coordinator.create(
        "async", {"learning_rate": lr, "use_ema": True, "ema_overwrite_frequency": 3,
                  "gradient_accumulation_steps": 2, "weight_decay": 0.01}, Policy()
    )
    a.exclude_from_weight_decay(["bias"], ["emb"])
    a.build(list(VALUES.items()))
    for step in range(5):
        push(a, "w0", f"r{step}", step, grads_for(step))
    _, s = coordinator.create("sync", {"learning_rate": 0.01}, Policy(mode="sync", num_workers=2))
    s.build(list(VALUES.items()))
    push(s, "w0", "s0", 0, grads_for(0))
    push(s, "w1", "s1", 0, grads_for(0, 1))
    sparse = [("emb", RowSparseGradient(np.array([0, 3, 3]), np.ones((3, 2)))), ("bias", None), ("dense", grads_for(1)[0][1])]
    push(s, "w0", "s2", 1, sparse)  # round for version 1 is open
    return coordinator


def assert_same_snapshot(a, b) -> None:
    assert (a.key, a.config, a.initial_config, a.policy, a.exclusions, a.built) == (
        b.key, b.config, b.initial_config, b.policy, b.exclusions, b.built)
    assert (a.version, a.iterations, a.dedup, a.workers, a.last_closed) == (b.version, b.iterations, b.dedup, b.workers, b.last_closed)
    for x, y in ((a.variables, b.variables), (a.store, b.store)):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and x[k].tobytes() == y[k].tobytes(), k
    assert [(c.worker_id, c.request_id, list(c.grads)) for c in a.round] == [
        (c.worker_id, c.request_id, list(c.grads)) for c in b.round]
    for ca, cb in zip(a.round, b.round):
        for n in ca.grads:
            ga, gb = ca.grads[n], cb.grads[n]
            if ga is None:
                assert gb is None
            else:
                for x, y in zip(ga if isinstance(ga, tuple) else (ga,), gb if isinstance(gb, tuple) else (gb,)):
                    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture()
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(populated_coordinator(), CheckpointStore(tmp_path / "ckpts"), CheckpointPolicy(keep=3))


# ---------------------------------------------------------------------- round trip


def test_round_trip_is_bit_identical_and_resumes_identically(manager: CheckpointManager, tmp_path: Path) -> None:
    info = manager.save_all(reason="test")
    assert info.checkpoint_id == "ckpt-00000001" and {o.key for o in info.optimizers} == {"async", "sync"}
    fresh = Coordinator(device="cpu")
    other = CheckpointManager(fresh, CheckpointStore(tmp_path / "ckpts"))
    used, restored = other.restore("latest")
    assert used == info.checkpoint_id
    assert {r.optimizer: r.version for r in restored} == {"async": 5, "sync": 1}
    for key in ("async", "sync"):
        assert_same_snapshot(manager.coordinator.get(key).snapshot(), fresh.get(key).snapshot())

    for coordinator in (manager.coordinator, fresh):
        a, s = coordinator.get("async"), coordinator.get("sync")
        assert push(a, "w0", "r4", 4, []).duplicate  # the exactly-once table survived
        assert push(s, "w0", "s2", 1, []).outcome == "accepted"
        assert push(s, "w1", "s3", 1, grads_for(1, 1)).outcome == "round_closed"  # the open round survived
        for step in range(5, 8):
            push(a, "w1", f"q{step}", step, grads_for(step, 2))
    for key in ("async", "sync"):
        assert_same_snapshot(manager.coordinator.get(key).snapshot(), fresh.get(key).snapshot())


def test_restore_into_a_running_optimizer_fences_in_flight_pushes(manager: CheckpointManager) -> None:
    host = manager.coordinator.get("async")
    manager.save_all()
    before = host.snapshot()
    push(host, "w0", "later", 5, grads_for(5))
    receiving, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def slow_receive(_staging=None):
        receiving.set()
        release.wait(5)
        return grads_for(6)

    def worker():
        try:
            outcome["result"] = host.push("w9", "inflight", 6, slow_receive)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=worker)
    thread.start()
    assert receiving.wait(5)
    _, restored = manager.restore("latest", ["async"])
    release.set()
    thread.join(5)
    assert isinstance(outcome.get("error"), StateRestored)
    assert restored[0].version == 7  # past the running version (6), so workers notice
    after = host.snapshot()
    assert after.variables["dense"].tobytes() == before.variables["dense"].tobytes()
    assert after.dedup == before.dedup and "later" not in dict(after.dedup["w0"])
    assert push(host, "w9", "inflight", 7, grads_for(6)).outcome == "applied"  # the retry applies once


def test_saving_does_not_stall_pushes(manager: CheckpointManager, monkeypatch) -> None:
    real_write = ckpt._write

    def slow_write(path, pieces):
        time.sleep(1.0)
        real_write(path, pieces)

    monkeypatch.setattr(ckpt, "_write", slow_write)
    saver = threading.Thread(target=manager.save_all)
    saver.start()
    time.sleep(0.1)
    host = manager.coordinator.get("async")
    start = time.perf_counter()
    push(host, "w0", "during-save", 5, grads_for(5))
    assert time.perf_counter() - start < 0.5
    saver.join()
    assert manager.store.list()[-1].optimizers[0].version == 5  # the snapshot predates the push


# ---------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("step,call", [("_mkdir", 1), ("_write", 1), ("_write", 3), ("_fsync_file", 2),
                                       ("_fsync_dir", 1), ("_rename", 1), ("_fsync_dir", 2)])
def test_a_crash_at_any_write_step_leaves_old_or_new_complete(manager: CheckpointManager, monkeypatch, step, call) -> None:
    first = manager.save_all()
    real = getattr(ckpt, step)
    calls = {"n": 0}

    class Crash(BaseException):
        pass

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash(step)
        return real(*args)

    monkeypatch.setattr(ckpt, step, crashing)
    push(manager.coordinator.get("async"), "w0", "x", 5, grads_for(5))
    with pytest.raises(Crash):
        manager.save_all()
    monkeypatch.setattr(ckpt, step, real)
    # The process "died": a new store over the same directory sees complete checkpoints only.
    reopened = CheckpointStore(manager.store.root)
    assert not [n for n in os.listdir(reopened.root) if n.startswith(".")]
    ids = reopened.ids()
    after_rename = step == "_fsync_dir" and call == 2
    assert ids == ([first.checkpoint_id, "ckpt-00000002"] if after_rename else [first.checkpoint_id])
    for checkpoint_id in ids:
        reopened.load(checkpoint_id)  # every listed checkpoint verifies
    expected_version = 6 if after_rename else 5
    assert {s.key: s.version for s in reopened.load("latest")}["async"] == expected_version


def test_leftover_temporaries_are_ignored_and_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".tmp-ckpt-00000009-abc").mkdir()
    (tmp_path / ".tmp-ckpt-00000009-abc" / "manifest.json").write_text("{}")
    store = CheckpointStore(tmp_path)
    assert store.ids() == [] and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- corruption


def _tensor_file(store: CheckpointStore, checkpoint_id: str) -> Path:
    return store.root / checkpoint_id / "opt-0.safetensors"


@pytest.mark.parametrize("damage", ["bit_flip_data", "bit_flip_header", "truncate", "manifest_edit", "missing_file"])
def test_corruption_is_detected_and_the_previous_checkpoint_is_used(manager: CheckpointManager, damage: str) -> None:
    good = manager.save_all()
    push(manager.coordinator.get("async"), "w0", "x", 5, grads_for(5))
    bad = manager.save_all()
    store = manager.store
    path = _tensor_file(store, bad.checkpoint_id)
    data = bytearray(path.read_bytes())
    if damage == "bit_flip_data":
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "bit_flip_header":
        data[20] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "manifest_edit":
        manifest = store.root / bad.checkpoint_id / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"version": 6', '"version": 7'))
    else:
        path.unlink()
    with pytest.raises(CheckpointCorrupt) as err:
        store.load(bad.checkpoint_id)
    assert err.value.code == "DATA_LOSS"
    used, snapshots = store.load_latest()
    assert used == good.checkpoint_id and {s.key: s.version for s in snapshots}["async"] == 5
    assert not store.info(bad.checkpoint_id, verify=True).valid


def test_a_newer_format_version_is_refused(manager: CheckpointManager) -> None:
    info = manager.save_all()
    path = manager.store.root / info.checkpoint_id / "manifest.json"
    manifest = ckpt.parse_manifest(path.read_bytes(), "t")
    manifest["format_version"] = 99
    path.write_bytes(ckpt.manifest_bytes(manifest))
    with pytest.raises(CheckpointCorrupt, match="format version 99"):
        manager.store.load(info.checkpoint_id)


# ---------------------------------------------------------------------- retention


def test_keep_k_leaves_exactly_k(manager: CheckpointManager) -> None:
    for _ in range(7):
        manager.save_all()
    assert manager.store.ids() == ["ckpt-00000005", "ckpt-00000006", "ckpt-00000007"]


def test_keep_every_mth_in_addition(manager: CheckpointManager) -> None:
    manager.policy = CheckpointPolicy(keep=2, keep_every=3)
    for _ in range(8):
        manager.save_all()
    assert manager.store.ids() == ["ckpt-00000003", "ckpt-00000006", "ckpt-00000007", "ckpt-00000008"]


def test_policy_thread_saves_every_n_steps(manager: CheckpointManager) -> None:
    manager.policy = CheckpointPolicy(every_steps=2, keep=100)
    manager.save_all()
    manager.start()
    try:
        host = manager.coordinator.get("async")
        for step in range(5, 9):
            push(host, "w0", f"p{step}", step, grads_for(step))
            time.sleep(0.08)
    finally:
        manager.stop()
    versions = [i.optimizers[0].version for i in manager.store.list()]
    assert versions[0] == 5 and 7 in versions and versions[-1] == 9


def test_every_n_steps_counts_steps_from_version_0(tmp_path: Path) -> None:
    """every_steps=3 on a job never saved: due at version 3 (not 2), then 3 steps after each save."""
    coordinator = Coordinator(device="cpu")
    _, host = coordinator.create("job", {"learning_rate": 0.01}, Policy())
    host.build(list(VALUES.items()))
    manager = CheckpointManager(coordinator, CheckpointStore(tmp_path / "ckpts"), CheckpointPolicy(every_steps=3))
    due = []
    for step in range(7):
        due.append((host.version, manager._due()))
        if due[-1][1]:
            manager.save_all()
        push(host, "w0", f"r{step}", step, grads_for(step))
    assert due == [(0, False), (1, False), (2, False), (3, True), (4, False), (5, False), (6, True)]
    # A new optimizer is a change of its own: a time policy saves it before its first step.
    seconds = CheckpointManager(coordinator, CheckpointStore(tmp_path / "other"), CheckpointPolicy(every_seconds=0.001))
    time.sleep(0.01)
    assert seconds._due()
    seconds.save_all()
    time.sleep(0.01)
    assert not seconds._due()  # nothing changed since
    coordinator.close()


@pytest.mark.parametrize("bad", [dict(every_steps=0), dict(every_seconds=-1.0), dict(keep=0), dict(keep_every=0)])
def test_policy_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match="must be"):
        CheckpointPolicy(**bad)


# ---------------------------------------------------------------------- safety


@pytest.mark.parametrize("checkpoint_id", ["../ckpt-00000001", "/etc", "ckpt-00000001/../x", "..", "", "ckpt-1",
                                           "ckpt-00000001/manifest.json", "C:\\x", "latest/.."])
def test_path_traversal_is_refused(manager: CheckpointManager, checkpoint_id: str) -> None:
    manager.save_all()
    with pytest.raises(InvalidArgument, match="paths are refused"):
        manager.store.load(checkpoint_id)


def test_symlinks_out_of_the_directory_are_refused(manager: CheckpointManager, tmp_path: Path) -> None:
    info = manager.save_all()
    outside = tmp_path / "outside"
    os.rename(manager.store.root / info.checkpoint_id, outside)
    os.symlink(outside, manager.store.root / "ckpt-00000002")
    with pytest.raises(InvalidArgument, match="symlinks are refused"):
        manager.store.load("ckpt-00000002")
    # A symlinked tensor file inside a real checkpoint directory is refused too.
    (manager.store.root / "ckpt-00000003").mkdir()
    for name in os.listdir(outside):
        os.symlink(outside / name, manager.store.root / "ckpt-00000003" / name)
    with pytest.raises(CheckpointCorrupt, match="not a regular file"):
        manager.store.load("ckpt-00000003")
    with pytest.raises(NotFound):
        manager.store.load("ckpt-00000042")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_is_refused_and_never_unpickled(manager: CheckpointManager, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    info = manager.save_all()
    store = manager.store
    path = _tensor_file(store, info.checkpoint_id)
    path.write_bytes(pickle.dumps({"var/0": _Boom()}))
    with pytest.raises(CheckpointCorrupt, match="not a readable safetensors file"):
        store.load(info.checkpoint_id)
    # A manifest pointing at a .pkl/.npy file (with a valid checksum) is refused by name.
    manifest_path = store.root / info.checkpoint_id / "manifest.json"
    manifest = ckpt.parse_manifest(manifest_path.read_bytes(), "t")
    manifest["optimizers"][0]["file"] = "state.pkl"
    manifest_path.write_bytes(ckpt.manifest_bytes(manifest))
    with pytest.raises(CheckpointCorrupt, match="refusing tensor file name"):
        store.load(info.checkpoint_id)
    assert not (tmp_path / "PWNED").exists()


def test_each_checkpoint_reaches_the_metrics(manager: CheckpointManager) -> None:
    from adamax_server.ops.metrics import ServerMetrics

    metrics = ServerMetrics()
    manager.on_saved = metrics.observe_checkpoint
    info = manager.save_all("manual")
    manager.save_all("manual")
    sample = metrics.registry.get_sample_value
    assert sample("adamax_ps_checkpoints_total") == 2
    assert sample("adamax_ps_checkpoint_bytes") == info.nbytes > 0
    assert sample("adamax_ps_checkpoint_seconds_count") == 2
