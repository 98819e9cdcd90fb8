"""When to checkpoint and what to restore: the policy thread in front of a ``CheckpointStore``.

``CheckpointManager`` saves every hosted optimizer every N steps (weights versions of any one
optimizer) and/or every T seconds, on demand (``save_all``: the SaveCheckpoint RPC, the CLI,
and the shutdown path), keeps the newest K checkpoints plus every Mth, and restores by id or
``"latest"``. Each optimizer is snapshotted under its own lock (a memory copy) and written
outside it, so pushes wait for the copy, never for the disk. Saves are serialized.

No grpc here; the CheckpointService servicer translates its RPCs to these calls.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from adamax_server.storage.checkpoint import LATEST, CheckpointInfo, CheckpointStore, check_manifest, decode, encode, verify_tensors
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.errors import FailedPrecondition, InvalidArgument, NotFound
from adamax_server.coordination.snapshot import OptimizerSnapshot

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Automatic checkpoints: any of the triggers; ``keep`` newest plus every ``keep_every``-th."""

    every_steps: int | None = None
    every_seconds: float | None = None
    keep: int = 5
    keep_every: int | None = None
    # After a failed automatic checkpoint, wait retry_initial seconds, doubling per further
    # failure up to retry_max, before trying again (a full or read-only disk is not hammered).
    retry_initial: float = 1.0
    retry_max: float = 300.0

    def __post_init__(self) -> None:
        for name in ("retry_initial", "retry_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise InvalidArgument(f"`{name}` must be a positive number of seconds. Received: {name}={value!r}")
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise InvalidArgument(f"`every_steps` must be an integer >= 1 or None. Received: every_steps={self.every_steps!r}")
        if self.every_seconds is not None and not (self.every_seconds > 0 and math.isfinite(self.every_seconds)):
            raise InvalidArgument(
                f"`every_seconds` must be a positive number or None. Received: every_seconds={self.every_seconds!r}"
            )
        if not isinstance(self.keep, int) or self.keep < 1:
            raise InvalidArgument(f"`keep` must be an integer >= 1. Received: keep={self.keep!r}")
        if self.keep_every is not None and (not isinstance(self.keep_every, int) or self.keep_every < 1):
            raise InvalidArgument(f"`keep_every` must be an integer >= 1 or None. Received: keep_every={self.keep_every!r}")


@dataclass(frozen=True)
class Restored:
    optimizer: str
    version: int
    iterations: int


class CheckpointManager:
    """Policy-driven and on-demand checkpoints of one coordinator's optimizers."""

    def __init__(
        self, coordinator: Coordinator, store: CheckpointStore | None = None, policy: CheckpointPolicy | None = None
    ) -> None:
        self.coordinator = coordinator
        self._store = store  # None: live download/upload only (no checkpoint directory)
        self.policy = policy or CheckpointPolicy()
        self._save_lock = threading.Lock()
        self._saved_versions: dict[str, int] = {}
        self._last_save = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str = ""  # of the newest failed save; "" once a save succeeds again
        self.consecutive_failures = 0  # failed saves since the last one that succeeded
        self.retry_at = 0.0  # monotonic time before which the policy thread does not retry
        # Called with (seconds, bytes) after each checkpoint written (the server's metrics), and
        # with (consecutive failures, error) after each failed one.
        self.on_saved: Callable[[float, int], None] | None = None
        self.on_failed: Callable[[int, str], None] | None = None

    @property
    def store(self) -> CheckpointStore:
        if self._store is None:
            raise FailedPrecondition("this server has no checkpoint directory; start it with --checkpoint-dir")
        return self._store

    # -------------------------------------------------------------- the policy thread

    def start(self) -> None:
        if self._thread is not None or self._store is None or (
            self.policy.every_steps is None and self.policy.every_seconds is None
        ):
            return
        self._thread = threading.Thread(target=self._run, name="adamax-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        # Version reads are cheap; polling keeps the coordinator free of checkpoint hooks.
        interval = 0.02 if self.policy.every_steps else min(1.0, self.policy.every_seconds or 1.0)
        logged = ""  # the error last logged: a failure that repeats is logged once
        while not self._stop.wait(interval):
            if self.consecutive_failures and time.monotonic() < self.retry_at:
                continue  # backing off after a failure
            try:
                if not self._due():
                    continue
                self.save_all(reason="policy")
            except Exception as exc:  # keep trying with backoff; the disk may be freed
                failures = self.consecutive_failures
                delay = min(self.policy.retry_max, self.policy.retry_initial * 2 ** min(failures - 1, 30))
                self.retry_at = time.monotonic() + delay
                if self.last_error != logged:
                    logged = self.last_error
                    _log.error(
                        "automatic checkpoint into %s failed (%s); retrying in %.3g s, backing off up to %.3g s; "
                        "this error is logged again only when it changes",
                        self._store.root if self._store is not None else "-", self.last_error, delay,
                        self.policy.retry_max, exc_info=failures == 1,
                    )
                else:
                    _log.debug("automatic checkpoint failed again (%d in a row): %s", failures, exc)
                continue
            if logged:
                _log.info("automatic checkpoints work again")
                logged = ""

    def _progress(self) -> tuple[bool, int]:
        """Whether anything changed since the last save, and the most steps any optimizer took.

        An optimizer never saved counts as a change (its creation), and its steps count from
        version 0: ``every_steps=3`` saves at version 3, 6, ... as the name says.
        """
        changed, steps = False, 0
        for host in self.coordinator.hosts():
            saved = self._saved_versions.get(host.key)
            changed = changed or saved is None or host.version != saved
            steps = max(steps, abs(host.version - (saved or 0)))
        return changed, steps

    def _due(self) -> bool:
        changed, steps = self._progress()
        if not changed:
            return False
        if self.policy.every_steps is not None and steps >= self.policy.every_steps:
            return True
        seconds = self.policy.every_seconds
        return seconds is not None and time.monotonic() - self._last_save >= seconds

    # -------------------------------------------------------------- save

    def snapshot_all(self, optimizers: Sequence[str] = ()) -> list[OptimizerSnapshot]:
        """One snapshot per optimizer (each under its own lock), or only ``optimizers``."""
        hosts = [self.coordinator.get(k) for k in optimizers] if optimizers else self.coordinator.hosts()
        return [host.snapshot() for host in hosts]

    def save_all(self, reason: str = "manual") -> CheckpointInfo:
        """Write one checkpoint of every optimizer, then apply the retention policy.

        The final checkpoint on shutdown is ``save_all(reason="shutdown")``, after the server
        stopped taking calls and before the coordinator is closed.
        """
        with self._save_lock:
            start = time.perf_counter()
            try:
                snapshots = self.snapshot_all()
                info = self.store.write(snapshots, reason=reason)
            except Exception as exc:
                self._failed(exc)
                raise
            if self.consecutive_failures:
                self.consecutive_failures, self.last_error = 0, ""
            self._saved_versions = {s.key: s.version for s in snapshots}
            self._last_save = time.monotonic()
            removed = self.store.prune(self.policy.keep, self.policy.keep_every)
            if self.on_saved is not None:
                self.on_saved(time.perf_counter() - start, info.nbytes)
            _log.info(
                "checkpoint %s (%s): %d optimizers, %.1f MB in %.2fs%s",
                info.checkpoint_id, reason, len(snapshots), info.nbytes / 1e6, time.perf_counter() - start,
                f"; removed {', '.join(removed)}" if removed else "",
            )
            return info

    def _failed(self, exc: BaseException) -> None:
        self.consecutive_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.on_failed is not None:
            try:
                self.on_failed(self.consecutive_failures, self.last_error)
            except Exception:  # noqa: BLE001 - metrics must not hide the save's own error
                _log.exception("checkpoint failure hook failed")

    def save_uploaded(self, manifest: dict[str, Any], files: dict[str, dict[str, np.ndarray]]) -> CheckpointInfo:
        """Verify an uploaded checkpoint (every checksum) and write it under a new id."""
        self.verify_encoded(manifest, files)
        with self._save_lock:
            info = self.store.write_encoded(manifest, files)
            self.store.prune(self.policy.keep, self.policy.keep_every)
            return info

    @staticmethod
    def verify_encoded(manifest: dict[str, Any], files: dict[str, dict[str, np.ndarray]]) -> None:
        """The structure and every tensor checksum of a checkpoint that did not come from disk."""
        check_manifest(manifest, "uploaded checkpoint")
        extra = sorted(set(files) - {opt["file"] for opt in manifest["optimizers"]})
        if extra:
            raise InvalidArgument(f"uploaded checkpoint: files {extra} are not in the manifest")
        for opt in manifest["optimizers"]:
            verify_tensors(opt, files.get(opt["file"], {}), f"uploaded checkpoint, optimizer '{opt['key']}'")

    # -------------------------------------------------------------- restore

    def restore(self, checkpoint_id: str = LATEST, optimizers: Sequence[str] = ()) -> tuple[str, list[Restored]]:
        """Restore every optimizer of a checkpoint (or only ``optimizers``); returns the id used."""
        if checkpoint_id == LATEST:
            checkpoint_id, snapshots = self.store.load_latest()
        else:
            snapshots = self.store.load(checkpoint_id)
        return checkpoint_id, self.restore_snapshots(snapshots, optimizers)

    def restore_snapshots(self, snapshots: Sequence[OptimizerSnapshot], optimizers: Sequence[str] = ()) -> list[Restored]:
        if optimizers:
            known = {s.key for s in snapshots}
            missing = sorted(set(optimizers) - known)
            if missing:
                raise NotFound(f"the checkpoint has no optimizer(s) {missing}. It holds: {sorted(known)}")
            snapshots = [s for s in snapshots if s.key in set(optimizers)]
        out = []
        for snap in snapshots:
            _, version, iterations = self.coordinator.restore(snap)
            out.append(Restored(snap.key, version, iterations))
            if version == snap.version:  # restored as saved: nothing new to checkpoint yet
                self._saved_versions[snap.key] = version
        return out

    def restore_encoded(self, manifest: dict[str, Any], files: dict[str, dict[str, np.ndarray]], optimizers: Sequence[str] = ()) -> list[Restored]:
        """Restore from a verified (manifest, tensors) pair, e.g. an upload."""
        return self.restore_snapshots(decode(manifest, files), optimizers)

    def encode_live(self, optimizers: Sequence[str] = (), reason: str = "download") -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
        """The running state, encoded like a checkpoint (nothing is written)."""
        return encode(self.snapshot_all(optimizers), "live", reason)
