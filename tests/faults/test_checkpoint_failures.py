"""Automatic checkpoints on a disk that fails (issue 12, item 9), and where /metrics listens (item 10).

A failing checkpoint directory is retried with exponential backoff (not every 20 ms), the error
is logged once per change, and the failure shows in the metrics and in ``adamax-ps status``
while health stays SERVING. An unusable directory is refused at start-up with its name.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _ps_helpers import REPO_ROOT

from adamax_server.cli.status_view import format_summary, summarize
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.errors import FailedPrecondition
from adamax_server.ops.metrics import ServerMetrics
from adamax_server.storage.checkpoint import CheckpointStore
from adamax_server.storage.checkpointing import CheckpointManager, CheckpointPolicy
from prometheus_client import generate_latest


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO_ROOT / p) for p in ("server", "client", "wire"))
    for name in [n for n in env if n.startswith("ADAMAX_PS_")]:
        del env[name]
    return env


def _stepping_host(coordinator: Coordinator):
    _, host = coordinator.create("m", {"learning_rate": 0.01}, Policy())
    host.build([("w", np.zeros(4, np.float32))])
    return host


def _step(host, i: int) -> None:
    host.push("w0", f"r{i}", host.version, lambda _s: [("w", np.ones(4, np.float32))], timeout=5)


def test_failing_automatic_checkpoints_back_off_log_once_and_show_in_metrics(tmp_path: Path, caplog) -> None:
    coordinator = Coordinator(device="cpu")
    host = _stepping_host(coordinator)
    root = tmp_path / "ckpts"
    policy = CheckpointPolicy(every_steps=1, retry_initial=0.2, retry_max=0.4)
    manager = CheckpointManager(coordinator, CheckpointStore(root), policy)
    metrics = ServerMetrics()
    manager.on_saved, manager.on_failed = metrics.observe_checkpoint, metrics.observe_checkpoint_failure
    attempts = []
    write = manager.store.write

    def counting_write(*args, **kwargs):
        attempts.append(time.monotonic())
        return write(*args, **kwargs)

    manager.store.write = counting_write
    # The directory becomes unusable (a file where it was): every write fails with ENOTDIR.
    shutil.rmtree(root)
    root.write_text("not a directory")
    caplog.set_level(logging.DEBUG, logger="adamax_server.storage.checkpointing")
    manager.start()
    try:
        started = time.monotonic()
        for i in range(20):  # progress keeps coming, so a checkpoint is always due
            _step(host, i)
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        manager.retry_at = time.monotonic() + 1000  # hold the retries while we look
        time.sleep(0.3)
        failures = len(attempts)
        # About 2 s of failures 0.2, 0.4, 0.4, ... s apart: a handful, not one per 20 ms poll.
        assert 3 <= failures <= 3 + elapsed / 0.4, (failures, elapsed)
        assert manager.consecutive_failures == failures
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1 and str(root) in errors[0].getMessage(), [r.getMessage() for r in errors]
        summary = summarize(generate_latest(metrics.registry).decode())
        assert summary["checkpoint_failures"] == failures
        assert "NotADirectoryError" in summary["checkpoint_last_error"]
        assert f"CHECKPOINTS FAILING: {failures} in a row" in format_summary(summary)

        root.unlink()  # the disk is fixed: the next retry succeeds and the failure state clears
        root.mkdir()
        manager.retry_at = 0.0
        deadline = time.monotonic() + 5
        while manager.consecutive_failures and time.monotonic() < deadline:
            _step(host, 100 + len(attempts))
            time.sleep(0.05)
        assert manager.consecutive_failures == 0 and manager.last_error == ""
        assert manager.store.ids(), "no checkpoint written after the directory came back"
        summary = summarize(generate_latest(metrics.registry).decode())
        assert summary["checkpoint_failures"] == 0 and summary["checkpoint_last_error"] == ""
        assert any("work again" in r.getMessage() for r in caplog.records)
    finally:
        manager.stop()


@pytest.mark.parametrize("make", ["file", "under_file"])
def test_an_unusable_checkpoint_directory_is_refused_with_its_name(tmp_path: Path, make: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    root = blocker if make == "file" else blocker / "ckpts"
    with pytest.raises(FailedPrecondition, match="checkpoint directory") as info:
        CheckpointStore(root)
    assert str(root) in str(info.value)
    proc = subprocess.run(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "cpu",
         "--checkpoint-dir", str(root), "--checkpoint-every-steps", "1"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert proc.returncode == 2
    assert f"checkpoint directory '{root}'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on ``port`` (from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            out.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
@pytest.mark.parametrize("metrics_host", [None, "0.0.0.0"])
def test_metrics_listen_on_the_serve_host_unless_told_otherwise(metrics_host: str | None) -> None:
    flags = ["--metrics-host", metrics_host] if metrics_host else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
         "--no-bulk", "--metrics-port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while not line.startswith("metrics on") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        host, port = line.split()[-1].rsplit(":", 1)
        assert host == (metrics_host or "127.0.0.1")
        assert _listening_addresses(int(port)) == {metrics_host or "127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_opening_a_directory_does_not_remove_a_live_servers_write_in_progress(tmp_path: Path) -> None:
    """With backoff, a checkpoint lost this way is not retried for a while: another process
    opening the directory (``checkpoint list --dir``, a test) must leave a live writer's
    temporary alone, and still clean up what dead writers left."""
    CheckpointStore(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (tmp_path / f".tmp-ckpt-00000001-aaaa-p{live.pid}").mkdir()
        (tmp_path / f".tmp-ckpt-00000002-bbbb-p{int(dead.stdout)}").mkdir()
        (tmp_path / f".del-ckpt-00000003-cccc-p{os.getpid()}").mkdir()  # ours: a leftover
        CheckpointStore(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-ckpt-00000001-aaaa-p{live.pid}"]
    finally:
        live.kill()
        live.wait()
