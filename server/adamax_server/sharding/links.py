"""How the leader reaches its shards, and how a fanned-out call fails (shared by the leader and the restore)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from adamax_server.errors import ServiceError, Unavailable
from adamax_server.coordination.policy import PushResult


class ShardLink(Protocol):
    """How the leader reaches one shard's host of this optimizer (in process, or over gRPC)."""

    index: int

    def call(self, method: str, *args: Any, timeout: float) -> Any:
        """Run ``ShardHost.<method>(*args)`` on the shard; raise ``Unavailable`` when unreachable."""
        ...


class ShardUnavailable(Unavailable):
    """A shard did not answer (down, cut off, or past the deadline)."""


class DecidedUnconfirmed(ShardUnavailable):
    """The event is decided (its outcome is final) but a shard has not confirmed it yet."""

    def __init__(self, message: str, *, current_version: int | None = None, result: PushResult | None = None) -> None:
        super().__init__(message, current_version=current_version)
        self.result = result


class PartialFailure(Exception):
    """Some shards failed a fanned-out call; ``results`` holds the others' replies."""

    def __init__(self, results: dict[int, Any], errors: dict[int, BaseException]) -> None:
        super().__init__(f"shard(s) {sorted(errors)} failed")
        self.results = results
        self.errors = errors

    def as_service_error(self, key: str, consequence: str, version: int) -> BaseException:
        i = min(self.errors)
        err = self.errors[i]
        if isinstance(err, ShardUnavailable):
            return ShardUnavailable(f"shard {i} of optimizer '{key}' is unavailable ({err.message}); {consequence}", current_version=version)
        if isinstance(err, ServiceError):
            return type(err)(f"shard {i}: {err.message}", current_version=err.current_version)
        return err


class StagedDrops:
    """Best-effort drops of a staged push on every shard (``drops(key)``): a push the leader
    refused for good, or a re-staged copy of a decided one. The leader's own shard (``inline``)
    drops in the caller's thread; each other shard in a lane of its own (one thread, at most 64
    waiting), so a hung shard holds up its own drops, up to the call timeout each, and nothing
    else. A drop that does not happen leaves the slices to expire after the staging TTL."""

    def __init__(self, links: Sequence[ShardLink], timeout: float, key: str) -> None:
        self._links = links
        self._timeout = timeout
        self._key = key
        self._lanes: dict[int, tuple[ThreadPoolExecutor, threading.BoundedSemaphore]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, key: tuple[str, str]) -> None:
        for i, link in enumerate(self._links):
            if getattr(link, "inline", False):
                self._drop(i, key)
                continue
            with self._lock:
                if self._closed:
                    return
                if i not in self._lanes:
                    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"leader-{self._key}-drop{i}")
                    self._lanes[i] = (pool, threading.BoundedSemaphore(64))
                pool, waiting = self._lanes[i]
                if waiting.acquire(blocking=False):
                    pool.submit(self._drop, i, key, waiting)

    def _drop(self, i: int, key: tuple[str, str], waiting: threading.BoundedSemaphore | None = None) -> None:
        try:
            self._links[i].call("drop", [key], timeout=self._timeout)
        except Exception:  # noqa: BLE001 - it expires after the staging TTL
            logging.getLogger(__name__).debug("shard %d keeps staged push %s until it expires", i, key)
        finally:
            if waiting is not None:
                waiting.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            lanes = list(self._lanes.values())
        for pool, _ in lanes:
            pool.shutdown(wait=False)
