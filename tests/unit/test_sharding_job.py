"""A sharded job (in process) against a single server: identical weights, stores, outcomes and errors.

The same calls go to a single-server ``OptimizerHost`` and to ``ShardedJob``s of 1 and 3 shards
whose placement splits the big variables over several shards (small minimum piece size), for
every clipping kind, EMA, accumulation, loss scaling, None gradients, row-sparse gradients,
mixed dtypes, async and sync rounds.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from _sharding_helpers import MIN_PIECE, compare as _compare, grads_ as _grads, values_ as _values
from adamax_server.coordination.policy import Policy
from adamax_server.errors import FailedPrecondition, StaleGradient
from adamax_server.sharding.job import ShardedJob

CONFIGS = [
    {"learning_rate": 0.01},
    {"learning_rate": 0.01, "clipnorm": 0.3},
    {"learning_rate": 0.01, "global_clipnorm": 0.5},
    {"learning_rate": 0.01, "clipvalue": 0.05},
    {"learning_rate": 0.01, "use_ema": True, "ema_overwrite_frequency": 3, "weight_decay": 0.01},
    {"learning_rate": 0.01, "gradient_accumulation_steps": 2, "clipnorm": 0.4, "loss_scale_factor": 4.0},
    {"learning_rate": 0.01, "gradient_accumulation_steps": 3, "global_clipnorm": 0.2, "use_ema": True},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(k for k in c if k != "learning_rate") or "plain")
def test_async_congruence(config):
    def script(t, call):
        rng = np.random.default_rng(1)
        values = _values(rng)
        t.build(values)
        for k in range(7):
            grads = _grads(rng, values, none=("b",) if k == 2 else (), sparse=k % 3 == 1, scale=10.0 if k == 4 else 1.0)
            call(t.push, "w0", f"r{k}", k, grads)
        call(t.push, "w0", "r3", 3, grads)  # a retry: answered from the exactly-once table
        call(t.push, "w0", "ahead", 99, grads)  # ahead of the version
        call(t.push, "w0", "none", 7, {n: None for n in values})  # no gradient at all

    _compare(config, Policy(mode="async"), script)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=["plain", "clipnorm", "global"])
def test_async_max_staleness_and_non_finite(config):
    def script(t, call):
        rng = np.random.default_rng(2)
        values = _values(rng)
        t.build(values)
        call(t.push, "w0", "a", 0, _grads(rng, values))
        call(t.push, "w0", "b", 1, _grads(rng, values))
        call(t.push, "w1", "c", 0, _grads(rng, values))  # 2 versions old, limit 1
        bad = _grads(rng, values)
        bad["emb"][599, 3] = np.nan
        call(t.push, "w1", "d", 2, bad)

    _compare(config, Policy(mode="async", max_staleness=1), script)
    _compare(config, Policy(mode="async", non_finite="skip"), script)


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("config", CONFIGS[:3] + CONFIGS[5:6], ids=["plain", "clipnorm", "global", "acc"])
def test_sync_congruence(config, aggregation):
    def script(t, call):
        rng = np.random.default_rng(3)
        values = _values(rng)
        t.build(values)
        version = 0
        for rnd in range(4):
            order = ["w2", "w0", "w1"] if rnd % 2 else ["w1", "w2", "w0"]
            for j, w in enumerate(order):
                grads = _grads(rng, values, none=("d",) if w == "w1" else (), sparse=(w == "w2"))
                call(t.push, w, f"{w}-{rnd}", version, grads)  # the third is late (K=2)
            call(t.push, order[0], f"{order[0]}-{rnd}", version, grads)  # retry of an accepted push
            version += 1

    _compare(config, Policy(mode="sync", num_workers=3, min_workers=2, aggregation=aggregation), script)


def test_sync_non_finite_reject_and_skip():
    def script(t, call):
        rng = np.random.default_rng(4)
        values = _values(rng)
        t.build(values)
        bad = _grads(rng, values)
        bad["w"][63, 63] = np.inf
        call(t.push, "w0", "a", 0, bad)
        call(t.push, "w0", "b", 0, _grads(rng, values))
        call(t.push, "w1", "c", 0, _grads(rng, values))
        call(t.push, "w1", "c2", 0, _grads(rng, values))  # second push in one round

    _compare({"learning_rate": 0.01}, Policy(mode="sync", num_workers=2), script)
    _compare({"learning_rate": 0.01}, Policy(mode="sync", num_workers=2, non_finite="skip"), script)


def test_sync_overflowing_sum_is_skipped_but_counts_a_version():
    def script(t, call):
        rng = np.random.default_rng(5)
        values = _values(rng)
        t.build(values)
        big = {n: np.full(np.shape(v), np.finfo(v.dtype).max, dtype=v.dtype) for n, v in values.items()}
        call(t.push, "w0", "a", 0, big)
        call(t.push, "w1", "b", 0, big)
        call(t.push, "w0", "c", 1, _grads(rng, values))
        call(t.push, "w1", "d", 1, {n: None for n in values})

    _compare({"learning_rate": 0.01}, Policy(mode="sync", num_workers=2, aggregation="sum", non_finite="skip"), script)


def test_placement_really_splits():
    job = ShardedJob("job", {"learning_rate": 0.1}, Policy(), 3, device="numba", min_piece_bytes=MIN_PIECE)
    try:
        job.build(_values(np.random.default_rng(0)))
        split = {v.name: [p.shard for p in v.pieces] for v in job.placement.variables if v.split}
        assert "emb" in split and len(split["emb"]) >= 2
    finally:
        job.close()


@pytest.mark.parametrize("timeout_policy", ["close", "abort"])
def test_round_timeout_is_one_decision_for_the_job(timeout_policy):
    """A round the leader's timer closes (or aborts) ends the same way as on a single server."""
    import time

    from _sharding_helpers import Sharded, Single

    policy = Policy(mode="sync", num_workers=3, round_timeout=0.3, round_timeout_policy=timeout_policy)
    rng = np.random.default_rng(9)
    values = _values(rng)
    grads = [_grads(rng, values, sparse=w == 1) for w in range(2)]
    outcomes = []
    for target in (Single({"learning_rate": 0.01, "clipnorm": 0.5}, policy), Sharded({"learning_rate": 0.01, "clipnorm": 0.5}, policy, 3)):
        try:
            target.build(values)
            for w in range(2):
                target.push(f"w{w}", "a", 0, grads[w])
            deadline = time.monotonic() + 5
            if timeout_policy == "close":
                while target.pull()[0] < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
            else:
                time.sleep(0.6)
            version, iterations, weights = target.pull()
            late = target.push("w2", "a", 0, grads[0])
            outcomes.append((version, iterations, {n: a.tobytes() for n, a in weights.items()}, late.outcome))
        finally:
            target.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == (1 if timeout_policy == "close" else 0)


