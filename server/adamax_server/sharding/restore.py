"""Restoring a sharded job: every shard to one state, or none of them.

A restore (``checkpoint restore``, an upload with ``restore``, the leader's automatic heal after
a shard restart) replaces the whole state of every shard. It runs in two phases, driven by the
leader (shard 0):

1. *stage*: every shard reads its part (a stored cut, or the part of an uploaded job sent to
   it), checks it and builds the engine it will run, without changing anything it serves
   (``ShardHost.prepare_restore``). If any shard fails (unreachable, no such cut, a part that
   does not load), the staged parts are dropped and **the job is left as it was**: the error
   names the shard that failed, and nothing changed anywhere.
2. *activate*, under the job's lock: every shard swaps its staged part in (in memory; nothing
   left that can fail but the shard itself). If a shard dies between the phases, the shards
   that activated are at the cut and the others are not: the leader then marks the job
   *broken* and refuses every push, change and checkpoint with ``FAILED_PRECONDITION`` naming
   the shard and the way back, until a restore completes on every shard. The leader keeps the
   interrupted restore and retries it (both phases) on the next push once every shard answers
   (``resume``), or the operator runs it again (``adamax-ps checkpoint restore ID --target
   ...`` / the upload).

Pulls go to the shards directly: in the broken window they see shards at different versions
and fail with "did not settle on one version" (or wait for a version a shard does not reach)
instead of assembling a mix.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from adamax_server.coordination.policy import Policy
from adamax_server.errors import FailedPrecondition, InvalidArgument, ServiceError, Unavailable
from adamax_server.sharding.shard import PreparedRestore, ShardHost, ShardSnapshot

_log = logging.getLogger(__name__)

#: Methods of ``ShardService.Call`` the leader sends to every shard (``rpc.ShardRegistry.dispatch``).
INTERNAL_METHODS = {"stage_restore", "activate_restore", "drop_restore"}

Source = Callable[[int], tuple[str, Any]]  # shard -> ("cut", cut id) | ("snapshot", ShardSnapshot)


def _pending(registry: Any) -> dict[str, tuple[str, PreparedRestore]]:
    """Per optimizer: the restore staged on this shard (token, prepared state); one at a time."""
    if not hasattr(registry, "_staged_restores"):
        registry._staged_restores = {}
    return registry._staged_restores  # type: ignore[no-any-return]


def _resumable(registry: Any) -> dict[str, Callable[[], dict[str, Any]]]:
    """Per optimizer (on the leader): an interrupted restore to run again."""
    if not hasattr(registry, "_resume_restores"):
        registry._resume_restores = {}
    return registry._resume_restores  # type: ignore[no-any-return]


def dispatch(registry: Any, key: str, method: str, args: list[Any]) -> Any:
    if method == "stage_restore":
        kind, source, token = args
        if kind == "cut":
            snap, _ = registry.read_part(key, str(source))
        elif kind == "snapshot" and isinstance(source, ShardSnapshot):
            snap = source
        else:
            raise InvalidArgument(f"stage_restore of {kind!r}: expected a cut id or a shard snapshot")
        return stage(registry, key, snap, str(token))
    if method == "activate_restore":
        return activate(registry, key, str(args[0]))
    if method == "drop_restore":
        got = _pending(registry).get(key)
        if got is not None and got[0] == args[0]:
            del _pending(registry)[key]
        return None
    raise InvalidArgument(f"unknown shard method {method!r}")  # pragma: no cover


def stage(registry: Any, key: str, snap: ShardSnapshot, token: str) -> int:
    """Phase 1 on this shard: build ``snap``'s state aside; returns its version."""
    if snap.num_shards != registry.num_shards or snap.shard_index != registry.shard_index:
        raise FailedPrecondition(
            f"the part is shard {snap.shard_index} of {snap.num_shards}; this is shard {registry.shard_index} of "
            f"{registry.num_shards} (download the job assembled and upload it to re-split)"
        )
    host = registry._hosts.get(key) or ShardHost(
        key, registry.shard_index, registry.num_shards, registry._factory, dict(snap.config), dict(snap.policy),
        min_piece_bytes=registry.min_piece_bytes, staging_ttl=registry.staging_ttl,
    )  # fmt: skip
    _pending(registry)[key] = (token, host.prepare_restore(snap))
    return snap.version


def activate(registry: Any, key: str, token: str) -> tuple[int, int]:
    """Phase 2 on this shard: swap the staged state in (the host is created if it is new)."""
    got = _pending(registry).get(key)
    if got is None or got[0] != token:
        raise FailedPrecondition(
            f"shard {registry.shard_index} holds no staged restore {token} of optimizer '{key}' (it restarted, "
            "or another restore replaced it)"
        )
    del _pending(registry)[key]
    prepared = got[1]
    with registry._lock:
        host = registry._hosts.get(key)
        if host is None:
            host = registry._add(key, dict(prepared.snap.config), Policy(**prepared.snap.policy))
    return host.activate_restore(prepared)


