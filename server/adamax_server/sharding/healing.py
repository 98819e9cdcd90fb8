"""Bringing a sharded job back to one cut after a shard restarted, once, whoever notices first.

A shard killed and restarted with ``--restore latest`` is at its newest cut, behind the job.
Two things notice it on the leader (shard 0):

* a push: the next event's ``prepare`` fails on that shard, the leader marks the job broken,
  and ``ShardRegistry.push`` heals it and answers ABORTED (``StateRestored``);
* the watch (``ShardWatch``, every ``interval`` seconds): a shard whose incarnation changed is
  compared with the leader under the job's lock (no event in flight), and a shard at another
  version than the leader's that has no decided event owed to it (not *lagging*) marks the
  job broken and heals it at once. Without the watch a job whose workers were all waiting in
  a pull (for a version the restarted shard no longer has) would wait until their deadlines,
  since only a push noticed.

``Healer.heal_if_broken`` serializes the heals: a caller that found the job broken before
another caller healed it learns the outcome of that heal instead of restoring a second time
(which would lose the pushes acknowledged in between).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from adamax_server.errors import FailedPrecondition
from adamax_server.sharding import restore as job_restore

_log = logging.getLogger("adamax_server.sharding.healing")


class Healer:
    """One shard registry's heals (only the leader heals)."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._last: dict[str, tuple[object, str, int]] = {}  # key -> (token, what, version)

    def last(self, key: str) -> object | None:
        """A token for the newest heal of ``key`` (compare it after a failure with ``heal_if_broken``)."""
        got = self._last.get(key)
        return None if got is None else got[0]

    def heal_if_broken(self, key: str, seen: object | None = None) -> tuple[str, int] | None:
        """(what was restored, version) if ``key`` was healed after ``seen``, by this call or another;
        None when the job is not broken or cannot heal itself (then the caller's error stands)."""
        registry = self._registry
        leader = registry.leader(key)
        with self._lock:
            got = self._last.get(key)
            if got is not None and got[0] is not seen:
                return got[1], got[2]
            if not (registry.auto_heal and leader.status()["broken"]
                    and (registry.checkpoint_dir or job_restore.resumable(registry, key))):  # fmt: skip
                return None
            what, version = self._heal(key)
            self._last[key] = (object(), what, version)
            return what, version

    def _heal(self, key: str) -> tuple[str, int]:
        registry = self._registry
        leader = registry.leader(key)
        resumed = job_restore.resume(registry, key)  # an interrupted restore first: what was asked for
        if resumed is not None:
            return resumed["id"], leader.version
        common = job_restore.common_cuts(registry, key, registry._links(key))
        if not common:
            raise FailedPrecondition(
                f"optimizer '{key}' needs a restore but no checkpoint is held by every shard; "
                "restore one explicitly (adamax-ps checkpoint restore)"
            )
        cut = max(common)
        registry.restore(key, cut)
        _log.warning("optimizer '%s' restored to cut %s on every shard after a shard restart", key, cut)
        return f"checkpoint {cut}", leader.version


def find_restarted(leader: Any, seen: dict[int, str], timeout: float) -> str | None:
    """Why ``leader``'s job is no longer at one version (a restarted shard), or None.

    ``seen``: the incarnation each shard had at the previous look (updated). Only a shard whose
    incarnation changed is compared, under the job's lock: while no event is in flight every shard
    is at the leader's version or, if it missed the decided event, lagging (redelivered later).
    """
    links = leader.links
    changed = []
    for i in range(1, len(links)):  # the leader's own shard restarts with the leader
        try:
            _, _, incarnation = links[i].call("state_version", timeout=timeout)
        except Exception:  # noqa: BLE001 - unreachable now: looked at again next time
            continue
        if seen.get(i) not in (None, incarnation):
            changed.append(i)
        seen[i] = incarnation
    if not changed:
        return None
    with leader.lock:
        status = leader.status()
        if status["broken"] or not leader.built:
            return None
        for i in changed:
            if i in status["lagging"]:
                continue
            try:
                version = int(links[i].call("state_version", timeout=timeout)[0])
            except Exception:  # noqa: BLE001 - looked at again next time
                continue
            if version != status["version"]:
                why = (f"shard {i} of optimizer '{leader.key}' is at version {version} while the job is at "
                       f"{status['version']} (it restarted); restore one checkpoint on every shard "
                       "(adamax-ps checkpoint restore) to make the job consistent again")  # fmt: skip
                leader.mark_broken(why)
                _log.error("%s", why)
                return why
    return None


class ShardWatch:
    """The leader's look at its shards every ``interval`` seconds (see the module docstring)."""

    def __init__(self, registry: Any, interval: float = 2.0) -> None:
        self._registry = registry
        self.interval = interval
        self._seen: dict[str, dict[int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="shard-watch")

    def start(self) -> ShardWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + self._registry.call_timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and not self._registry.closed:
            self.look()

    def look(self) -> None:
        """One look at every job this leader sequences; heals a job that a restarted shard broke."""
        registry = self._registry
        for key, leader in registry.leaders():
            try:
                seen = registry.healer.last(key)  # a heal after this one is someone else's: not redone
                if find_restarted(leader, self._seen.setdefault(key, {}), min(2.0, registry.call_timeout)):
                    healed = registry.healer.heal_if_broken(key, seen)
                    if healed is not None:
                        _log.warning("optimizer '%s': a restarted shard was found between pushes; the job is "
                                     "back at %s (version %d)", key, healed[0], healed[1])  # fmt: skip
            except Exception:  # noqa: BLE001 - the next push meets the same state and reports it
                _log.warning("shard watch of optimizer '%s' failed", key, exc_info=True)