def _staged_everywhere(job, expected, within=5.0):
    """Every shard's staged pushes become ``expected`` (the leader drops them without waiting)."""
    deadline = time.monotonic() + within
    while any(h.staged_keys() != expected for h in job.hosts):
        assert time.monotonic() < deadline, [h.staged_keys() for h in job.hosts]
        time.sleep(0.01)


def test_a_retry_of_a_decided_push_leaves_no_staged_copy():
    job = ShardedJob("job", {"learning_rate": 0.1}, Policy(), 3, device="numba", min_piece_bytes=MIN_PIECE)
    try:
        rng = np.random.default_rng(0)
        values = _values(rng)
        job.build(values)
        g = _grads(rng, values)
        job.push("w", "r", 0, g)
        assert job.push("w", "r", 0, g).duplicate
        _staged_everywhere(job, [])
    finally:
        job.close()


def test_a_push_refused_for_good_leaves_nothing_staged_on_any_shard():
    """Stale, ahead, a second push in the round, no gradient at all: the job will never take the
    push, so its slices are freed on every shard at once instead of held until the staging TTL
    (a worker retrying stale pushes would otherwise pile up a gradient copy per push)."""
    rng = np.random.default_rng(4)
    values = _values(rng)
    job = ShardedJob("job", {"learning_rate": 0.1}, Policy(max_staleness=1), 3, device="numba", min_piece_bytes=MIN_PIECE)
    try:
        job.build(values)
        for k in range(3):
            job.push("w", f"r{k}", k, _grads(rng, values))
        with pytest.raises(StaleGradient):
            job.push("w", "stale", 0, _grads(rng, values))
        _staged_everywhere(job, [])
        with pytest.raises(FailedPrecondition, match="ahead"):
            job.push("w", "ahead", 9, _grads(rng, values))
        _staged_everywhere(job, [])
        with pytest.raises(ValueError, match="No gradients"):
            job.push("w", "none", 3, {n: None for n in values})
        _staged_everywhere(job, [])
        assert job.push("w", "r3", 3, _grads(rng, values)).outcome == "applied"
    finally:
        job.close()
    job = ShardedJob("job", {"learning_rate": 0.1}, Policy(mode="sync", num_workers=2), 3, device="numba",
                     min_piece_bytes=MIN_PIECE)  # fmt: skip
    try:
        job.build(values)
        assert job.push("a", "a0", 0, _grads(rng, values)).outcome == "accepted"
        with pytest.raises(FailedPrecondition, match="one push per worker per round"):
            job.push("a", "a0-again", 0, _grads(rng, values))
        _staged_everywhere(job, [("a", "a0")])  # the round's push stays; the refused one is gone
        assert job.push("b", "b0", 0, _grads(rng, values)).outcome == "round_closed"
        _staged_everywhere(job, [])
    finally:
        job.close()


