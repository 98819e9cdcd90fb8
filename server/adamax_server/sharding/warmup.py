"""Load (or compile) a shard's step kernels before it serves.

The CPU kernels are numba functions cached on disk (``cache=True``): the first call in a process
loads them (about 0.4 s each, more on a busy host) and, when the cache is missing or stale (a
fresh install, an edited kernel), compiles them, which takes several seconds. On one server
that only slows the first push. On a sharded job it would happen inside the first ``prepare``
and ``commit`` the leader sends, on every shard at once, bounded by ``--shard-call-timeout``:
a cold shard then misses the deadline, the leader aborts the event and the worker's first
push fails (``DEADLINE_EXCEEDED`` / ``UNAVAILABLE``) although nothing is wrong.

``warm_up(device)`` runs one whole sharded push in process (two in-memory shards, a float32
variable split over both and a whole one, ``global_clipnorm`` so the norm kernels run too),
which loads every kernel of a float32 step: a shard runs it before it prints ``listening on``
(``create_shard_server(warm=True)``, the default). Other dtypes load on first use.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from adamax_server.coordination.policy import Policy

_log = logging.getLogger(__name__)


def warm_up(device: str = "auto") -> float:
    """One sharded float32 step in process; returns the seconds it took."""
    from adamax_server.sharding.job import ShardedJob

    started = time.monotonic()
    job = ShardedJob("warm-up", {"learning_rate": 0.01, "global_clipnorm": 1.0}, Policy(), 2, device=device,
                     min_piece_bytes=64)  # fmt: skip
    try:
        job.build({"w": np.zeros((8, 4), np.float32), "b": np.zeros(4, np.float32)})
        job.push("warm-up", "r0", 0, {"w": np.ones((8, 4), np.float32), "b": np.ones(4, np.float32)})
        job.pull()
    finally:
        job.close()
    seconds = time.monotonic() - started
    _log.debug("step kernels of device %r loaded in %.2f s", device, seconds)
    return seconds
