"""Operations on the assembled job, done by the leader: download, upload, ``stateless_apply``.

The checkpoint tools and ``CheckpointClient(shard_list)`` see a sharded job as one job in the
single-server checkpoint format (``storage.checkpoint``: a manifest with a sha256 per tensor
and a file of tensors per optimizer). Both ask the leader (shard 0), which does the assembling
and re-splitting in one place:

* ``download(checkpoint_id, optimizers)``: ``""`` is the live state, taken as an in-memory cut
  (the leader holds the job still and every shard snapshots its part at one version, as for a
  stored cut, but nothing is written); ``"latest"`` or an id is a stored cut every shard holds.
  Each optimizer's cut is assembled (``job.assemble_checkpoint``) and the whole set encoded
  exactly as a single server encodes its optimizers, so the assembled Keras store, variables,
  open round and exactly-once table equal those of the unsharded job.
* ``upload(manifest, files, save, restore)``: the manifest and every checksum are verified
  first; each optimizer is then re-split onto this job's shard count (``job.split_checkpoint``,
  placement recomputed for it); ``save`` writes it as a cut on every shard (shard 0 last, as a
  cut is written), ``restore`` loads it on every shard under the leader's lock (from memory,
  so a job without ``--checkpoint-dir`` can restore an upload too), every shard or none
  (``sharding.restore``).
* ``stateless_apply``: a pure function of the job's config and exclusions and of the values
  the caller sends (the job's own state is not used and not changed), so the leader computes
  it with a whole-job engine built for the call, the same engine a single server runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adamax_server.coordination.snapshot import OptimizerSnapshot
from adamax_server.errors import FailedPrecondition, InvalidArgument, NotFound
from adamax_server.optim.engine import Adamax
from adamax_server.sharding import restore as job_restore
from adamax_server.sharding.job import JobCheckpoint, assemble_checkpoint, split_checkpoint
from adamax_server.sharding.placement import Placement
from adamax_server.storage.checkpoint import LATEST, check_manifest, decode, encode, verify_tensors

#: A leader-to-shard call that moves a shard's whole part gets ``--shard-call-timeout`` plus
#: this many seconds per byte of the part (variables, two slots, an EMA copy: 4x the shard's
#: model bytes) at a floor rate of 50 MB/s: long enough for a large part, short enough that a
#: partitioned shard does not hold the job's lock for long.
_SECONDS_PER_BYTE = 1 / 50e6

#: Methods of ``ShardService.Call`` served here (``rpc.ShardRegistry.dispatch``).
LEADER_METHODS = {"download", "upload", "stateless_apply"}
INTERNAL_METHODS = {"snapshot"}


def dispatch(registry: Any, key: str, method: str, args: list[Any]) -> Any:
    if method == "download":
        return download(registry, *args)
    if method == "upload":
        return upload(registry, *args)
    if method == "stateless_apply":
        return stateless_apply(registry, key, *args)
    if method == "snapshot":  # this shard's part of a live cut
        return registry.host(key).snapshot([tuple(k) for k in args[0]])
    raise InvalidArgument(f"unknown shard method {method!r}")  # pragma: no cover


def _part_timeout(registry: Any, placement: Placement | None, shard: int) -> float:
    nbytes = placement.shard_bytes()[shard] if placement is not None else 0
    return float(registry.call_timeout) + 4 * nbytes * _SECONDS_PER_BYTE


def _require_leader(registry: Any) -> None:
    if not registry.is_leader:
        raise FailedPrecondition(
            f"this is shard {registry.shard_index}; the leader of the job is shard 0 ({registry.shards[0]})"
        )


# ---------------------------------------------------------------- download


def _keys(registry: Any, optimizers: Sequence[str]) -> list[str]:
    existing = [row["optimizer"] for row in registry.status()]
    for key in optimizers:
        if key not in existing:
            raise NotFound(f"no optimizer named '{key}'. Existing: {existing}")
    return list(optimizers) or existing


def _live_cut(registry: Any, key: str) -> JobCheckpoint:
    leader = registry.leader(key)
    links = registry._links(key)
    with leader.lock:
        version, round_keys = leader.quiesce()
        placement = registry.host(key).placement
        parts = [link.call("snapshot", round_keys, timeout=_part_timeout(registry, placement, i)) for i, link in enumerate(links)]
        state = leader.leader_state()
    if {p.version for p in parts} != {version}:
        raise FailedPrecondition(f"shards are not at version {version}: {[p.version for p in parts]}")
    return JobCheckpoint(key, version, parts[0].config, parts[0].policy, parts[0].placement or {}, state, parts)


def _stored_cut(registry: Any, key: str, checkpoint_id: str) -> tuple[str, JobCheckpoint]:
    links = registry._links(key)
    held = [set(link.call("list_cuts", timeout=registry.call_timeout)) for link in links]
    common = sorted(set.intersection(*held))
    wanted = (common[-1] if common else "") if checkpoint_id == LATEST else checkpoint_id
    if wanted not in common:
        raise NotFound(f"optimizer '{key}': no checkpoint {wanted or 'at all'} is held by every shard")
    placement = registry.host(key).placement
    # Not under the job's lock, and the cut's parts may be larger than today's: a generous deadline.
    parts = [link.call("read_cut", wanted, timeout=max(300.0, _part_timeout(registry, placement, i)))
             for i, link in enumerate(links)]  # fmt: skip
    snaps, state = [p[0] for p in parts], parts[0][1]
    first = snaps[0]
    return wanted, JobCheckpoint(key, int(state["version"]), first.config, first.policy, first.placement or {}, state, snaps)


def _unbuilt(ckpt: JobCheckpoint) -> OptimizerSnapshot:
    first = ckpt.shards[0]
    return OptimizerSnapshot(
        key=ckpt.key, config=dict(first.config), initial_config=dict(first.config), policy=dict(first.policy),
        exclusions=dict(first.exclusions), built=False, variables={}, store={}, version=ckpt.version,
        iterations=first.iterations,
    )  # fmt: skip


def download(registry: Any, checkpoint_id: str = "", optimizers: Sequence[str] = ()) -> list[Any]:
    """[checkpoint id, manifest, files] of the assembled job (see the module docstring)."""
    _require_leader(registry)
    snaps, used = [], checkpoint_id or "live"
    for key in _keys(registry, optimizers):
        if checkpoint_id:
            used, ckpt = _stored_cut(registry, key, checkpoint_id)
        else:
            ckpt = _live_cut(registry, key)
        snaps.append(assemble_checkpoint(ckpt) if ckpt.placement else _unbuilt(ckpt))
    reason = "download" if not checkpoint_id else f"download of cut {used}"
    manifest, files = encode(snaps, used, reason)
    return [used, manifest, files]


# ---------------------------------------------------------------- upload


def _cut_id(version: int) -> str:
    return f"{int(time.time() * 1000):013d}-v{version:010d}-{uuid.uuid4().hex[:6]}"


def upload(
    registry: Any, manifest: Mapping[str, Any], files: Mapping[str, Mapping[str, np.ndarray]],
    save: bool = True, restore: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Verify, re-split onto this job's shards, then save as a cut and/or restore on every shard."""
    _require_leader(registry)
    check_manifest(manifest, "uploaded checkpoint")
    # An optimizer without tensors (not built) has no file on the wire.
    files = {**{opt["file"]: {} for opt in manifest["optimizers"]}, **files}
    for opt in manifest["optimizers"]:
        verify_tensors(opt, files[opt["file"]], f"uploaded checkpoint, optimizer '{opt['key']}'")
    if not (save or restore):
        return {"checkpoint_id": "", "optimizers": [], "restored": []}
    snaps = decode(manifest, files)
    cut_id = _cut_id(max((s.version for s in snaps), default=0))
    saved, restored = [], []
    for snap in snaps:
        if not snap.built:  # created (not built) on every shard; nothing to cut or load
            existing = {row["optimizer"]: row for row in registry.status()}.get(snap.key)
            if restore and existing is not None and existing["built"]:
                raise FailedPrecondition(
                    f"optimizer '{snap.key}' is built on this job; the checkpoint holds it unbuilt "
                    "(delete the optimizer first to restore it)"
                )
            for link in registry._links(snap.key):
                link.call("create", dict(snap.initial_config), dict(snap.policy), timeout=registry.call_timeout)
            if restore:
                restored.append([snap.key, 0, 0])
            continue
        ckpt = split_checkpoint(snap, registry.num_shards, registry.min_piece_bytes)
        placement = Placement.from_json(ckpt.placement)
        links = registry._links(snap.key)
        if save:
            for i in [*range(1, registry.num_shards), 0]:  # shard 0 last: its part marks the cut complete
                links[i].call("write_cut", cut_id, ckpt.shards[i], ckpt.leader if i == 0 else None,
                              timeout=_part_timeout(registry, placement, i))  # fmt: skip
            saved.append({"optimizer": snap.key, "version": snap.version, "iterations": snap.iterations})
        if restore:  # every shard or none (``sharding.restore``)
            parts = ckpt.shards
            got = job_restore.restore_job(
                registry, snap.key, lambda i: ("snapshot", parts[i]), ckpt.leader,
                f"the uploaded checkpoint (version {snap.version})" + (f", saved as cut {cut_id}" if save else ""),
                timeout_for=lambda i: _part_timeout(registry, placement, i), config=dict(snap.config),
                policy=dict(snap.policy),
                again=(f"restore cut {cut_id} (adamax-ps checkpoint restore {cut_id} --target <every shard>) or "
                       "upload the checkpoint again" if save else "upload the checkpoint again"),
            )  # fmt: skip
            restored.append([snap.key, got["version"], snap.iterations])
    return {"checkpoint_id": cut_id if save else "", "optimizers": saved, "restored": restored}


# ---------------------------------------------------------------- stateless_apply


def stateless_apply(
    registry: Any, key: str, optimizer_variables: Sequence[Any], grads: Sequence[Any], trainable_variables: Sequence[Any]
) -> list[Any]:
    """[new trainable values, new optimizer variables], computed as a single server would."""
    _require_leader(registry)
    host = registry.host(key)
    placement = host.placement
    if placement is None:
        raise ValueError(
            "To call `stateless_apply`, Adamax must be built (i.e. its variables must have "
            "been created). You can build it via `optimizer.build(trainable_variables)`."
        )
    config, exclusions = host.engine_settings()
    engine = Adamax.from_config(config, device=registry.device)
    if exclusions.get("var_list") or exclusions.get("var_names"):
        engine.exclude_from_weight_decay(var_list=exclusions.get("var_list") or None,
                                         var_names=exclusions.get("var_names") or None)  # fmt: skip
    engine.build({v.name: np.zeros(v.shape, dtype=np.dtype(v.dtype)) for v in placement.variables})
    new_trainable, new_optimizer = engine.stateless_apply(list(optimizer_variables), list(grads), list(trainable_variables))
    return [list(new_trainable), list(new_optimizer)]
