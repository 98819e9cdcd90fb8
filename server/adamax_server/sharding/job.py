"""A whole sharded job driven from one place: what a client does with every shard, in process.

``ShardedJob`` holds N ``ShardHost``s, reaches them through ``ShardLink``s (``LocalLink`` here;
a gRPC link in the server) and the ``Leader`` on shard 0, and offers the operations a worker
and the checkpoint tools perform on a job: build, push (stage everywhere, then commit at the
leader), pull (every shard in parallel, one version), the assembled Keras store, and
consistent checkpoints that restore onto any shard count.

A ``LocalLink`` can be *cut* (every call raises ``ShardUnavailable``, as a partitioned or
killed shard would) and its host replaced (a shard restarted from its checkpoint): the fault
tests drive these.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adamax_server.coordination.policy import Policy, PushResult, normalize_config as _normalize
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.errors import FailedPrecondition, InvalidArgument
from adamax_server.coordination.snapshot import OptimizerSnapshot, RoundContribution
from adamax_server.sharding.leader import Leader, ShardUnavailable
from adamax_server.sharding.placement import DEFAULT_MIN_PIECE_BYTES, Placement, place
from adamax_server.sharding.shard import ShardHost, ShardSnapshot
from adamax_server.sharding.shard_engine import ShardEngine
from adamax_server.sharding.split import assemble, assemble_store, job_layout, split_gradients, split_store, split_values


class LocalLink:
    """A shard reached by a direct call; ``cut`` makes it unreachable."""

    def __init__(self, index: int, host: ShardHost) -> None:
        self.index = index
        self.host = host
        self.cut = False
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any, timeout: float) -> Any:
        if self.cut:
            raise ShardUnavailable(f"shard {self.index} is unreachable")
        result = getattr(self.host, method)(*args)
        if self.cut:  # cut while the call ran: the reply is lost
            raise ShardUnavailable(f"shard {self.index} is unreachable (reply lost)")
        return result


@dataclass
class JobCheckpoint:
    """One consistent cut: every shard at ``version``, and the leader's tables."""

    key: str
    version: int
    config: dict[str, Any]
    policy: dict[str, Any]
    placement: dict[str, Any]
    leader: dict[str, Any]
    shards: list[ShardSnapshot] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return len(self.shards)


