"""A live restore of a checkpoint that holds an open sync round (issue 12, item 5).

Semantics: a *live* restore (into a running optimizer) moves the version past both the running
and the saved one, so every worker pulls and recomputes; the saved round's contributions were
computed on weights nobody holds any more, so the restore drops them (their request ids are
forgotten too, so a retry is not answered "accepted" for a round that no longer exists). A
restore into a fresh server (crash-resume, ``serve --restore``) keeps the saved version and
the open round, as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _ps_helpers import running_server

from adamax_client import RemoteAdamax
from adamax_client.checkpoints import CheckpointClient
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.storage.checkpoint import CheckpointStore
from adamax_server.storage.checkpointing import CheckpointManager, CheckpointPolicy

VALUES = {"w": np.linspace(-1, 1, 6, dtype=np.float32), "b": np.zeros(2, np.float32)}


def _grads(worker: int, step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 * worker + step)
    return [rng.standard_normal(v.shape).astype(np.float32) for v in VALUES.values()]


def _loop_step(workers: list[RemoteAdamax]) -> list[str]:
    """One plain pull/compute/push step of every worker; returns the outcomes."""
    outcomes = []
    for i, opt in enumerate(workers):
        opt.pull()
        outcomes.append(opt.push(_grads(i, opt.version)).outcome)
    return outcomes


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_a_pull_compute_push_loop_keeps_working_across_a_live_restore_of_an_open_round(tmp_path: Path) -> None:
    coordinator = Coordinator(device="cpu")
    manager = CheckpointManager(coordinator, CheckpointStore(tmp_path / "ckpts"), CheckpointPolicy(keep=5))
    with running_server(coordinator=coordinator, checkpoints=manager) as (target, _):
        workers = [
            RemoteAdamax(target, name="s", worker_id=f"w{i}", mode="sync", num_workers=2, bulk="off", timeout=10)
            for i in range(2)
        ]
        try:
            workers[0].build(VALUES)
            workers[1].attach()
            assert _loop_step(workers) == ["accepted", "round_closed"]
            workers[0].pull()
            assert workers[0].push(_grads(0, 1)).outcome == "accepted"  # the round for version 1 is open
            with CheckpointClient(target) as checkpoints:
                saved = checkpoints.save("round open")
                workers[1].pull()
                assert workers[1].push(_grads(1, 1)).outcome == "round_closed"
                _, restored = checkpoints.restore(saved.checkpoint_id)
            host = coordinator.get("s")
            assert restored[0].version == host.version == 3  # past the running (2) and saved (1) version
            assert host.status().round_arrivals == []  # the saved round was dropped
            for _ in range(3):  # the plain loop goes on: pushes for the restored version are taken
                assert _loop_step(workers) == ["accepted", "round_closed"]
            assert host.version == 6
        finally:
            for opt in workers:
                opt.close()


def test_a_restore_into_a_fresh_server_keeps_the_open_round(tmp_path: Path) -> None:
    coordinator = Coordinator(device="cpu")
    manager = CheckpointManager(coordinator, CheckpointStore(tmp_path / "ckpts"))
    _, host = coordinator.create("s", {"learning_rate": 0.01}, Policy(mode="sync", num_workers=2))
    host.build(list(VALUES.items()))
    host.push("w0", "r0", 0, lambda _s: list(zip(VALUES, _grads(0, 0))), timeout=5)
    manager.save_all()
    fresh = Coordinator(device="cpu")
    CheckpointManager(fresh, CheckpointStore(tmp_path / "ckpts")).restore("latest")
    again = fresh.get("s")
    assert again.version == 0 and again.status().round_arrivals == ["w0"]
    assert again.push("w0", "r0", 0, lambda _s: [], timeout=5).duplicate  # the exactly-once answer survived
    assert again.push("w1", "r1", 0, lambda _s: list(zip(VALUES, _grads(1, 0))), timeout=5).outcome == "round_closed"