def test_drops_on_a_hung_shard_never_hold_up_the_jobs_calls(monkeypatch):
    """Refused pushes are dropped on the other shards from a pool of their own, at most 64
    waiting: a shard whose drop hangs delays no prepare or commit of the job's next push."""
    rng = np.random.default_rng(6)
    values = _values(rng)
    job = ShardedJob("job", {"learning_rate": 0.1}, Policy(max_staleness=0), 3, device="numba", min_piece_bytes=MIN_PIECE)
    release, hung = threading.Event(), []
    try:
        job.build(values)
        job.push("w", "r0", 0, _grads(rng, values))
        real_drop = job.hosts[1].drop

        def hanging_drop(keys, abort_message=""):
            hung.append(keys)
            release.wait(30)
            return real_drop(keys, abort_message)

        monkeypatch.setattr(job.hosts[1], "drop", hanging_drop)
        for k in range(80):  # stale: refused, and dropped everywhere
            with pytest.raises(StaleGradient):
                job.push("w", f"stale{k}", 0, _grads(rng, values))
        done = []
        pusher = threading.Thread(target=lambda: done.append(job.push("w", "r1", 1, _grads(rng, values))))
        pusher.start()
        pusher.join(10)
        assert done and done[0].outcome == "applied", "the job's push waited behind the hung drops"
        assert len(hung) == 1  # shard 1's lane: one drop runs (hung), 63 wait, the other 16 were skipped
        deadline = time.monotonic() + 5  # the other shards' lanes dropped everything meanwhile
        while job.hosts[0].staged_keys() or job.hosts[2].staged_keys():
            assert time.monotonic() < deadline, (job.hosts[0].staged_keys(), job.hosts[2].staged_keys())
            time.sleep(0.01)
        release.set()
        deadline = time.monotonic() + 5
        while len(job.hosts[1].staged_keys()) > 16:  # the skipped ones expire after the staging TTL
            assert time.monotonic() < deadline, len(job.hosts[1].staged_keys())
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(job.hosts[1].staged_keys()) == 16 and len(hung) == 64
    finally:
        release.set()
        job.close()


def test_metrics_gauges_are_read_without_the_shard_lock():
    """What a stage reports to the metrics (bytes held, version, staged pushes) equals the
    shard's status and is read without its lock, so a stage's reply never waits for metrics
    behind a step that holds it."""
    import threading

    job = ShardedJob("job", {"learning_rate": 0.1}, Policy(), 3, device="numba", min_piece_bytes=MIN_PIECE)
    try:
        values = _values(np.random.default_rng(0))
        job.build(values)
        job.stage("w0", "r0", _grads(np.random.default_rng(1), values))
        for host in job.hosts:
            st = host.status()
            assert host.gauges() == (st["bytes"], st["version"], st["staged"])
            assert st["staged"] == 1 and st["bytes"] > 0
        host = job.hosts[1]
        held, done = threading.Event(), threading.Event()

        def hold() -> None:
            with host._cond:  # a step in progress
                held.set()
                done.wait(5)

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert held.wait(5)
            got = []
            reader = threading.Thread(target=lambda: got.append(host.gauges()))
            reader.start()
            reader.join(2)
            assert got and not reader.is_alive()  # answered while the lock is held
        finally:
            done.set()
            t.join(5)
    finally:
        job.close()