class ShardedJob:
    """One optimizer over ``num_shards`` in-process shards (see the module docstring)."""

    def __init__(
        self,
        key: str,
        config: Mapping[str, Any],
        policy: Policy,
        num_shards: int,
        *,
        device: str = "auto",
        min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
        staging_ttl: float = 300.0,
        call_timeout: float = 10.0,
    ) -> None:
        config = dict(config)
        config.setdefault("name", key)
        self.key = key
        self.device = device
        self.policy = policy
        self.min_piece_bytes = min_piece_bytes
        self.staging_ttl = staging_ttl
        probe = ShardEngine.from_config(config, device=device)  # Keras-style ValueError on a bad config
        self.config = _normalize(probe.get_config())
        self.hosts = [self._new_host(i, num_shards) for i in range(num_shards)]
        self.links = [LocalLink(i, h) for i, h in enumerate(self.hosts)]
        self.leader = Leader(key, policy, self.config, self.links, lambda: self.links[0].host.placement, call_timeout=call_timeout)
        self._pool = ThreadPoolExecutor(max_workers=num_shards)
        self._layout: list[tuple[str, str, str]] | None = None

    def _new_host(self, index: int, num_shards: int) -> ShardHost:
        def factory(cfg: Mapping[str, Any]) -> ShardEngine:
            return ShardEngine.from_config(dict(cfg), device=self.device)

        return ShardHost(
            self.key, index, num_shards, factory, self.config, asdict(self.policy),
            min_piece_bytes=self.min_piece_bytes, staging_ttl=self.staging_ttl,
        )  # fmt: skip

    @property
    def num_shards(self) -> int:
        return len(self.links)

    @property
    def placement(self) -> Placement:
        placement = self.links[0].host.placement
        if placement is None:
            raise FailedPrecondition(f"optimizer '{self.key}' is not built yet")
        return placement

    def _all(self, method: str, args_for: Any) -> list[Any]:
        futures = [self._pool.submit(link.call, method, *args_for(i), timeout=10.0) for i, link in enumerate(self.links)]
        return [f.result() for f in futures]

    # -------------------------------------------------------------- worker calls

    def build(self, variables: Mapping[str, np.ndarray]) -> Placement:
        specs = [(n, tuple(np.shape(v)), np.asarray(v).dtype.name) for n, v in variables.items()]
        placement = place(specs, self.num_shards, self.min_piece_bytes)
        pieces = split_values(placement, variables)
        self._all("build", lambda i: (specs, pieces[i]))
        return placement

    def stage(self, worker_id: str, request_id: str, grads: Mapping[str, Any], shards: Sequence[int] | None = None) -> None:
        """Phase 1 of a push: each shard receives its slices (all shards, or only ``shards``)."""
        unknown = [n for n in grads if n not in self.placement.by_name()]
        if unknown:
            raise KeyError(f"Unknown variable(s): {unknown}.")
        slices = split_gradients(self.placement, grads)
        targets = range(self.num_shards) if shards is None else shards
        futures = [self._pool.submit(self.links[i].call, "stage", worker_id, request_id, slices[i], timeout=10.0) for i in targets]
        for f in futures:
            f.result()

    def push(self, worker_id: str, request_id: str, step: int, grads: Mapping[str, Any]) -> PushResult:
        """Stage on every shard, then commit at the leader."""
        self.stage(worker_id, request_id, grads)
        return self.leader.push(worker_id, request_id, step)

    def pull(self, names: Sequence[str] = (), *, min_version: int = 0, timeout: float | None = 10.0) -> tuple[int, int, dict[str, np.ndarray]]:
        """Weights of one version from every shard (a shard behind is waited for)."""
        target = min_version
        for _ in range(8):
            replies = self._all("pull", lambda i: (tuple(names), target, timeout))
            versions = {r[0] for r in replies}
            if len(versions) == 1:
                version, iterations = replies[0][0], replies[0][1]
                return version, iterations, assemble(self.placement, [r[2] for r in replies], names)
            target = max(versions)  # an event was being committed: wait for the laggards
        raise ShardUnavailable(f"shards of optimizer '{self.key}' did not settle on one version")

    def layout(self) -> list[tuple[str, str, str]]:
        if self._layout is None:
            specs = [(v.name, v.shape, v.dtype) for v in self.placement.variables]
            self._layout = job_layout(self.config, specs)
        return self._layout

    def save_own_variables(self) -> dict[str, np.ndarray]:
        """The whole job's Keras store (equal to a single server's)."""
        with self.leader.lock:
            self.leader.quiesce()
            replies = self._all("save_own_variables", lambda i: ())
        return assemble_store(self.placement, self.layout(), [(store, names) for _, store, names in replies])

    def load_own_variables(self, store: Mapping[str, np.ndarray]) -> tuple[int, int]:
        layout = self.layout()
        if len(store) != len(layout):
            raise InvalidArgument(f"the store has {len(store)} entries; this optimizer has {len(layout)} variables")
        names = [r[2] for r in self._all("save_own_variables", lambda i: ())]
        stores = split_store(self.placement, layout, store, names)
        return self.leader.mutate("load_store", lambda i: {"store": stores[i]})

    def set_learning_rate(self, value: float) -> tuple[int, int]:
        return self.leader.mutate("learning_rate", lambda i: {"value": float(value)})

    def assign(self, kind: str, name: str, value: Any) -> tuple[int, int]:
        by_name = self.placement.by_name()
        if name in by_name:
            pieces = split_values(self.placement, {name: np.asarray(value)})
            v = by_name[name]
            if tuple(np.shape(value)) != v.shape:
                raise ValueError(f"The shape of the target variable and the shape of the target value in `variable.assign(value)` must match. variable.shape={v.shape}, Received: value.shape={np.shape(value)}. Target variable: {name}")
            return self.leader.mutate("assign", lambda i: {"kind": kind, "name": name, "pieces": pieces[i]})
        return self.leader.mutate("assign", lambda i: {"kind": kind, "name": name, "scalar": value})

    def finalize_variable_values(self) -> tuple[int, int]:
        return self.leader.mutate("finalize", lambda i: {})

    # -------------------------------------------------------------- checkpoints

    def checkpoint(self) -> JobCheckpoint:
        """One consistent cut: taken under the leader's lock, every shard at the same version."""
        with self.leader.lock:
            version, round_keys = self.leader.quiesce()
            snaps = self._all("snapshot", lambda i: (round_keys,))
            state = self.leader.leader_state()
        if {s.version for s in snaps} != {version}:
            raise FailedPrecondition(f"shards are not at version {version}: {[s.version for s in snaps]}")
        return JobCheckpoint(self.key, version, self.config, asdict(self.policy), self.placement.to_json(), state, snaps)

    def restore(self, ckpt: JobCheckpoint) -> tuple[int, int]:
        """Every shard to ``ckpt`` (re-split first when it was taken on another shard count)."""
        if ckpt.num_shards != self.num_shards:
            ckpt = resplit(ckpt, self.num_shards, self.min_piece_bytes)
        prepared = self._all("prepare_restore", lambda i: (ckpt.shards[i],))  # all or none (``sharding.restore``)
        with self.leader.lock:
            self._all("activate_restore", lambda i: (prepared[i],))
            self.leader.restore_state(ckpt.leader)
        self._layout = None
        return ckpt.version, ckpt.shards[0].iterations

    def replace_shard(self, index: int, snap: ShardSnapshot | None) -> ShardHost:
        """Simulate a restart of shard ``index`` (``--restore latest``: from ``snap``, or empty)."""
        host = self._new_host(index, self.num_shards)
        if snap is not None:
            host.restore(snap)
        self.links[index].host = host
        self.hosts[index] = host
        return host

    def close(self) -> None:
        self.leader.close()
        for h in self.hosts:
            h.close()
        self._pool.shutdown(wait=False)


