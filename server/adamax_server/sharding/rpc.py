"""A shard server's state: the registry of its jobs, links to the other shards, and the cut store
(the ``ShardService`` servicer is in ``sharding.server``).

``adamax-ps serve --shard-index I --shards A0,A1,...`` runs a ``ShardRegistry``: the
``ShardHost`` of every optimizer of the job on this shard and, on shard 0, its ``Leader``. A
shard needs nothing but its index and the shard list: the leader reaches shard ``i`` at
``shards[i]`` (``GrpcLink``; itself directly), and placement follows from the variable list.

``ShardService.Call`` carries one method of the shard protocol (``_PUBLIC``, ``_LEADER``,
``_INTERNAL`` below) with its arguments encoded by ``shard_codec``; ``CallOnce`` is the same in
one message each way, which links and clients use for the small calls on every step's path
(``shard_codec.ONCE_METHODS``). Errors map to status codes
through ``errors.status_for`` like every other call; a link turns them back into the same
exceptions, and a shard that does not answer (UNAVAILABLE, DEADLINE_EXCEEDED without a domain
error) into ``ShardUnavailable``.

Checkpoints of a sharded job are *cuts* (``sharding.leader``): the leader holds the job still,
every shard writes its part under one id into its own directory
(``<dir>/sharded/<optimizer>/<id>/shard-<i>.{json,npz}``), and a restore loads one id on every
shard. ``--restore latest`` on a restarted shard loads its newest cut; if the other shards
moved on, the leader notices at the next event and restores the newest cut that every shard
holds (``auto_heal``), so the job is again at one cut; pushes acknowledged after that cut are
lost, exactly as on a single server restarted from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from adamax_wire import shard_codec as codec
from adamax_wire import tensors as _wire
from adamax_wire import pb

from adamax_server import errors as errs
from adamax_server.coordination.policy import Policy, PushResult, normalize_config as _normalize
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StateRestored,
    Unavailable,
)
from adamax_server.sharding import assembled, pairwise, restore as job_restore
from adamax_server.sharding import bulk as shard_bulk
from adamax_server.sharding.healing import Healer
from adamax_server.sharding.leader import Leader, ShardUnavailable
from adamax_server.sharding.placement import DEFAULT_MIN_PIECE_BYTES
from adamax_server.sharding.shard import PrepareReply, ShardHost, ShardSnapshot
from adamax_server.sharding.shard_engine import ClipDecision, ShardEngine
from adamax_server.sharding.split import job_layout

_log = logging.getLogger(__name__)

SERVICE = "adamax.v1.ShardService"
CALL_PATH = f"/{SERVICE}/Call"
ONCE_PATH = f"/{SERVICE}/CallOnce"

RECORDS = codec.Records(ClipDecision, PrepareReply, ShardSnapshot, PushResult, pairwise.Piece)

# Methods any caller may use; those only the leader (shard 0) answers; and those the leader
# sends to shards (any authenticated peer may, like every other call of the server).
_PUBLIC = {
    "create", "describe", "build", "stage", "pull", "save_own_variables", "status", "delete", "list_cuts",
    "exclude_from_weight_decay", "read_cut", "write_cut", "open_bulk",
}  # fmt: skip
_LEADER = {"push", "stage_push", "mutate_job", "checkpoint", "restore"} | assembled.LEADER_METHODS
_INTERNAL = {"prepare", "commit", "abort", "drop", "check", "mutate", "set_learning_rate", "save_cut", "state_version"} | assembled.INTERNAL_METHODS | job_restore.INTERNAL_METHODS
_HOST_METHODS = {
    "build", "stage", "pull", "save_own_variables", "prepare", "commit", "abort", "drop", "check", "mutate",
    "set_learning_rate", "exclude_from_weight_decay", "state_version",
}  # fmt: skip

_ERROR_TYPES: dict[str, type[BaseException]] = {
    c.__name__: c for c in vars(errs).values() if isinstance(c, type) and issubclass(c, errs.ServiceError)
}
_ERROR_TYPES.update({"ShardUnavailable": ShardUnavailable, "ValueError": ValueError, "KeyError": KeyError, "TypeError": TypeError})


def parse_shards(value: str | Sequence[str]) -> list[str]:
    """``"h0:50051,h1:50051"`` or a list -> the list of shard addresses."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [s.strip() for s in items if s.strip()]
    if not out:
        raise ValueError("the shard list is empty; pass --shards host0:port,host1:port,...")
    return out


