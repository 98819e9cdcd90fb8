"""A sharded job's restore is all or none, and its leader (shard 0) can die and come back.

* ``checkpoint restore`` / an upload with restore while a shard is down: refused before any
  shard changed (the error names the shard), the job keeps its version and keeps training.
* A shard lost between the two phases of a restore (staged everywhere, cut off before it swapped
  its part in): the job is marked broken and refuses pushes and checkpoints, naming the shard
  and the way back; once the shard answers, the next push finishes the same restore on every
  shard and the job continues equal to a single server.
* ``kill -9`` of the leader: workers get a clear error within their deadline, nothing is
  applied on the other shards; the leader restarts with ``--restore latest``, sees the other
  shards ahead of its newest cut, and brings every shard to that cut (pushes acknowledged
  after it are lost, as documented); training continues equal to a single server.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from adamax_client import RemoteAdamax
from adamax_client.checkpoints import CheckpointClient
from adamax_client import errors as client_errors
from adamax_server.cli import commands as cli
from adamax_server.errors import Unavailable
from adamax_server.sharding.server import create_shard_server, stop_shard_server
from test_sharding_faults import CONFIG, _grads, _Proxy, _push_single, _single, _start, _values, job  # noqa: F401

RECONNECT_S = 30  # bounded wait for a restarted process's port (gRPC's reconnect backoff)


def _versions(opt, shards):
    return [opt._one(i, "describe")["version"] for i in shards]


def _weights_equal(opt, single, names):
    got = opt.pull()
    ref = single.pull((), lambda v, it, arrays: dict(arrays)).payload
    for n in names:
        assert got[n].tobytes() == ref[n].tobytes(), n


def _until_reachable(call, retry=(client_errors.UnavailableError, client_errors.DeadlineExceededError)):
    """``call()`` once the restarted shard answers: ``retry`` (reconnecting) is retried, bounded."""
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            return call()
        except retry:
            assert time.monotonic() < deadline, "the restarted shard never became reachable"
            time.sleep(0.5)


def test_restore_with_a_shard_down_changes_nothing(job, tmp_path):
    shards, procs, _ = job
    target = ",".join(shards)
    rng = np.random.default_rng(3)
    values = _values(rng)
    grads = [_grads(rng, values) for _ in range(4)]
    opt = RemoteAdamax(shards, worker_id="w", optimizer="job", timeout=6, **CONFIG)
    try:
        opt.build(values)
        opt.push(grads[0], request_id="r0")
        at_cut = {n: v.copy() for n, v in opt.pull().items()}
        assert cli.main(["checkpoint", "save", "--target", target]) == 0
        assert cli.main(["checkpoint", "download", "--target", target, "--output", str(tmp_path / "dl")]) == 0
        opt.push(grads[1], request_id="r1")
        after = {n: v.copy() for n, v in opt.pull().items()}

        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait(10)
        with CheckpointClient(shards, timeout=20) as ckpt:
            with pytest.raises(client_errors.UnavailableError, match=r"shard 2 (could not load its part|did not list its checkpoints).*nothing changed on any shard"):
                ckpt.restore("latest")
        assert _versions(opt, (0, 1)) == [2, 2]  # neither shard 0 nor shard 1 went back to the cut
        assert cli.main(["checkpoint", "upload", "--target", target, "--input", str(tmp_path / "dl")]) != 0
        assert _versions(opt, (0, 1)) == [2, 2]
        for i in (0, 1):  # the weights each live shard serves are still version 2's
            version, _, pieces = opt._one(i, "pull", [], 0, 5.0)
            assert version == 2 and pieces

        procs[2] = _start(2, shards, tmp_path / "s2", restore=True)
        got = _until_reachable(lambda: CheckpointClient(shards, timeout=20).restore("latest"))
        assert got[1][0].version == 1
        assert _versions(opt, (0, 1, 2)) == [1, 1, 1]
        back = opt.pull(min_version=0)
        for n in values:
            assert back[n].tobytes() == at_cut[n].tobytes(), n
        opt.push(grads[1], request_id="r1-again")  # training continues from the cut
        again = opt.pull()
        for n in values:
            assert again[n].tobytes() == after[n].tobytes(), n
    finally:
        opt.close()


def test_shard_lost_between_restore_phases_blocks_the_job_until_the_restore_completes(tmp_path):
    servers, ports = [], []
    for i in range(3):
        server, port = create_shard_server("127.0.0.1:0", i, ["127.0.0.1:1"] * 3, device="cpu", min_piece_bytes=2048,
                                           call_timeout=2.0, checkpoint_dir=tmp_path / f"s{i}")  # fmt: skip
        servers.append(server)
        ports.append(port)
    proxy = _Proxy(ports[2])
    direct = [f"127.0.0.1:{p}" for p in ports]
    for s in servers:
        s.shard_registry.set_shards(direct[:2] + [f"127.0.0.1:{proxy.port}"])  # the leader reaches shard 2 via the proxy
        s.start()
    registry2 = servers[2].shard_registry
    dispatch = registry2.dispatch

    def cut_after_staging(key, method, args):  # shard 2 staged its part, then is cut off before it swaps it in
        if method == "activate_restore" and cut_once:
            cut_once.pop()
            proxy.set_cut(True)  # the activation never arrives: the shard keeps its old state
            raise Unavailable("cut off")
        return dispatch(key, method, args)

    registry2.dispatch = cut_after_staging
    cut_once = [True]
    rng = np.random.default_rng(5)
    values = _values(rng)
    grads = [_grads(rng, values) for _ in range(5)]
    coord, single = _single(values)
    opt = RemoteAdamax(direct, worker_id="w", optimizer="job", timeout=8, **CONFIG)
    try:
        opt.build(values)
        opt.push(grads[0], request_id="r0")
        _push_single(single, 0, grads[0])
        cut = opt.checkpoint()["id"]
        opt.push(grads[1], request_id="r1")  # after the cut: undone by the restore below
        opt.pull()

        with pytest.raises(client_errors.FailedPreconditionError, match=r"reached shard\(s\) \[0, 1\] but not shard\(s\) \[2\]"):
            opt.restore(cut)
        assert _versions(opt, (0, 1, 2)) == [1, 1, 2]  # 0 and 1 at the cut; 2 (cut off) not yet
        for attempt in ("r2", "r2"):  # refused, and nothing applied anywhere, as long as shard 2 is cut off
            with pytest.raises((client_errors.FailedPreconditionError, client_errors.UnavailableError), match="shard 2"):
                opt.push(grads[2], step=1, request_id=attempt, timeout=6)
        with pytest.raises(client_errors.FailedPreconditionError, match="restore"):
            opt.checkpoint()
        assert _versions(opt, (0, 1, 2)) == [1, 1, 2]

        proxy.set_cut(False)  # shard 2 answers again: the next push finishes the same restore everywhere

        def push_r2():
            # The deadline outlasts the leader's whole heal (a stage and an activation per shard, each
            # bounded by call_timeout): a client that gave up first would retry r2 after the heal, and
            # that retry is rightly applied as a fresh push instead of answered with the restore.
            with pytest.raises(client_errors.AbortedError, match=f"restored on every shard to checkpoint {cut}"):
                opt.push(grads[2], step=1, request_id="r2", timeout=30)

        _until_reachable(push_r2, retry=(client_errors.UnavailableError,))  # the leader reconnects with backoff
        assert _versions(opt, (0, 1, 2)) == [1, 1, 1]
        opt.pull(min_version=0)
        for k in (1, 2):
            opt.push(grads[k], request_id=f"r{k}-again")
            _push_single(single, k, grads[k])
            opt.pull()
        _weights_equal(opt, single, values)
    finally:
        opt.close()
        coord.close()
        proxy.close()
        for s in servers:
            stop_shard_server(s, grace=0)


@pytest.mark.parametrize("secure", [False, True])
def test_leader_links_reconnect_within_seconds_of_a_shard_coming_back(monkeypatch, secure):
    """gRPC's default reconnect backoff grows to 120 s: a shard back after a long outage would keep
    its job refused for minutes. The leader's links cap it at 2 s (plain and TLS channels alike)."""
    import grpc

    from adamax_server.sharding.rpc import ShardRegistry

    made = []

    class Channel:  # what a link needs of a channel, without connecting anywhere
        def stream_stream(self, *args, **kwargs):
            return None

        unary_unary = stream_unary = unary_stream = stream_stream

    monkeypatch.setattr(grpc, "insecure_channel", lambda target, options=None: made.append(dict(options)) or Channel())
    monkeypatch.setattr(grpc, "secure_channel", lambda target, creds, options=None: made.append(dict(options)) or Channel())
    creds = grpc.ssl_channel_credentials() if secure else None
    registry = ShardRegistry(0, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], device="cpu", link_credentials=creds)
    links = registry._links("job")
    assert len(made) == 2  # one channel per other shard; the leader's own shard is called in place
    assert type(links[0]).__name__ == "_SelfLink"
    for options in made:
        assert options["grpc.max_reconnect_backoff_ms"] <= 2000
        assert options["grpc.initial_reconnect_backoff_ms"] <= 1000
        assert options["grpc.max_receive_message_length"] == 256 << 20


