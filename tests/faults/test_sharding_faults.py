"""Faults of a sharded job over real processes and sockets.

* ``kill -9`` of a shard: workers get a clear error within their deadline and nothing is applied
  anywhere; the shard restarts with ``--restore latest`` and the leader brings every shard back
  to the newest common cut (pushes acknowledged after it are lost, as documented), then the
  job continues and ends equal to a single server given the same effective pushes.
* A shard cut off from the leader by a TCP proxy: pushes fail cleanly (nothing applied), and
  succeed again with the same request id once the link is back.
* The CLI on the shard list: status (bytes per shard), checkpoint save/list/download (the
  assembled store equals the single server's)/upload onto the job.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from _sharding_helpers import free_ports, shard_process_env
from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_server.cli import commands as cli
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.coordination.policy import Policy
from adamax_server.sharding.server import create_shard_server, stop_shard_server
from adamax_server.storage.checkpoint import CheckpointStore

CONFIG = {"learning_rate": 0.01, "global_clipnorm": 0.5}


def _once_reachable(call, what="the restarted shard never became reachable", seconds=30):
    """``call()`` until it stops failing UNAVAILABLE: the workers' channels to a restarted shard
    reconnect with gRPC's backoff (a worker backs off and retries meanwhile)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except client_errors.UnavailableError:
            assert time.monotonic() < deadline, what
            time.sleep(0.5)