# ---------------------------------------------------------------- links


def _call_frames(key: str, method: str, args: Any) -> list[bytes]:
    return _frames_of(key, method, *codec.encode(args))


def _frames_of(key: str, method: str, doc: str, tensors: list[tuple[str, Any]]) -> list[bytes]:
    frames = [_wire.header_frame(pb.ShardCallHeader(optimizer=key, method=method, args_json=doc, num_tensors=len(tensors)))]
    for name, value in tensors:
        frames.extend(_wire.tensor_frames(name, value))
    return frames


def _decode_call(frames: Iterator[Any]) -> tuple[Any, Any]:
    head, tensors = _wire.decode_stream(frames)
    if head.num_tensors != len(tensors):
        raise _wire.WireFormatError(f"shard call announced {head.num_tensors} tensors and carried {len(tensors)}")
    value = codec.decode(head.args_json, [t.value for t in tensors], RECORDS, sparse=RowSparseGradient)
    return head, value


# A shard link reconnects within seconds of the shard answering again: gRPC's default backoff
# grows to 120 s, so a shard back after a long outage would keep its job refused for minutes.
LINK_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                  ("grpc.max_reconnect_backoff_ms", 2000)]


class GrpcLink:
    """The leader's link to shard ``index`` for one optimizer, over a shared channel."""

    def __init__(self, index: int, target: str, key: str, channel: grpc.Channel, token: str | None = None) -> None:
        self.index = index
        self.target = target
        self.key = key
        # Shards authenticate to each other like any client (TokenAuthInterceptor).
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._call = channel.stream_stream(
            CALL_PATH,
            request_serializer=_wire.identity_serializer,
            response_deserializer=_wire.frame_deserializer(pb.ShardCallFrame),
        )
        self._once = channel.unary_unary(
            ONCE_PATH, request_serializer=_wire.identity_serializer, response_deserializer=pb.ShardCallBatch.FromString
        )
        self._once_ok = True  # False once the shard answered CallOnce UNIMPLEMENTED (an older server)

    def call(self, method: str, *args: Any, timeout: float) -> Any:
        doc, tensors = codec.encode(list(args))
        frames = _frames_of(self.key, method, doc, tensors)
        try:
            if self._once_ok and codec.call_once(method, tensors):
                try:
                    reply = self._once(codec.batch_bytes(frames), timeout=timeout, metadata=self._metadata)
                    return _decode_call(iter(reply.frames))[1]
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._once_ok = False
            _, value = _decode_call(self._call(iter(frames), timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise link_error(exc, self.index, self.target) from None
        return value


def link_error(exc: grpc.RpcError, index: int, target: str) -> BaseException:
    """The exception a shard raised, rebuilt from its status; ShardUnavailable if it did not answer."""
    metadata = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    etype = metadata.get(errs.ERROR_TYPE_KEY)
    version = metadata.get(errs.CURRENT_VERSION_KEY)
    details = exc.details() if hasattr(exc, "details") else str(exc)
    code = exc.code() if hasattr(exc, "code") else None
    if etype is None:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return ShardUnavailable(f"shard {index} ({target}) did not answer: {code.name}: {details}")
        return errs.ServiceError(f"shard {index} ({target}): {details}")
    cls = _ERROR_TYPES.get(etype, errs.ServiceError)
    if issubclass(cls, errs.ServiceError):
        return cls(details, current_version=int(version) if version is not None else None)
    return cls(details)


class _SelfLink:
    """The leader's own shard: a direct call, in the leader's thread (``inline``)."""

    inline = True

    def __init__(self, index: int, registry: ShardRegistry, key: str) -> None:
        self.index = index
        self._registry = registry
        self._key = key

    def call(self, method: str, *args: Any, timeout: float) -> Any:
        return self._registry.dispatch(self._key, method, list(args))


# ---------------------------------------------------------------- the registry


class ShardRegistry:
    """Every optimizer's state on this shard (and the leaders, on shard 0)."""

    def __init__(
        self,
        shard_index: int,
        shards: Sequence[str],
        *,
        device: str = "auto",
        min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
        staging_ttl: float = 300.0,
        call_timeout: float = 10.0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_cuts: int = 5,
        link_credentials: grpc.ChannelCredentials | None = None,
        link_token: str | None = None,
        auto_heal: bool = True,
        metrics: Any = None,
    ) -> None:
        self.shards = parse_shards(shards)
        if not 0 <= shard_index < len(self.shards):
            raise ValueError(f"--shard-index must be in [0, {len(self.shards)}). Received: {shard_index}")
        self.shard_index = shard_index
        self.device = device
        self.min_piece_bytes = min_piece_bytes
        self.staging_ttl = staging_ttl
        self.call_timeout = call_timeout
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.keep_cuts = keep_cuts
        self.auto_heal = auto_heal
        self.metrics = metrics  # ops.metrics.ServerMetrics (observe_shard), or None
        self._link_credentials = link_credentials
        self._link_token = link_token
        self._lock = threading.RLock()
        self._hosts: dict[str, ShardHost] = {}
        self._leaders: dict[str, Leader] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._closed = False
        self.bulk: Any = None  # this shard's bulk channel (transport.bulk.BulkServer), if open
        self.healer = Healer(self)  # the leader's heals after a shard restart (sharding.healing)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def set_shards(self, shards: Sequence[str]) -> None:
        """Replace the shard list before any optimizer exists (servers bound to port 0 in tests)."""
        shards = parse_shards(shards)
        with self._lock:
            if self._hosts:
                raise FailedPrecondition("the shard list cannot change while optimizers exist")
            if len(shards) != len(self.shards):
                raise ValueError(f"expected {len(self.shards)} shard addresses, got {len(shards)}")
            self.shards = shards

    @property
    def is_leader(self) -> bool:
        return self.shard_index == 0

    def _factory(self, cfg: Any) -> ShardEngine:
        return ShardEngine.from_config(dict(cfg), device=self.device)

    def _channel(self, target: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(target)
            if channel is None:
                options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
                           *LINK_RECONNECT]
                if self._link_credentials is None:
                    channel = grpc.insecure_channel(target, options=options)
                else:
                    channel = grpc.secure_channel(target, self._link_credentials, options=options)
                self._channels[target] = channel
            return channel

    def _links(self, key: str) -> list[Any]:
        return [
            _SelfLink(i, self, key) if i == self.shard_index else GrpcLink(i, t, key, self._channel(t), self._link_token)
            for i, t in enumerate(self.shards)
        ]

    # -------------------------------------------------------------- optimizers

    def create(self, key: str, config: dict[str, Any], policy: dict[str, Any]) -> bool:
        if not key:
            raise InvalidArgument("`optimizer` (the key of the optimizer on the server) must be a non-empty string.")
        config = dict(config)
        if config.get("name") is None:
            config["name"] = key
        normalized = _normalize(self._factory(config).get_config())  # Keras-style ValueError on a bad config
        pol = Policy(**policy)
        with self._lock:
            self._require_open()
            existing = self._hosts.get(key)
            if existing is not None:
                if _normalize(existing.config) != normalized or Policy(**existing.policy) != pol:
                    raise AlreadyExists(f"optimizer '{key}' already exists with a different config or coordination policy")
                return False
            self._add(key, normalized, pol)
            return True

    def _add(self, key: str, config: dict[str, Any], policy: Policy) -> ShardHost:
        host = ShardHost(
            key, self.shard_index, self.num_shards, self._factory, config, asdict(policy),
            min_piece_bytes=self.min_piece_bytes, staging_ttl=self.staging_ttl,
        )  # fmt: skip
        self._hosts[key] = host
        if self.is_leader:
            self._leaders[key] = Leader(
                key, policy, config, self._links(key), lambda: self._hosts[key].placement, call_timeout=self.call_timeout
            )
        return host

    def host(self, key: str) -> ShardHost:
        with self._lock:
            self._require_open()
            host = self._hosts.get(key)
        if host is None:
            raise NotFound(f"no optimizer named '{key}' on shard {self.shard_index}. Existing: {sorted(self._hosts)}")
        return host

    def leader(self, key: str) -> Leader:
        if not self.is_leader:
            raise FailedPrecondition(
                f"this is shard {self.shard_index}; the leader of the job is shard 0 ({self.shards[0]})"
            )
        self.host(key)
        return self._leaders[key]

    def delete(self, key: str) -> bool:
        with self._lock:
            host = self._hosts.pop(key, None)
            leader = self._leaders.pop(key, None)
        if leader is not None:
            leader.close()
        if host is not None:
            host.close()
        if self.bulk is not None:
            self.bulk.release_arenas()  # its shared-memory pull segment goes with it
        return host is not None

    def describe(self, key: str) -> dict[str, Any]:
        host = self.host(key)
        status = host.status()
        placement = host.placement
        out = {
            "shard_index": self.shard_index,
            "shards": list(self.shards),
            "config": dict(host.config),
            "policy": dict(host.policy),
            "built": host.built,
            "version": status["version"],
            "iterations": status["iterations"],
            "learning_rate": status["learning_rate"],
            "bytes": status["bytes"],
            "min_piece_bytes": self.min_piece_bytes,
            "placement": placement.to_json() if placement else None,
            "layout": job_layout(host.config, [(v.name, v.shape, v.dtype) for v in placement.variables]) if placement else [],
            "store_names": host.store_names() if host.built else [],
            "stage_push": True,  # the leader takes a push's last stage with its commit (bulk `commit`, `stage_push`)
        }
        if self.is_leader:
            out["leader"] = self._leaders[key].status()
        return out

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            keys = sorted(self._hosts)
        return [{"optimizer": k, **self._hosts[k].status()} for k in keys]

    # -------------------------------------------------------------- the protocol

    def dispatch(self, key: str, method: str, args: list[Any]) -> Any:
        result = self._dispatch(key, method, args)
        if self.metrics is not None and method in ("build", "commit", "mutate", "activate_restore", "stage", "push", "stage_push"):
            self._observe(key)
        return result

    def _observe(self, key: str) -> None:
        try:
            held, version, staged = self.host(key).gauges()  # without the shard's lock
            # Without the leader's lock: the leader commits on its own shard while holding it.
            lagging = self._leaders[key].lagging_count if key in self._leaders else None
            self.metrics.observe_shard(key, self.shard_index, held, version, staged, lagging)
        except Exception:  # noqa: BLE001 - metrics never fail a call
            _log.debug("shard metrics of '%s' failed", key, exc_info=True)

    def _dispatch(self, key: str, method: str, args: list[Any]) -> Any:
        if method not in _PUBLIC | _LEADER | _INTERNAL:
            raise InvalidArgument(f"unknown shard method {method!r}")
        if method == "create":
            return self.create(key, *args)
        if method == "describe":
            return self.describe(key)
        if method == "open_bulk":  # a ticket for this shard's bulk channel (sharding.bulk)
            return shard_bulk.open_bulk(self, key, args)
        if method == "status":
            return self.status()
        if method == "delete":
            return self.delete(key)
        if method == "build":
            return self.host(key).build(*args).to_json()
        if method in _HOST_METHODS:
            return getattr(self.host(key), method)(*args)
        if method == "push":
            return self.push(key, *args)
        if method == "stage_push":  # a push's last stage on the leader's own shard, and its commit
            worker_id, request_id, grads, step = args
            self.leader(key)  # only the leader commits: refused before anything is staged
            self.dispatch(key, "stage", [worker_id, request_id, grads])
            return self.push(key, worker_id, request_id, step)
        if method == "mutate_job":
            op, per_shard = args
            if len(per_shard) != self.num_shards:
                raise InvalidArgument(f"mutation carries parts for {len(per_shard)} shards; the job has {self.num_shards}")
            return self.leader(key).mutate(op, lambda i: per_shard[i])
        if method in assembled.LEADER_METHODS | assembled.INTERNAL_METHODS:
            return assembled.dispatch(self, key, method, args)
        if method in job_restore.INTERNAL_METHODS:
            return job_restore.dispatch(self, key, method, args)
        if method == "checkpoint":
            return self.checkpoint(key)
        if method == "restore":
            return self.restore(key, *args)
        if method == "list_cuts":
            return self.list_cuts(key)
        if method == "save_cut":
            return self.save_cut(key, *args)
        if method == "read_cut":  # download: this shard's part of a cut
            return list(self.read_part(key, args[0]))
        if method == "write_cut":  # upload: this shard's part of a re-split cut
            cut_id, snap, state = args
            if not isinstance(snap, ShardSnapshot) or snap.shard_index != self.shard_index or snap.num_shards != self.num_shards:
                raise InvalidArgument(f"this is shard {self.shard_index} of {self.num_shards}; the part does not fit")
            write_cut(self._cut_dir(key, cut_id), self.shard_index, snap, state)
            return cut_id
        raise InvalidArgument(f"unknown shard method {method!r}")  # pragma: no cover

    def push(self, key: str, worker_id: str, request_id: str, step: int) -> PushResult:
        leader = self.leader(key)
        seen = self.healer.last(key)
        try:
            return leader.push(worker_id, request_id, int(step))
        except FailedPrecondition:
            healed = self.healer.heal_if_broken(key, seen)  # by this push, or by another caller meanwhile
            if healed is None:
                raise
            what, version = healed
            raise StateRestored(
                f"shard restart detected: optimizer '{key}' was restored on every shard to {what} "
                f"(version {version}); pushes acknowledged after it are lost. Pull and push again.",
                current_version=version,
            ) from None

    @property
    def closed(self) -> bool:
        return self._closed

    def leaders(self) -> list[tuple[str, Leader]]:
        """(key, leader) of every job this shard sequences (shard 0's)."""
        with self._lock:
            return list(self._leaders.items())

    # -------------------------------------------------------------- cuts

    def _cut_dir(self, key: str, cut_id: str) -> Path:
        if self.checkpoint_dir is None:
            raise FailedPrecondition(f"shard {self.shard_index} has no checkpoint directory (--checkpoint-dir)")
        if not cut_id or "/" in cut_id or cut_id.startswith("."):
            raise InvalidArgument(f"bad checkpoint id {cut_id!r}")
        return self.checkpoint_dir / "sharded" / key / cut_id

    def checkpoint(self, key: str) -> dict[str, Any]:
        """(Leader) One consistent cut of the job: every shard writes its part under one id."""
        leader = self.leader(key)
        links = self._links(key)
        with leader.lock:
            version, round_keys = leader.quiesce()
            cut_id = f"{int(time.time() * 1000):013d}-v{version:010d}-{uuid.uuid4().hex[:6]}"
            state = leader.leader_state()
            for i, link in enumerate(links):  # shard 0 last: its file marks the cut complete
                if i:
                    got = link.call("save_cut", cut_id, round_keys, None, version, timeout=self.call_timeout)
                    if got != version:
                        raise FailedPrecondition(f"shard {i} wrote version {got} for cut at {version}")
            self.save_cut(key, cut_id, round_keys, state)
        return {"id": cut_id, "version": version, "shards": self.num_shards}

    def save_cut(self, key: str, cut_id: str, round_keys: list[Any], leader_state: dict[str, Any] | None,
                 version: int | None = None) -> int:
        host = self.host(key)
        snap = host.snapshot([tuple(k) for k in round_keys])
        if version is not None and snap.version != version:  # it restarted: no part, nothing pruned
            raise FailedPrecondition(f"shard {self.shard_index} is at version {snap.version}, not the cut's {version}")
        write_cut(self._cut_dir(key, cut_id), self.shard_index, snap, leader_state)
        self._prune(key)
        return snap.version

    def read_part(self, key: str, cut_id: str) -> tuple[ShardSnapshot, dict[str, Any] | None]:
        return read_cut(self._cut_dir(key, cut_id), self.shard_index)

    def list_cuts(self, key: str) -> list[str]:
        """Cut ids this shard holds for ``key``, oldest first."""
        if self.checkpoint_dir is None:
            return []
        root = self.checkpoint_dir / "sharded" / key
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / f"shard-{self.shard_index}.json").is_file())

    def _prune(self, key: str) -> None:
        cuts = self.list_cuts(key)
        for old in cuts[: max(0, len(cuts) - self.keep_cuts)]:
            d = self._cut_dir(key, old)
            for f in d.glob(f"shard-{self.shard_index}.*"):
                f.unlink(missing_ok=True)
            try:
                d.rmdir()
            except OSError:
                pass

    def _load_snapshot(self, key: str, snap: ShardSnapshot) -> tuple[int, int]:
        if snap.num_shards != self.num_shards:
            raise FailedPrecondition(
                f"checkpoint was taken on {snap.num_shards} shards; this job has {self.num_shards} "
                "(download it assembled and upload it to re-split)"
            )
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                host = self._add(key, dict(snap.config), Policy(**snap.policy))
        return host.restore(snap)

    def restore(self, key: str, cut_id: str = "latest") -> dict[str, Any]:
        """(Leader) Every shard loads cut ``cut_id`` (``latest``: the newest all of them hold)."""
        leader = self.leader(key)
        links = self._links(key)
        if cut_id == "latest":
            common = job_restore.common_cuts(self, key, links)
            if not common:
                raise NotFound(f"no checkpoint of optimizer '{key}' is held by every shard")
            cut_id = max(common)
        _, state = read_cut(self._cut_dir(key, cut_id), self.shard_index)
        assert state is not None
        again = f"run `adamax-ps checkpoint restore {cut_id} --target <every shard>` again"
        job_restore.restore_job(self, key, lambda i: ("cut", cut_id), state, f"checkpoint {cut_id}", again=again)
        return {"id": cut_id, "version": leader.version}

    def restore_latest_on_start(self) -> list[tuple[str, str]]:
        """``--restore latest``: load this shard's newest cut of every optimizer on disk."""
        out = []
        root = None if self.checkpoint_dir is None else self.checkpoint_dir / "sharded"
        if root is None or not root.is_dir():
            return out
        for key_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            cuts = self.list_cuts(key_dir.name)
            if not cuts:
                continue
            snap, state = read_cut(self._cut_dir(key_dir.name, cuts[-1]), self.shard_index)
            self._load_snapshot(key_dir.name, snap)
            if self.is_leader and state is not None:
                self._leaders[key_dir.name].restore_state(state)
                self._leaders[key_dir.name].verify_shards_first()  # the others may have moved on
            out.append((key_dir.name, cuts[-1]))
        return out

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("the parameter server is shutting down")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            hosts, leaders = list(self._hosts.values()), list(self._leaders.values())
            channels = list(self._channels.values())
        for leader in leaders:
            leader.close()
        for host in hosts:
            host.close()
        for channel in channels:
            channel.close()