def restore_job(registry: Any, key: str, source: Source, leader_state: dict[str, Any], label: str, *,
                timeout_for: Callable[[int], float] | None = None, config: dict[str, Any] | None = None,
                policy: dict[str, Any] | None = None, again: str = "") -> dict[str, Any]:  # fmt: skip
    """(Leader) Restore every shard of ``key`` to one state, or none (see the module docstring).

    ``source(i)``: what shard ``i`` loads; ``label``: what it is, for messages ("checkpoint X");
    ``again``: how an operator runs it again. ``config``/``policy`` create the optimizer on the
    leader if this job does not have it yet (an upload).
    """
    timeout_for = timeout_for or (lambda i: float(registry.call_timeout))
    if key not in registry._hosts and config is not None and policy is not None:
        with registry._lock:
            if key not in registry._hosts:
                registry._add(key, dict(config), Policy(**policy))
    leader = registry.leader(key)
    links = registry._links(key)
    token = uuid.uuid4().hex
    staged: list[int] = []
    for i, link in enumerate(links):
        try:
            link.call("stage_restore", *source(i), token, timeout=timeout_for(i))
        except Exception as exc:  # noqa: BLE001 - reported below with the shard's index
            for j in staged:
                try:
                    links[j].call("drop_restore", token, timeout=registry.call_timeout)
                except Exception:  # noqa: BLE001 - a later restore replaces it anyway
                    _log.debug("shard %d kept staged restore %s of '%s'", j, token, key)
            broken = leader.status()["broken"]
            state = (f"the job is still refused: {broken}" if broken
                     else f"nothing changed on any shard (the job stays at version {leader.version}). Bring shard {i} "
                          f"back and {again}")  # fmt: skip
            raise _shard_error(exc, f"restore of optimizer '{key}' to {label} was not applied: shard {i} could not "
                                    f"load its part ({_message(exc)}); {state}")
        staged.append(i)
    with leader.lock:
        done, failed = [], {}
        for i, link in enumerate(links):
            try:
                link.call("activate_restore", token, timeout=registry.call_timeout)
                done.append(i)
            except Exception as exc:  # noqa: BLE001 - the job is marked broken below
                failed[i] = exc
        if failed:
            first = min(failed)
            message = (
                f"restore of optimizer '{key}' to {label} reached shard(s) {done} but not shard(s) {sorted(failed)} "
                f"({_message(failed[first])}): the shards are at no single cut, so pushes, changes and checkpoints "
                f"are refused until a restore completes on every shard. Bring shard {first} back; the next push "
                f"retries this restore, or {again}"
            )
            leader.mark_broken(message)
            _resumable(registry)[key] = lambda: restore_job(registry, key, source, leader_state, label,
                                                            timeout_for=timeout_for, again=again)  # fmt: skip
            _log.error("%s", message)
            raise FailedPrecondition(message, current_version=leader.version)
        leader.restore_state(leader_state)
        _resumable(registry).pop(key, None)
    return {"id": label, "version": leader.version}


def resume(registry: Any, key: str) -> dict[str, Any] | None:
    """(Leader) Run an interrupted restore of ``key`` again; None when there is none."""
    again = _resumable(registry).get(key)
    return None if again is None else again()


def common_cuts(registry: Any, key: str, links: list[Any]) -> set[str]:
    """Cut ids of ``key`` that every shard holds; a shard that does not answer stops the restore."""
    common: set[str] | None = None
    for i, link in enumerate(links):
        try:
            cuts = set(link.call("list_cuts", timeout=registry.call_timeout))
        except Exception as exc:  # noqa: BLE001 - reported with the shard's index
            raise _shard_error(exc, f"restore of optimizer '{key}' was not applied: shard {i} did not list its "
                                    f"checkpoints ({_message(exc)}); nothing changed on any shard. Bring shard {i} "
                                    "back and run the restore again") from exc
        common = cuts if common is None else common & cuts
    return common or set()


def resumable(registry: Any, key: str) -> bool:
    return key in _resumable(registry)


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"


def _shard_error(exc: BaseException, message: str) -> BaseException:
    """The error to raise: the shard's kind (unreachable stays Unavailable), with ``message``."""
    if isinstance(exc, Unavailable):
        return Unavailable(message)
    if isinstance(exc, ServiceError):
        return type(exc)(message, current_version=exc.current_version)
    return FailedPrecondition(message)