def test_kill_9_of_the_leader_then_restore_latest_brings_the_job_to_one_cut(job):
    shards, procs, tmp_path = job
    rng = np.random.default_rng(7)
    values = _values(rng)
    grads = [_grads(rng, values) for _ in range(8)]
    coord, single = _single(values)
    opt = RemoteAdamax(shards, worker_id="w", optimizer="job", timeout=6, **CONFIG)
    try:
        opt.build(values)
        for k in range(3):
            opt.push(grads[k], request_id=f"r{k}")
            _push_single(single, k, grads[k])
        assert cli.main(["checkpoint", "save", "--target", ",".join(shards)]) == 0
        opt.pull()
        opt.push(grads[3], request_id="r3")  # acknowledged after the cut: lost when the leader restarts from it
        opt.pull()

        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        started = time.monotonic()
        with pytest.raises((client_errors.UnavailableError, client_errors.DeadlineExceededError)):
            opt.push(grads[4], request_id="r4")
        assert time.monotonic() - started < 15  # bounded by the worker's deadline
        assert _versions(opt, (1, 2)) == [4, 4]  # nothing applied on the shards that stayed up

        procs[0] = _start(0, shards, tmp_path / "s0", restore=True)
        # The restarted leader is at its newest cut (version 3) and shards 1 and 2 at 4: it
        # notices before deciding anything, restores the cut on every shard and says so.
        def push_r4():
            with pytest.raises(client_errors.AbortedError, match="restored on every shard"):
                opt.push(grads[4], request_id="r4")

        _until_reachable(push_r4)
        status = opt.status()
        assert status["version"] == 3 and {s["version"] for s in status["shards"]} == {3}
        opt.pull()
        for k in range(3, 6):  # the lost push is pushed again
            opt.push(grads[k], request_id=f"r{k}-again")
            _push_single(single, k, grads[k])
            opt.pull()
        _weights_equal(opt, single, values)
        assert opt.iterations == 6
    finally:
        opt.close()
        coord.close()


