"""A sharded job's bulk channels: one per shard, for staging slices and pulling pieces.

Every shard server offers the single server's bulk channel (TCP, and shared memory to workers
on its host; see ``adamax_server.sharding.bulk``), with tickets from its ``ShardService``
(``open_bulk``). A sharded push stages each shard's slices over that shard's channel (phase 1;
the commit at the leader is a gRPC call, or rides with the push's only stage on the leader),
and a pull reads each shard's pieces over it, every shard in parallel. A shard whose channel is
not offered, or fails now, is reached over gRPC for that call, exactly as ``RemoteAdamax``
falls back on a single server: the same request id, so
nothing is staged twice differently and the commit is unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from adamax_wire import pb
from adamax_client._settings import OUTCOME_NAMES
from adamax_client.bulk import BULK_MODES, BulkChannel, BulkUnavailable

_log = logging.getLogger("adamax_client")
_BACKOFF, _BACKOFF_MAX = 5.0, 300.0  # seconds on gRPC after a transient bulk failure, doubling
_NONE: Any = object()  # a shard that offers no bulk channel


def push_result(reply: Any) -> Any:
    """A bulk ``PushResponse`` (a stage that carried its commit) as the client's ``PushResult``."""
    from adamax_client.remote import PushResult

    return PushResult(OUTCOME_NAMES.get(reply.outcome, "applied"), int(reply.version), int(reply.iterations),  # type: ignore[arg-type]
                      bool(reply.duplicate), reply.detail)  # fmt: skip


class ShardChannels:
    """Bulk channels to every shard of one optimizer, for one worker."""

    def __init__(self, transports: Sequence[Any], callers: Sequence[Callable[..., Any]], key: str, worker_id: str,
                 mode: str = "auto") -> None:  # fmt: skip
        if mode not in BULK_MODES:
            raise ValueError(f"`bulk` must be one of {list(BULK_MODES)}. Received: bulk={mode!r}")
        self.mode = mode
        self._transports = list(transports)
        self._callers = list(callers)
        self.key = key
        self.worker_id = worker_id
        n = len(self._transports)
        self._channels: list[Any] = [None] * n
        self._retry_at = [0.0] * n
        self._backoff = [0.0] * n

    def _ticket(self, shard: int) -> Callable[[float], Any]:
        def open_ticket(timeout: float) -> Any:
            got = self._callers[shard](self.key, "open_bulk", self.worker_id, timeout=timeout)
            if not got.get("available"):
                return pb.OpenBulkChannelResponse(available=False)
            return pb.OpenBulkChannelResponse(
                available=True, port=int(got["port"]), ticket=bytes.fromhex(got["ticket"]),
                ticket_ttl_seconds=float(got["ttl"]), shared_memory=bool(got.get("shared_memory", False)),
            )  # fmt: skip

        return open_ticket

    def _via(self, shard: int, call: Callable[[BulkChannel], Any]) -> Any:
        """``call(channel)`` over shard ``shard``'s bulk channel, or None: use gRPC for this call."""
        if self.mode == "off" or self._channels[shard] is _NONE or time.monotonic() < self._retry_at[shard]:
            return None
        if self._channels[shard] is None:
            self._channels[shard] = BulkChannel(self._transports[shard], self.key, self.worker_id, mode=self.mode,
                                                open_ticket=self._ticket(shard))  # fmt: skip
        try:
            result = call(self._channels[shard])
            self._backoff[shard] = 0.0
            return result
        except BulkUnavailable as exc:
            if exc.transient:
                self._backoff[shard] = min(_BACKOFF_MAX, max(self._backoff[shard] * 2, _BACKOFF))
                self._retry_at[shard] = time.monotonic() + self._backoff[shard]
                _log.warning("worker '%s': bulk channel of shard %d failed (%s); gRPC to it for %.3g s",
                             self.worker_id, shard, exc, self._backoff[shard])  # fmt: skip
                return None
            level = logging.INFO if self.mode == "auto" and not exc.offered else logging.WARNING
            _log.log(level, "worker '%s': shard %d has no usable bulk channel (%s); using gRPC", self.worker_id, shard, exc)
            self._channels[shard].close()
            self._channels[shard] = _NONE
            return None

    def stage(self, shard: int, request_id: str, step: int, items: Sequence[tuple[str, Any]], *, wire: str | None,
              timeout: float, commit: bool = False) -> Any:  # fmt: skip
        """Stage ``items`` on ``shard`` over its bulk channel: the reply (a ``PushResponse``; with
        ``commit``, the leader's outcome of the whole push), or None: not sent, use gRPC."""
        if not items:  # a bulk push carries at least one tensor; an empty stage goes over gRPC
            return None
        header = pb.PushHeader(optimizer=self.key, worker_id=self.worker_id, step=step, request_id=request_id,
                               num_tensors=len(items), commit=commit)  # fmt: skip
        nbytes = getattr(items, "nbytes", None)  # a part still arriving (``sharded_calls.ShardStreams``)
        return self._via(shard, lambda ch: ch.push(header, items, wire=wire, timeout=timeout, nbytes=nbytes))

    def pull(self, shard: int, names: Sequence[str], min_version: int, timeout: float,
             out: Mapping[str, np.ndarray] | None = None) -> tuple[int, int, dict[str, np.ndarray]] | None:  # fmt: skip
        """(version, iterations, this shard's pieces) over its bulk channel; None: use gRPC.
        ``out`` (piece name -> writable array of its shape): receive the pieces into those."""
        request = pb.PullRequest(optimizer=self.key, names=list(names), min_version=int(min_version), worker_id=self.worker_id)
        got = self._via(shard, lambda ch: ch.pull(request, timeout=timeout, out=out))
        if got is None:
            return None
        head, items = got
        return int(head.version), int(head.iterations), dict(items)

    @property
    def path(self) -> str:
        """"shm" or "tcp" when every shard's channel is in use that way, "grpc" when none is, else
        "mixed"/"unknown"."""
        if self.mode == "off":
            return "grpc"
        now = time.monotonic()
        states = ["unknown" if c is None else "grpc" if c is _NONE or now < r else "shm" if c.shared_memory else "tcp"
                  for c, r in zip(self._channels, self._retry_at)]  # fmt: skip
        return states[0] if len(set(states)) == 1 else "mixed"

    def close(self) -> None:
        for c in self._channels:
            if c is not None and c is not _NONE:
                c.close()
