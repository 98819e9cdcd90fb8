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


def _until_reachable(call):
    """``call()`` once the restarted shard answers: UNAVAILABLE (reconnecting) is retried, bounded."""
    deadline = time.monotonic() + RECONNECT_S
    while True:
        try:
            return call()
        except (client_errors.UnavailableError, client_errors.DeadlineExceededError):
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