# ---------------------------------------------------------------- assemble / re-split


def assemble_checkpoint(ckpt: JobCheckpoint) -> OptimizerSnapshot:
    """A cut as one single-server ``OptimizerSnapshot`` (variables, store and round assembled)."""
    placement = Placement.from_json(ckpt.placement)
    variables = assemble(placement, [s.variables for s in ckpt.shards])
    specs = [(v.name, v.shape, v.dtype) for v in placement.variables]
    layout = job_layout(ckpt.config, specs, ckpt.shards[0].exclusions)
    names_per_shard = [_store_names(s) for s in ckpt.shards]
    store = assemble_store(placement, layout, [(s.store, n) for s, n in zip(ckpt.shards, names_per_shard)])
    round_ = []
    for key in sorted({k for s in ckpt.shards for k in s.staged}):
        worker, request = key.split("\x00", 1)
        grads = _assemble_gradient(placement, [s.staged.get(key, {}) for s in ckpt.shards])
        round_.append(RoundContribution(worker, request, grads))
    return OptimizerSnapshot(
        key=ckpt.key,
        config=ckpt.config,
        initial_config=ckpt.config,
        policy=ckpt.policy,
        exclusions=ckpt.shards[0].exclusions,
        built=True,
        variables=variables,
        store=store,
        version=ckpt.version,
        iterations=ckpt.shards[0].iterations,
        dedup={w: [tuple(e) for e in entries] for w, entries in ckpt.leader.get("dedup", {}).items()},
        workers={w: dict(v) for w, v in ckpt.leader.get("workers", {}).items()},
        round=round_,
        last_closed=ckpt.leader.get("last_closed", ""),
        last_abort=ckpt.leader.get("last_abort", ""),
    )


