"""Thread counts for workers that share a host with the parameter server (and each other).

A framework's intra-op pool defaults to one thread per core. Two torch workers on one 2-core host
then run 4 busy threads on 2 cores, and every step waits for the slowest of them: co-located
workers ran 10x slower until ``torch.set_num_threads(1)``. The adapters call
:func:`plan_threads` when they start; it only ever lowers a framework's thread count.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

_log = logging.getLogger("adamax_client")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _host_of(target: str) -> str:
    host = target
    if host.startswith("dns:///"):
        host = host[len("dns:///") :]
    if host.startswith("["):  # [::1]:50051
        return host[1 : host.index("]")]
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host or "127.0.0.1"


def is_local_target(target: str | Sequence[str]) -> bool:
    """True when ``target`` ("host:port") names this machine (loopback or one of its addresses);
    for a sharded job's list (or ``"h0:p,h1:p"``), when any of its shards does."""
    targets = target.split(",") if isinstance(target, str) else [str(t) for t in target]
    targets = [t.strip() for t in targets if t.strip()] or ["127.0.0.1"]
    if len(targets) > 1:
        return any(is_local_target(t) for t in targets)
    host = _host_of(targets[0])
    if host in ("localhost", "0.0.0.0", "::"):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    try:
        mine = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        mine = set()
    if any(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in wanted):
        return True
    return bool(wanted & mine)


@dataclass(frozen=True)
class ThreadPlan:
    """How many intra-op threads one worker should use, and why."""

    threads: int
    cores: int
    local_workers: int
    shares_server_host: bool

    @property
    def oversubscribed(self) -> bool:
        """More worker processes than cores: slow even at one thread each."""
        return self.local_workers > self.cores


def plan_threads(target: str | Sequence[str], local_workers: int) -> ThreadPlan:
    """Threads per worker: the host's cores split over the workers training on it.

    ``local_workers``: worker processes on this host (for a one-host job: all of them). A local
    server gets no core of its own: it works while the workers wait for it (pushes, rounds,
    pulls), so a reserved core would sit idle during every forward and backward pass.
    """
    cores = available_cores()
    workers = max(1, int(local_workers))
    return ThreadPlan(max(1, cores // workers), cores, workers, is_local_target(target))


def apply_torch_threads(target: str | Sequence[str], local_workers: int, setting: int | str | None) -> int | None:
    """Apply ``setting`` ("auto", a number, or None = leave alone) to torch; returns the count set."""
    import torch

    if setting is None:
        return None
    if setting != "auto":
        count = int(setting)
        if count < 1:
            raise ValueError(f"`threads` must be >= 1, 'auto' or None. Received: threads={setting!r}")
        torch.set_num_threads(count)
        return count
    plan = plan_threads(target, local_workers)
    if plan.oversubscribed:
        _log.warning(
            "%d workers on %d core(s): expect slow steps; run at most one worker per core",
            plan.local_workers, plan.cores,
        )
    current = torch.get_num_threads()
    if not plan.shares_server_host and plan.local_workers == 1:
        return None  # a lone worker on its own host keeps torch's default
    if current > plan.threads:
        torch.set_num_threads(plan.threads)
        _log.info(
            "torch intra-op threads %d -> %d (%d cores, %d local worker(s)%s; pass threads=None to keep)",
            current, plan.threads, plan.cores, plan.local_workers,
            ", server on this host" if plan.shares_server_host else "",
        )
        return plan.threads
    return None


def warn_xla_threads(target: str | Sequence[str], local_workers: int) -> None:
    """JAX's CPU thread pool is fixed at start-up: say when co-located workers oversubscribe it."""
    plan = plan_threads(target, local_workers)
    if plan.local_workers > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags and plan.threads < plan.cores:
            _log.warning(
                "%d JAX worker(s)%s share %d core(s), and each JAX process uses all of them. Start each "
                "worker with XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=%d' "
                "(before jax is imported) to avoid oversubscription.",
                plan.local_workers, " and the parameter server" if plan.shares_server_host else "",
                plan.cores, plan.threads,
            )