def test_kill_9_of_the_leader_while_a_worker_pushes(job):
    """Killed at any point of a push (staging, prepare, between two commits): afterwards every
    shard is at one cut again and the worker's failed push is simply pushed again."""
    import threading

    shards, procs, tmp_path = job
    rng = np.random.default_rng(9)
    values = _values(rng)
    grads = [_grads(rng, values) for _ in range(4)]
    opt = RemoteAdamax(shards, worker_id="w", optimizer="job", timeout=6, **CONFIG)
    watcher = RemoteAdamax(shards, worker_id="watch", optimizer="job", timeout=6, **CONFIG)
    outcome: dict[str, BaseException] = {}
    applied = []

    def train():
        for k in range(10_000):  # bounded; ends at the first error (the leader is gone)
            try:
                opt.push(grads[k % 4], step=opt._version, request_id=f"t{k}")
                opt.pull()
                applied.append(k)
            except Exception as exc:  # noqa: BLE001 - inspected below
                outcome["error"] = exc
                return

    try:
        opt.build(values)
        opt.push(grads[0], request_id="r0")
        assert cli.main(["checkpoint", "save", "--target", ",".join(shards)]) == 0  # the cut: version 1
        worker = threading.Thread(target=train, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while len(applied) < 3:
            assert time.monotonic() < deadline and worker.is_alive(), outcome
            time.sleep(0.01)
        procs[0].send_signal(signal.SIGKILL)  # mid-push, most likely
        procs[0].wait(10)
        worker.join(30)
        assert not worker.is_alive()
        assert isinstance(outcome["error"], (client_errors.UnavailableError, client_errors.DeadlineExceededError)), outcome
        v1, v2 = _versions(watcher, (1, 2))
        assert abs(v1 - v2) <= 1  # at most the one event the leader was delivering when it died

        procs[0] = _start(0, shards, tmp_path / "s0", restore=True)

        def push_again():
            with pytest.raises(client_errors.AbortedError, match="restored on every shard"):
                opt.push(grads[1], step=max(v1, v2), request_id="again")

        _until_reachable(push_again)
        assert _versions(watcher, (0, 1, 2)) == [1, 1, 1]
        opt.pull(min_version=0)
        result = opt.push(grads[1], request_id="after")
        assert result.outcome == "applied" and result.version == 2
        assert _versions(watcher, (0, 1, 2)) == [2, 2, 2]
        assert {s["version"] for s in watcher.status()["shards"]} == {2}
    finally:
        watcher.close()
        opt.close()