def split_checkpoint(snap: OptimizerSnapshot, num_shards: int, min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES) -> JobCheckpoint:
    """A single-server snapshot (or an assembled cut) cut into ``num_shards`` shard snapshots."""
    specs = [(n, tuple(np.shape(a)), np.asarray(a).dtype.name) for n, a in snap.variables.items()]
    placement = place(specs, num_shards, min_piece_bytes)
    layout = job_layout(snap.config, specs, snap.exclusions)
    names_per_shard = [_shard_store_names(layout, placement, i) for i in range(num_shards)]
    stores = split_store(placement, layout, snap.store, names_per_shard)
    pieces = split_values(placement, snap.variables)
    staged: list[dict[str, dict[str, Any]]] = [{} for _ in range(num_shards)]
    for c in snap.round:
        grads = {n: RowSparseGradient(*g) if isinstance(g, tuple) else g for n, g in c.grads.items()}
        for i, slices in enumerate(split_gradients(placement, grads)):
            staged[i][f"{c.worker_id}\x00{c.request_id}"] = dict(slices)
    shards = [
        ShardSnapshot(
            key=snap.key, shard_index=i, num_shards=num_shards, config=dict(snap.config), policy=dict(snap.policy),
            exclusions=dict(snap.exclusions), placement=placement.to_json(), version=snap.version,
            iterations=snap.iterations, variables={k: np.array(v, order="C") for k, v in pieces[i].items()},
            store={k: np.array(v, order="C") for k, v in stores[i].items()}, staged=staged[i],
            store_names=names_per_shard[i],
        )  # fmt: skip
        for i in range(num_shards)
    ]
    leader = {
        "version": snap.version,
        "iterations": snap.iterations,
        "dedup": snap.dedup,
        "round": {c.worker_id: [c.request_id, snap.version] for c in snap.round},
        "last_closed": snap.last_closed,
        "last_abort": snap.last_abort,
        "workers": {w: dict(v) for w, v in snap.workers.items()},
    }
    return JobCheckpoint(snap.key, snap.version, dict(snap.config), dict(snap.policy), placement.to_json(), leader, shards)


def resplit(ckpt: JobCheckpoint, num_shards: int, min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES) -> JobCheckpoint:
    """A cut taken on one shard count, for another."""
    out = split_checkpoint(assemble_checkpoint(ckpt), num_shards, min_piece_bytes)
    out.leader = dict(ckpt.leader)
    return out


def _shard_store_names(layout: Sequence[tuple[str, str, str]], placement: Placement, shard: int) -> list[str]:
    """A shard engine's optimizer variable names: the job's, restricted to the variables it holds."""
    held = {v.name for v, _ in placement.on_shard(shard)}
    return [name for name, kind, var in layout if kind != "slot" or var in held]


def _store_names(snap: ShardSnapshot) -> list[str]:
    if snap.store_names:
        return list(snap.store_names)
    placement = Placement.from_json(snap.placement) if snap.placement else None
    assert placement is not None
    specs = [(v.name, v.shape, v.dtype) for v in placement.variables]
    return _shard_store_names(job_layout(snap.config, specs, snap.exclusions), placement, snap.shard_index)


def _assemble_gradient(placement: Placement, per_shard: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One worker's staged push from its per-shard slices (the inverse of ``split_gradients``)."""
    out: dict[str, Any] = {}
    for v in placement.variables:
        parts = [(p, per_shard[p.shard].get(v.name)) for p in v.pieces if v.name in per_shard[p.shard]]
        if not parts:
            continue
        if all(g is None for _, g in parts):
            out[v.name] = None
        elif isinstance(parts[0][1], RowSparseGradient):
            out[v.name] = (
                np.concatenate([np.asarray(g.indices) + p.row_start for p, g in parts]),
                np.concatenate([np.asarray(g.values) for _, g in parts]),
            )
        else:
            out[v.name] = np.concatenate([np.asarray(g) for _, g in parts]) if len(parts) > 1 else parts[0][1]
    return out
