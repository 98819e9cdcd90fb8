"""How the leader reaches its shards, and how a fanned-out call fails (shared by the leader and the restore)."""

from __future__ import annotations

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
