"""Shared by the sharding tests: a small model, gradients, and the single-server / sharded drivers."""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np

from adamax_server.sharding.coordinator import Coordinator
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.sharding.job import ShardedJob

MIN_PIECE = 2048


def values_(rng):
    return {
        "emb": rng.standard_normal((600, 32)).astype(np.float32),
        "w": rng.standard_normal((64, 64)).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
        "d": rng.standard_normal((50, 20)).astype(np.float64),
        "s": np.asarray(0.5, dtype=np.float32),
    }


def grads_(rng, values, *, none=(), sparse=False, scale=1.0):
    out = {}
    for n, v in values.items():
        if n in none:
            out[n] = None
        elif n == "emb" and sparse:
            idx = rng.integers(0, 600, 40)
            idx[:3] = [5, 5, 599]  # duplicates and the last row
            out[n] = RowSparseGradient(idx, (rng.standard_normal((40, 32)) * scale).astype(np.float32))
        else:
            out[n] = (rng.standard_normal(np.shape(v)) * scale).astype(v.dtype)
    return out


class Single:
    """The single-server reference: one OptimizerHost, pushes as the servicer makes them."""

    def __init__(self, config, policy):
        self.coord = Coordinator(device="numba")
        _, self.host = self.coord.create("job", config, policy)

    def build(self, values):
        self.host.build(list(values.items()))

    def push(self, worker, request, step, grads):
        return self.host.push(worker, request, step, lambda staging: list(grads.items()))

    def pull(self):
        out = self.host.pull((), lambda v, it, arrays: dict(arrays))
        return out.version, out.iterations, out.payload

    def store(self):
        return self.host.save_own_variables()

    def close(self):
        self.coord.close()


class Sharded:
    def __init__(self, config, policy, n):
        self.job = ShardedJob("job", config, policy, n, device="numba", min_piece_bytes=MIN_PIECE)

    def build(self, values):
        self.job.build(values)

    def push(self, worker, request, step, grads):
        return self.job.push(worker, request, step, grads)

    def pull(self):
        return self.job.pull()

    def store(self):
        return self.job.save_own_variables()

    def close(self):
        self.job.close()


def run_(target, script):
    """Run ``script(target)``: a list of outcomes (results or error type+message) per call."""
    log = []

    def call(fn, *args):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = fn(*args)
            log.append(("ok", r.outcome, r.version, r.iterations, r.duplicate, r.detail) if hasattr(r, "outcome") else ("ok", r))
        except Exception as exc:  # noqa: BLE001 - compared across targets
            msg = getattr(exc, "message", str(exc))
            log.append(("error", type(exc).__name__, msg.replace("shard 0: ", "").replace("shard 1: ", "").replace("shard 2: ", "")))

    script(target, call)
    version, iterations, weights = target.pull()
    return log, version, iterations, weights, target.store()


def compare(config, policy, script, shard_counts=(1, 3)):
    single = Single(config, policy)
    try:
        expected = run_(single, script)
    finally:
        single.close()
    for n in shard_counts:
        job = Sharded(config, policy, n)
        try:
            got = run_(job, script)
        finally:
            job.close()
        assert got[0] == expected[0], (n, got[0], expected[0])
        assert got[1:3] == expected[1:3]
        for name, value in expected[3].items():
            assert got[3][name].tobytes() == value.tobytes(), (n, name)
        assert sorted(got[4]) == sorted(expected[4])
        for k, value in expected[4].items():
            assert np.asarray(got[4][k]).tobytes() == np.asarray(value).tobytes(), (n, k)


# ---------------------------------------------------------------- shard servers on 127.0.0.1:0

#: A config exercising the cross-shard norm (global_clipnorm), EMA overwrite and weight decay.
REMOTE_CONFIG = {"learning_rate": 0.01, "global_clipnorm": 0.5, "use_ema": True, "ema_overwrite_frequency": 2,
                 "weight_decay": 0.01}  # fmt: skip


def start_shard_servers(n, tmp_path=None, bulk_for=lambda i: None, min_piece=MIN_PIECE, kwargs_for=lambda i: {},
                        **kwargs):  # fmt: skip
    """``n`` shard servers (bound to port 0, then told each other's addresses); (servers, targets).
    ``kwargs_for(i)``: ``create_shard_server`` arguments of shard ``i`` only (its interceptors)."""
    from adamax_server.sharding.server import create_shard_server

    servers, ports = [], []
    for i in range(n):
        server, port = create_shard_server(
            "127.0.0.1:0", i, ["127.0.0.1:1"] * n, device="numba", min_piece_bytes=min_piece, call_timeout=5.0,
            checkpoint_dir=None if tmp_path is None else tmp_path / f"shard{i}", bulk=bulk_for(i),
            **{**kwargs, **kwargs_for(i)},
        )  # fmt: skip
        servers.append(server)
        ports.append(port)
    targets = [f"127.0.0.1:{p}" for p in ports]
    for s in servers:
        s.shard_registry.set_shards(targets)
        s.start()
    return servers, targets


def stop_shard_servers(servers):
    from adamax_server.sharding.server import stop_shard_server

    for s in servers:
        stop_shard_server(s, grace=0)


def remote_values(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.standard_normal((600, 32)).astype(np.float32),
        "w": rng.standard_normal((64, 64)).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
        "d": rng.standard_normal((50, 20)).astype(np.float64),
    }


def remote_grads(values, k):
    """Push ``k``'s gradients (client types): row-sparse ``emb`` every third, no ``b`` every fourth."""
    from adamax_wire.tensors import RowSparseGradient as WireSparse

    rng = np.random.default_rng(100 + k)
    out = {n: (rng.standard_normal(np.shape(v)) * 3).astype(v.dtype) for n, v in values.items()}
    if k % 3 == 1:
        out["emb"] = WireSparse(rng.integers(0, 600, 30), rng.standard_normal((30, 32)).astype(np.float32))
    if k % 4 == 2:
        out["b"] = None
    return out


def free_ports(n):
    """``n`` distinct free TCP ports on 127.0.0.1 (for shard lists known before the processes start)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def shard_process_env(min_piece_bytes=2048):
    """Environment of a ``serve --shards`` subprocess: this checkout's packages, small pieces."""
    from _ps_helpers import REPO_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / d) for d in ("server", "client", "wire")] + [env.get("PYTHONPATH", "")])
    env["ADAMAX_PS_MIN_PIECE_BYTES"] = str(min_piece_bytes)
    return env
