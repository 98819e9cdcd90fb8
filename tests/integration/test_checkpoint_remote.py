"""Checkpoints through a real server: kill -9 and resume, SIGTERM's final checkpoint, the
``adamax-ps checkpoint`` command, and streaming a multi-hundred-MB state in and out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _ps_helpers import REPO_ROOT, assert_bitwise_equal, running_server

from adamax_client import RemoteAdamax
from adamax_client.checkpoints import CheckpointClient
from adamax_client.errors import DataLossError, InvalidArgumentError
from adamax_server.cli import commands as cli
from adamax_server.storage.checkpoint import CheckpointStore
from adamax_server.storage.checkpointing import CheckpointManager, CheckpointPolicy
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.optim.engine import Adamax

VALUES = {
    "kernel": np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4),
    "bias": np.zeros(4, np.float32),
}
CONFIG = dict(learning_rate=0.01, use_ema=True, ema_overwrite_frequency=4, gradient_accumulation_steps=2)


def grads(i: int) -> list[np.ndarray]:
    rng = np.random.default_rng(i)
    return [rng.standard_normal(v.shape).astype(v.dtype) for v in VALUES.values()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "server"), str(REPO_ROOT / "client"), str(REPO_ROOT / "wire"), env.get("PYTHONPATH", "")])
    return env


def _serve(*flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "cpu", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"server exited: {proc.stderr.read()}"
        lines.append(line.strip())
        if line.startswith("listening on "):
            return proc, line.split()[-1], lines


def _reference(config: dict, steps: range, snapshot=None) -> Adamax:
    """The in-process engine: fresh, or restored from a checkpoint, then ``steps`` applied."""
    if snapshot is None:
        engine = Adamax.from_config({"name": "job", **config}, device="cpu")
        engine.build(VALUES)
    else:
        engine = Adamax.from_config(snapshot.config, device="cpu")
        exclusions = snapshot.exclusions
        if exclusions.get("var_list") or exclusions.get("var_names"):
            engine.exclude_from_weight_decay(var_list=exclusions.get("var_list") or None,
                                             var_names=exclusions.get("var_names") or None)  # fmt: skip
        engine.build(dict(snapshot.variables))
        engine.load_own_variables(snapshot.store)
    for i in steps:
        engine.apply(grads(i))
    return engine


def _assert_same_state(remote: RemoteAdamax, engine: Adamax) -> None:
    for name, value in remote.pull(min_version=0).items():
        assert_bitwise_equal(value, engine.trainable_variables[name])
    store: dict = {}
    remote.save_own_variables(store)
    expected: dict = {}
    engine.save_own_variables(expected)
    assert list(store) == list(expected)
    for key in store:
        assert_bitwise_equal(store[key], expected[key])


def test_kill_9_then_restore_latest_resumes_bit_identically(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpts"
    flags = ("--checkpoint-dir", str(ckpt_dir), "--checkpoint-every-steps", "3", "--keep", "3")
    proc, target, _ = _serve(*flags)
    try:
        with RemoteAdamax(target, worker_id="w0", name="job", **CONFIG) as remote:
            remote.build(VALUES)
            for i in range(10):
                remote.push(grads(i), step=i, request_id=f"r{i}")
            deadline = time.monotonic() + 10
            while not CheckpointStore(ckpt_dir).ids() and time.monotonic() < deadline:
                time.sleep(0.02)
            for i in range(10, 14):  # keep training while the checkpointer writes
                remote.push(grads(i), step=i, request_id=f"r{i}")
    finally:
        proc.kill()  # SIGKILL: no final checkpoint, possibly in the middle of a write
        proc.wait(10)
    assert len(CheckpointStore(ckpt_dir).ids()) <= 3

    proc, target, lines = _serve(*flags, "--restore", "latest")
    try:
        restored = [line for line in lines if line.startswith("restored ")]
        assert restored, lines
        checkpoint_id = restored[0].split()[1].rstrip(":")
        version = int(restored[0].rsplit("@", 1)[1])
        assert 3 <= version <= 14
        snapshot = {s.key: s for s in CheckpointStore(ckpt_dir).load(checkpoint_id)}["job"]
        with RemoteAdamax(target, worker_id="w0", name="job", **CONFIG) as remote:
            assert remote.attach() and remote.version == version
            again = remote.push(grads(version - 1), step=version - 1, request_id=f"r{version - 1}")
            assert again.duplicate  # the exactly-once table survived the crash
            for i in range(version, 18):
                remote.push(grads(i), step=i, request_id=f"r{i}")
            _assert_same_state(remote, _reference(CONFIG, range(version, 18), snapshot))
            _assert_same_state(remote, _reference(CONFIG, range(18)))  # = the uninterrupted run
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    # SIGTERM wrote a final checkpoint with the last version.
    latest = CheckpointStore(ckpt_dir).list()[-1]
    assert latest.reason == "shutdown" and latest.optimizers[0].version == 18


def test_checkpoint_command(tmp_path: Path, capsys) -> None:
    coordinator = Coordinator(device="cpu")
    manager = CheckpointManager(coordinator, CheckpointStore(tmp_path / "server"), CheckpointPolicy(keep=10))
    with running_server(coordinator=coordinator, checkpoints=manager) as (target, _):
        with RemoteAdamax(target, worker_id="w0", name="job", **CONFIG) as remote:
            remote.build(VALUES)
            for i in range(3):
                remote.push(grads(i), step=i, request_id=f"r{i}")
            common = ["--target", target]
            assert cli.main(["checkpoint", "save", *common, "--reason", "test"]) == 0
            assert "saved ckpt-00000001" in capsys.readouterr().out
            for i in range(3, 5):
                remote.push(grads(i), step=i, request_id=f"r{i}")
            assert cli.main(["checkpoint", "list", *common]) == 0
            assert "ckpt-00000001" in capsys.readouterr().out
            assert cli.main(["checkpoint", "inspect", "ckpt-00000001", "--verify", *common]) == 0
            assert "job@3" in capsys.readouterr().out
            assert cli.main(["checkpoint", "restore", "ckpt-00000001", *common]) == 0
            assert "job -> version 6" in capsys.readouterr().out  # past the running version 5
            _assert_same_state(remote, _reference(CONFIG, range(3)))
            assert remote.pull() is not None and remote.version == 6  # workers see the new version

            # download (stored and live) to a local directory, upload back with restore
            local = tmp_path / "local"
            assert cli.main(["checkpoint", "download", "ckpt-00000001", "--output", str(local), *common]) == 0
            assert cli.main(["checkpoint", "download", "--output", str(local), *common]) == 0
            out, err = capsys.readouterr()
            assert "downloaded live" in out and "MB" in err
            assert CheckpointStore(local).ids() == ["ckpt-00000001", "ckpt-00000002"]
            remote.push(grads(3), step=6, request_id="after")
            assert cli.main(["checkpoint", "upload", "--input", str(local), "--id", "ckpt-00000001",
                             "--restore", *common]) == 0
            assert "restored job -> version 8" in capsys.readouterr().out
            _assert_same_state(remote, _reference(CONFIG, range(3)))

            # refused ids and corrupt checkpoints come back as clear errors
            with CheckpointClient(target) as client:
                with pytest.raises(InvalidArgumentError, match="paths are refused"):
                    client.restore("../server/ckpt-00000001")
                path = tmp_path / "server" / "ckpt-00000001" / "opt-0.safetensors"
                data = bytearray(path.read_bytes())
                data[-3] ^= 0x40
                path.write_bytes(bytes(data))
                with pytest.raises(DataLossError, match="sha256"):
                    client.restore("ckpt-00000001")
            assert cli.main(["checkpoint", "inspect", "ckpt-00000001", "--verify", *common]) == 1
            assert "CORRUPT" in capsys.readouterr().out


def test_stream_a_256_mb_state_out_and_in(tmp_path: Path) -> None:
    big = {"a": np.ones(10_000_000, np.float32), "b": np.full((1_000, 6_777), 0.5, np.float32)}  # 67 MB of weights
    coordinator = Coordinator(device="cpu")
    manager = CheckpointManager(coordinator, CheckpointStore(tmp_path / "server"), CheckpointPolicy(keep=2))
    _, host = coordinator.create("big", {"learning_rate": 0.01, "use_ema": True}, Policy())
    host.build(list(big.items()))
    host.push("w0", "r0", 0, lambda _staging: [(n, np.full(v.shape, 0.25, v.dtype)) for n, v in big.items()])
    with running_server(coordinator=coordinator, checkpoints=manager) as (target, _):
        with CheckpointClient(target, chunk_bytes=4 << 20) as client:
            start = time.perf_counter()
            info = client.save()
            write_s = time.perf_counter() - start
            assert info.nbytes > 256e6, info.nbytes  # weights + m + u + EMA averages
            start = time.perf_counter()
            manager.store.read(info.checkpoint_id)
            read_s = time.perf_counter() - start
            seen = []
            start = time.perf_counter()
            source, manifest, files = client.download(info.checkpoint_id, progress=lambda d, t: seen.append((d, t)))
            download_s = time.perf_counter() - start
            assert source == info.checkpoint_id and seen[-1][0] == seen[-1][1] == info.nbytes
            host.push("w0", "r1", 1, lambda _staging: [(n, np.full(v.shape, -1.0, v.dtype)) for n, v in big.items()])
            start = time.perf_counter()
            saved, restored = client.upload(manifest, files, save=True, restore=True)
            upload_s = time.perf_counter() - start
            assert saved is not None and restored[0].version == 3 and restored[0].iterations == 1
        weights = host.snapshot().variables
        for name, array in files["opt-0.safetensors"].items():
            if name.startswith("var/"):
                assert_bitwise_equal(weights[list(big)[int(name[4:])]], array)
    mb = info.nbytes / 1e6
    print(f"\n{mb:.0f} MB state: save {mb / write_s:.0f} MB/s, verified read {mb / read_s:.0f} MB/s, "
          f"download {mb / download_s:.0f} MB/s, upload+save+restore {mb / upload_s:.0f} MB/s")