# ---------------------------------------------------------------- cut files


def write_cut(directory: Path, shard_index: int, snap: ShardSnapshot, leader_state: dict[str, Any] | None) -> None:
    """This shard's part of a cut: JSON structure + an .npz of its arrays, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    doc, tensors = codec.encode({"snapshot": snap, "leader": leader_state})
    arrays: dict[str, np.ndarray] = {}
    kinds = []
    for name, value in tensors:
        if isinstance(value, tuple):  # row-sparse
            arrays[f"t{name}_i"] = np.asarray(value[0])
            arrays[f"t{name}_v"] = np.asarray(value[1])
            kinds.append("sparse")
        else:
            arrays[f"t{name}"] = np.asarray(value)
            kinds.append("dense")
    npz = directory / f"shard-{shard_index}.npz"
    tmp = directory / f".shard-{shard_index}.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, npz)
    meta = directory / f"shard-{shard_index}.json"
    tmp_meta = directory / f".shard-{shard_index}.json.tmp"
    tmp_meta.write_text(json.dumps({"format": 1, "doc": doc, "kinds": kinds}))
    os.replace(tmp_meta, meta)  # last: a cut part is complete once its JSON exists


def read_cut(directory: Path, shard_index: int) -> tuple[ShardSnapshot, dict[str, Any] | None]:
    meta_path = directory / f"shard-{shard_index}.json"
    if not meta_path.is_file():
        raise NotFound(f"checkpoint {directory.name} has no part for shard {shard_index}")
    meta = json.loads(meta_path.read_text())
    with np.load(directory / f"shard-{shard_index}.npz", allow_pickle=False) as z:
        tensors: list[Any] = []
        for k, kind in enumerate(meta["kinds"]):
            if kind == "sparse":
                tensors.append(_wire.RowSparseGradient(z[f"t{k}_i"], z[f"t{k}_v"]))
            else:
                tensors.append(z[f"t{k}"])
    value = codec.decode(meta["doc"], tensors, RECORDS, sparse=RowSparseGradient)
    return value["snapshot"], value["leader"]