def _start(index, shards, ckpt_dir, restore=False):
    cmd = [sys.executable, "-m", "adamax_server.cli", "serve", "--port", shards[index].split(":")[1], "--device", "cpu",
           "--shard-index", str(index), "--shards", ",".join(shards), "--checkpoint-dir", str(ckpt_dir),
           "--shard-call-timeout", "3", "--grace", "0"]  # fmt: skip
    if restore:
        cmd += ["--restore", "latest"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=shard_process_env())
    line = proc.stdout.readline()
    assert line.startswith("listening on"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _values(rng):
    return {"emb": rng.standard_normal((400, 16)).astype(np.float32), "w": rng.standard_normal((32, 32)).astype(np.float32),
            "b": rng.standard_normal(32).astype(np.float32)}


def _grads(rng, values):
    return {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in values.items()}


@pytest.fixture
def job(tmp_path):
    ports = free_ports(3)
    shards = [f"127.0.0.1:{p}" for p in ports]
    procs = [_start(i, shards, tmp_path / f"s{i}") for i in range(3)]
    yield shards, procs, tmp_path
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def _single(values):
    coord = Coordinator(device="cpu")
    _, host = coord.create("job", CONFIG, Policy())
    host.build(list(values.items()))
    return coord, host


def _push_single(host, k, g):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        host.push("w", f"r{k}", host.version, lambda staging: list(g.items()))


def test_kill_9_then_restore_latest_brings_the_job_to_one_cut(job, capsys):
    shards, procs, tmp_path = job
    rng = np.random.default_rng(0)
    values = _values(rng)
    grads = [_grads(rng, values) for _ in range(8)]
    coord, single = _single(values)
    opt = RemoteAdamax(shards, worker_id="w", optimizer="job", timeout=6, **CONFIG)
    try:
        opt.build(values)
        assert any(v["pieces"] and len(v["pieces"]) > 1 for v in opt._refresh()["placement"]["variables"])
        for k in range(3):
            opt.push(grads[k], request_id=f"r{k}")
            _push_single(single, k, grads[k])
        assert cli.main(["checkpoint", "save", "--target", ",".join(shards)]) == 0
        opt.pull()
        opt.push(grads[3], request_id="r3")  # acknowledged after the cut: lost by the restart below
        opt.pull()
        late = RemoteAdamax(shards, worker_id="late", optimizer="job", timeout=6, **CONFIG)
        late.build(values)  # attaches
        assert late.pull() is not None and late.version == 4  # weights the restart below takes back

        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait(10)
        before = [opt._one(i, "describe")["version"] for i in (0, 1)]
        started = time.monotonic()
        with pytest.raises((client_errors.UnavailableError, client_errors.DeadlineExceededError)):
            opt.push(grads[4], request_id="r4")
        assert time.monotonic() - started < 15  # bounded by the deadline and the leader's shard timeout
        assert [opt._one(i, "describe")["version"] for i in (0, 1)] == before == [4, 4]

        procs[2] = _start(2, shards, tmp_path / "s2", restore=True)
        # Until the restarted shard is reachable a push fails UNAVAILABLE; then it learns of the restore.
        with pytest.raises(client_errors.AbortedError, match="restored on every shard"):
            _once_reachable(lambda: opt.push(grads[4], request_id="r4"))
        assert opt.status()["version"] == 3 and {s["version"] for s in opt.status()["shards"]} == {3}
        # A worker that pulled version 4 before the restart pushes after the restore took the job
        # back to version 3: ABORTED (pull again), not "step ahead of the version" (a caller's bug).
        with pytest.raises(client_errors.AbortedError, match="took back"):
            _once_reachable(lambda: late.push(grads[5], request_id="late-0"))
        assert opt.status()["version"] == 3
        late.close()
        opt.pull()
        for k in range(3, 6):  # the lost push is pushed again
            opt.push(grads[k], request_id=f"r{k}-again")
            _push_single(single, k, grads[k])
            opt.pull()
        got = opt.pull()
        ref = single.pull((), lambda v, it, arrays: dict(arrays)).payload
        for n in values:
            assert got[n].tobytes() == ref[n].tobytes(), n

        capsys.readouterr()
        assert cli.main(["status", "--target", ",".join(shards)]) == 0
        out = capsys.readouterr().out
        assert "job: built=True version=6" in out and out.count("bytes=") == 3

        # Download the assembled job: the single server's Keras store, bit for bit.
        assert cli.main(["checkpoint", "save", "--target", ",".join(shards)]) == 0
        assert cli.main(["checkpoint", "download", "--target", ",".join(shards), "--output", str(tmp_path / "dl")]) == 0
        (snap,) = CheckpointStore(tmp_path / "dl").load_latest()[1]
        expected = single.save_own_variables()
        assert sorted(snap.store) == sorted(expected)
        for key in expected:
            assert np.asarray(snap.store[key]).tobytes() == np.asarray(expected[key]).tobytes()

        # Upload it back (re-split onto the 3 shards) after more pushes: the job returns to it.
        opt.push(grads[6], request_id="r6")
        assert cli.main(["checkpoint", "upload", "--target", ",".join(shards), "--input", str(tmp_path / "dl")]) == 0
        back = opt.pull(min_version=0)
        for n in values:
            assert back[n].tobytes() == ref[n].tobytes()
    finally:
        opt.close()
        coord.close()


def test_a_shard_restarted_between_pushes_is_healed_without_a_push(job):
    """kill -9 of a shard after the last push, restart with --restore latest: the leader's watch
    finds it behind (no push needed) and brings every shard to the newest common cut, so a pull
    settles on one version instead of waiting for one the restarted shard no longer has."""
    shards, procs, tmp_path = job
    rng = np.random.default_rng(3)
    values = _values(rng)
    opt = RemoteAdamax(shards, worker_id="w", optimizer="job", timeout=6, **CONFIG)
    try:
        opt.build(values)
        for k in range(2):
            opt.push(_grads(rng, values), request_id=f"r{k}")
        assert cli.main(["checkpoint", "save", "--target", ",".join(shards)]) == 0
        at_cut = opt.pull()
        opt.push(_grads(rng, values), request_id="r2")  # acknowledged after the cut: lost below
        assert opt.pull() is not None and opt.version == 3
        time.sleep(2.5)  # the watch has looked at every shard once (it compares incarnations)

        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        procs[1] = _start(1, shards, tmp_path / "s1", restore=True)
        deadline = time.monotonic() + 30
        while True:  # no push: only the watch can notice
            try:
                st = opt.status()
                if st["version"] == 2 and {s["version"] for s in st["shards"]} == {2} and not st["lagging"]:
                    break
            except client_errors.UnavailableError:
                pass
            assert time.monotonic() < deadline, "the restarted shard was not healed without a push"
            time.sleep(0.5)
        got = opt.pull()
        assert opt.version == 2
        for n in values:
            assert got[n].tobytes() == at_cut[n].tobytes(), n
        with pytest.raises(client_errors.AbortedError, match="restored on every shard"):
            opt.push(_grads(rng, values), step=3, request_id="r3")  # on version 3, which the restore took back
    finally:
        opt.close()


class _Proxy:
    """A TCP proxy that can be cut: every connection is dropped and new ones are refused."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.cut = False
        self.conns = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data or self.cut:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def set_cut(self, cut):
        self.cut = cut
        if cut:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns = []

    def close(self):
        self._stop = True
        self.set_cut(True)
        self.listener.close()


def test_partitioned_shard_fails_pushes_cleanly_and_heals():
    servers, ports = [], []
    for i in range(3):
        server, port = create_shard_server("127.0.0.1:0", i, ["127.0.0.1:1"] * 3, device="cpu", min_piece_bytes=2048,
                                           call_timeout=2.0)
        servers.append(server)
        ports.append(port)
    proxy = _Proxy(ports[2])
    direct = [f"127.0.0.1:{p}" for p in ports]
    via_proxy = direct[:2] + [f"127.0.0.1:{proxy.port}"]  # the leader reaches shard 2 through the proxy
    for s in servers:
        s.shard_registry.set_shards(via_proxy)
        s.start()
    rng = np.random.default_rng(1)
    values = _values(rng)
    grads = [_grads(rng, values) for _ in range(4)]
    coord, single = _single(values)
    opt = RemoteAdamax(direct, worker_id="w", optimizer="job", timeout=8, **CONFIG)
    try:
        opt.build(values)
        opt.push(grads[0], request_id="r0")
        _push_single(single, 0, grads[0])
        proxy.set_cut(True)
        with pytest.raises((client_errors.UnavailableError, client_errors.DeadlineExceededError), match="shard 2|Deadline"):
            opt.push(grads[1], request_id="r1", timeout=5)
        assert [opt._one(i, "describe")["version"] for i in range(3)] == [1, 1, 1]  # nothing applied anywhere
        proxy.set_cut(False)
        result = opt.push(grads[1], request_id="r1")  # the same push, once
        assert result.outcome == "applied" and result.version == 2
        _push_single(single, 1, grads[1])
        got = opt.pull()
        ref = single.pull((), lambda v, it, arrays: dict(arrays)).payload
        for n in values:
            assert got[n].tobytes() == ref[n].tobytes()
    finally:
        opt.close()
        coord.close()
        proxy.close()
        for s in servers:
            stop_shard_server(s, grace=0)
