"""The push decisions a single server and a sharded job's leader share (``coordination.sequencing``).

Both hosts decide through these objects; ``test_sharding_job`` checks that their outcomes,
details and errors agree for 1 and 3 shards. Here each decision is pinned down on its own,
and the source is checked for a second copy of the round logic creeping back.
"""

from __future__ import annotations

import ast
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from adamax_server.coordination.dedup import DedupTable
from adamax_server.coordination.policy import Policy, PushResult
from adamax_server.coordination.sequencing import SyncRound, check_step, non_finite_outcome
from adamax_server.errors import FailedPrecondition, InvalidArgument, StaleGradient, StateRestored

SERVER = Path(__file__).resolve().parents[2] / "server" / "adamax_server"


@dataclass
class Entry:
    request_id: str


class Owner:
    """A minimal owner: its lock, its policy, and what the timer asked it to do."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.lock = threading.Condition()
        self.fired: list[tuple[str, bool]] = []
        self.event = threading.Event()
        self.closed = False
        self.round: SyncRound[Entry] = SyncRound("job", lambda: self.policy, self.lock, self._on_timeout, lambda: self.closed)

    def _on_timeout(self, why: str, close: bool) -> None:
        assert self.lock._is_owned()  # noqa: SLF001 - the timer calls back under the owner's lock
        self.fired.append((why, close))
        self.event.set()


def test_check_step_refuses_what_the_job_cannot_take():
    sync, stale = Policy(mode="sync", num_workers=2), Policy(mode="async", max_staleness=2)
    check_step("job", stale, 10, 8)  # 2 versions old: allowed
    check_step("job", sync, 10, 3)  # staleness is an async limit (sync has late pushes)
    with pytest.raises(StaleGradient, match="3 versions old; max_staleness is 2") as info:
        check_step("job", stale, 10, 7)
    assert info.value.current_version == 10
    with pytest.raises(FailedPrecondition, match="step 11 is ahead of the current version 10"):
        check_step("job", stale, 10, 11)
    with pytest.raises(InvalidArgument, match="must be >= 0"):
        check_step("job", stale, 10, -1)
    # After a restore took the job from 15 back to 10: 11..15 were computed on taken-back weights.
    with pytest.raises(StateRestored, match="restored on every shard to version 10; gradient step 15"):
        check_step("job", stale, 10, 15, (15, 10), where=" on every shard")
    with pytest.raises(FailedPrecondition, match="ahead"):
        check_step("job", stale, 10, 16, (15, 10))


def test_non_finite_outcome_rejects_or_skips():
    with pytest.raises(InvalidArgument, match="non-finite"):
        non_finite_outcome(Policy(), {"w": 2}, 4, 4)
    skipped = non_finite_outcome(Policy(non_finite="skip"), {"w": 2}, 4, 4)
    assert (skipped.outcome, skipped.version, skipped.iterations) == ("skipped_non_finite", 4, 4)
    assert "w" in skipped.detail


def test_k_of_n_one_push_per_worker_and_late_pushes():
    owner = Owner(Policy(mode="sync", num_workers=3, min_workers=2))
    rnd = owner.round
    with owner.lock:
        assert rnd.late(5, 5, 5) is None
        assert rnd.join("w1", Entry("a"), 5, 5) is False
        assert rnd.accepted(5, 5, 5) == PushResult("accepted", 5, 5, detail="1 of 2 workers have pushed for version 5")
        with pytest.raises(FailedPrecondition, match="worker 'w1' already pushed a gradient for version 5 \\(request 'a'\\)"):
            rnd.join("w1", Entry("b"), 5, 5)
        with pytest.raises(FailedPrecondition, match="sync round for version 5 is open \\(\\['w1'\\] pushed\\)"):
            rnd.require_empty(5)
        assert rnd.join("w0", Entry("c"), 5, 5) is True  # K = 2
        assert rnd.keys() == [("w0", "c"), ("w1", "a")]  # worker-id order, the order sums are taken in
        assert rnd.quorum_reason() == "closed by 2 of 3 workers"
        entries = rnd.closed("round for version 5 closed by 2 of 3 workers")
        assert sorted(entries) == ["w0", "w1"] and len(rnd) == 0
        rnd.require_empty(6)
        late = rnd.late(5, 6, 6)
    assert late is not None and late.outcome == "dropped_late"
    assert "round for version 5 closed by 2 of 3 workers" in late.detail and "Current version is 6" in late.detail


@pytest.mark.parametrize("policy", ["close", "abort"])
def test_the_timer_calls_back_under_the_lock_with_the_policy(policy):
    owner = Owner(Policy(mode="sync", num_workers=3, round_timeout=0.05, round_timeout_policy=policy))
    with owner.lock:
        owner.round.join("w2", Entry("a"), 0, 0)
        owner.round.join("w0", Entry("b"), 0, 0)  # the second push does not restart the timer
    assert owner.event.wait(5.0)
    (why, close), = owner.fired
    assert close is (policy == "close")
    assert why == "timed out after 0.05s with 2 of 3 workers (w0, w2)"


def test_a_reset_round_or_a_closed_owner_ignores_its_timer():
    owner = Owner(Policy(mode="sync", num_workers=2, round_timeout=0.05))
    with owner.lock:
        owner.round.join("w0", Entry("a"), 0, 0)
        owner.round.reset()  # e.g. closed by a push just before the timer fired
        owner.round.join("w1", Entry("b"), 1, 1)  # a new round, a new timer
        owner.closed = True  # ... but the owner is shutting down
    assert not owner.event.wait(0.3)
    assert owner.fired == []


def test_abort_forgets_the_request_ids_and_wakes_waiters():
    owner = Owner(Policy(mode="sync", num_workers=3))
    dedup = DedupTable(8)
    with owner.lock:
        for worker, request in (("w0", "a"), ("w1", "b")):
            dedup.begin(worker, request)
            dedup.finish(worker, request, PushResult("accepted", 0, 0))
            owner.round.join(worker, Entry(request), 0, 0)
        aborts = owner.round.aborts
        dropped = owner.round.abort("round for version 0 was aborted: test", dedup)
    assert sorted(dropped) == ["w0", "w1"]
    assert dedup.get("w0", "a") is None and dedup.get("w1", "b") is None  # a retry joins the next round
    assert owner.round.aborts == aborts + 1 and owner.round.last_abort.endswith("aborted: test")


def test_an_adopted_round_starts_its_timer_again():
    owner = Owner(Policy(mode="sync", num_workers=3, round_timeout=0.05))
    with owner.lock:
        owner.round.adopt({"w1": Entry("a")}, "round for version 3 closed by 3 of 3 workers", "")
        assert owner.round.arrivals() == ["w1"] and owner.round.last_closed.startswith("round for version 3")
    assert owner.event.wait(5.0)
    assert owner.fired[0][0].endswith("with 1 of 3 workers (w1)")


def test_one_copy_of_the_round_logic():
    """A server's optimizer is a one-shard job, so every push is decided by the leader through
    ``sequencing``; no other module keeps a round timer or a step check of its own (a second
    copy would drift, as it once did)."""
    from adamax_server.coordination.policy import Policy
    from adamax_server.sharding.coordinator import Coordinator
    from adamax_server.sharding.leader import Leader
    from adamax_server.sharding.shard import ShardHost

    for path in sorted(SERVER.rglob("*.py")):
        if path.name == "sequencing.py":
            continue
        source = path.read_text()
        assert "threading.Timer" not in source, path
        assert "one push per worker per round" not in source, path
        assert "versions old; max_staleness" not in source, path
    leader = SERVER / "sharding" / "leader.py"
    tree = ast.parse(leader.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "adamax_server.coordination.sequencing" for a in n.names}
    assert {"SyncRound", "check_step"} <= imported
    coordinator = Coordinator(device="cpu")
    try:
        _, host = coordinator.create("m", {"learning_rate": 0.01}, Policy(mode="sync", num_workers=2))
        assert isinstance(host._shard, ShardHost) and isinstance(host._leader, Leader)
        assert [link.host for link in host._leader.links] == [host._shard]  # the job's only shard
        assert host._shard.num_shards == 1
    finally:
        coordinator.close()