def test_the_leaders_own_shard_is_called_in_its_thread():
    """A fan-out calls an ``inline`` link (the leader's own shard) in the calling thread and the
    others on the pool, in parallel; replies come back in shard order, failures after all."""
    import threading

    from adamax_server.sharding.leader import Leader
    from adamax_server.sharding.links import PartialFailure

    seen = {}

    class Link:
        def __init__(self, index, inline, fail=False):
            self.index, self.inline, self.fail = index, inline, fail

        def call(self, method, *args, timeout):
            seen[self.index] = threading.current_thread()
            if self.fail:
                raise ValueError(f"shard {self.index} failed")
            return (self.index, method, args)

    links = [Link(0, True), Link(1, False), Link(2, False)]
    leader = Leader("job", Policy(), {"learning_rate": 0.1}, links, lambda: None)
    try:
        got = leader._fan("status", lambda i: (i,))
        assert list(got) == [0, 1, 2] and got[2] == (2, "status", (2,))
        assert seen[0] is threading.current_thread()
        assert seen[1] is not threading.current_thread() and seen[2] is not threading.current_thread()
        links[0].fail = links[2].fail = True
        with pytest.raises(PartialFailure) as info:
            leader._fan("status", lambda i: ())
        assert sorted(info.value.errors) == [0, 2] and list(info.value.results) == [1]
    finally:
        leader.close()


@pytest.mark.parametrize("num_shards", [1, 3])
def test_a_loaded_store_sets_the_learning_rate_even_after_set_learning_rate(num_shards):
    """``set_learning_rate`` and then a store holding another learning rate: the next step uses
    the loaded one, as Keras does. (The leader hands the rate it was last set to every prepared
    step; it once kept doing so after a load, undoing the loaded rate.)"""
    from adamax_server.optim.engine import Adamax

    rng = np.random.default_rng(8)
    values = _values(rng)
    local = Adamax.from_config({"learning_rate": 0.01, "name": "lr"}, device="cpu")
    local.build(values)
    local.learning_rate = 0.003
    store = {}
    local.save_own_variables(store)
    store = {k: np.asarray(v) * 2 if np.asarray(v).dtype.kind == "f" else np.asarray(v) for k, v in store.items()}
    local.load_own_variables(store)
    assert float(local.learning_rate) == float(np.float32(0.006))
    grads = _grads(rng, values)
    local.apply(dict(grads))
    job = ShardedJob("lr", {"learning_rate": 0.01}, Policy(mode="async"), num_shards, min_piece_bytes=MIN_PIECE)
    try:
        job.build(values)
        job.set_learning_rate(0.003)
        version, _ = job.load_own_variables(store)
        assert job.push("w0", "r0", version, grads).outcome == "applied"
        _, _, pulled = job.pull()
        for name, value in local.trainable_variables.items():
            assert pulled[name].tobytes() == np.asarray(value).tobytes(), name
    finally:
        job.close()


@pytest.mark.parametrize("config", [{"clipnorm": 0.3}, {"global_clipnorm": 0.2, "gradient_accumulation_steps": 2,
                                                         "loss_scale_factor": 4.0}], ids=["clipnorm", "global-acc-scale"])
def test_whole_variables_clip_with_the_backends_own_sums(config, monkeypatch):
    """A one-shard job (a plain server) on a backend without the pairwise-leaf kernel (NumPy
    here; the GPU's CuPy alike) takes each whole variable's sum of squares from the backend
    itself, on its device, as ``Adamax`` clips: equal to ``Adamax`` on that backend, bit for bit."""
    from adamax_server.optim.engine import Adamax
    from adamax_server.sharding.coordinator import Coordinator

    rng = np.random.default_rng(4)
    values = {"w": rng.standard_normal((300, 7)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32),
              "d": rng.standard_normal(50).astype(np.float64)}  # fmt: skip
    coordinator = Coordinator(device="numpy")
    try:
        _, host = coordinator.create("m", {"learning_rate": 0.01, **config}, Policy())
        host.build(list(values.items()))
        backend = host._shard.read_engine(lambda e: e._backend)
        calls = []
        original = backend.sumsq
        monkeypatch.setattr(backend, "sumsq", lambda *a: calls.append(1) or original(*a))
        local = Adamax.from_config({"learning_rate": 0.01, **config, "name": "m"}, device="numpy")
        local.build(values)
        for k in range(4):
            grads = {n: (rng.standard_normal(v.shape) * 3).astype(v.dtype) for n, v in values.items()}
            host.push("w0", f"r{k}", host.version, lambda lookup, g=grads: list(g.items()))
            local.apply(dict(grads))
        assert calls  # the backend's own sums
        pulled = host.pull([], lambda v, it, items: dict(items)).payload
        for name, value in local.trainable_variables.items():
            assert pulled[name].tobytes() == np.asarray(value).tobytes(), name
    finally:
        coordinator.close()
