"""Each shard's bulk channel: staging slices and pulling pieces over a plain TCP port.

A shard server opens the same bulk listener as a single server (``transport.bulk.BulkServer``:
tickets, framing, ``recv_into`` straight into receive buffers, ``sendall`` of the weights,
stall and size limits), over ``ShardBulkHosts`` instead of a coordinator. On a shard:

* a bulk *push* is phase 1 of a sharded push, ``stage``: the worker's slices for this shard
  are kept under (worker id, request id) exactly as the gRPC ``stage`` call keeps them (same
  validation, the same widening of narrowed gradients), and the reply is ``ACCEPTED`` with
  this shard's version and the detail "staged"; the commit still goes to the leader over gRPC,
  so all-or-none and exactly-once are untouched (a re-sent stage replaces the same entry);
* a bulk *pull* returns this shard's pieces, waiting for ``min_version`` as the gRPC ``pull``.

Tickets come from the ``ShardService`` (method ``open_bulk``, any authenticated caller, bound
to one optimizer and worker id, and to the caller's client certificate under mutual TLS), since
a shard serves no ``AdamaxService``. A shard whose gRPC port is TLS speaks TLS on its bulk
channel too (``bulk_tls``, the single server's rules: ``transport.bulk_tls``). Shared memory is
not offered by shards (TCP only): a pull's arena is per optimizer on a single server, and a
shard's pieces would need one per shard process; same-host workers use TCP to each shard.
Bulk calls are not counted in the push metrics (a stage is not a push; the leader counts it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adamax_server.coordination.policy import PushResult, TensorMeta
from adamax_server.errors import InvalidArgument, NotFound
from adamax_server.sharding.shard import ShardHost


def open_bulk(registry: Any, key: str, args: Sequence[Any], identities: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``open_bulk``: a ticket for this shard's bulk channel, or ``available: False``. Under
    mutual TLS the ticket only opens a connection presenting one of ``identities``."""
    registry.host(key)  # NOT_FOUND before a ticket is spent on it
    if registry.bulk is None:
        return {"available": False}
    if not args or not args[0]:
        raise InvalidArgument("open_bulk needs the `worker_id` the connection will stage as")
    ticket = registry.bulk.issue_ticket(key, str(args[0]), identities)
    return {"available": True, "port": registry.bulk.port, "ticket": ticket.hex(), "ttl": registry.bulk.ticket_ttl}


@dataclass
class _Pulled:
    version: int
    iterations: int
    not_modified: bool
    payload: Any


class ShardBulkHost:
    """One optimizer of this shard, as ``BulkServer`` reads and writes it.

    Stages and pulls go through ``ShardRegistry.dispatch``, the very path of the gRPC calls
    (validation, widening, shard metrics)."""

    def __init__(self, registry: Any, host: ShardHost) -> None:
        self._registry = registry
        self._host = host
        self.key = host.key

    def device_receiver(self) -> None:  # receive into host memory; the shard engine copies in
        return None

    def check_gradient(self, meta: TensorMeta) -> None:
        """Refuse a slice of a variable this shard holds no piece of before reading its bytes."""
        names = self._host.piece_names()
        if names is not None and meta.name not in names:  # unbuilt: ``stage`` says so
            raise NotFound(f"shard {self._host.shard_index} of optimizer '{self.key}' holds no piece of '{meta.name}'")

    def push(self, worker_id: str, request_id: str, step: int, receive: Callable[[Any], list[tuple[str, Any]]],
             *, timeout: float | None = None, progress: Any = None) -> PushResult:  # fmt: skip
        grads = receive(None)  # no staging buffer is lent: slices are kept until the leader decides
        self._registry.dispatch(self.key, "stage", [worker_id, request_id, grads])
        status = self._host.status()
        return PushResult("accepted", int(status["version"]), int(status["iterations"]),
                          detail=f"staged on shard {self._host.shard_index}")  # fmt: skip

    def pull(self, names: Sequence[str], build: Callable[..., Any], *, min_version: int = 0,
             known_version: int | None = None, timeout: float | None = None, worker_id: str = "",
             encoding: str = "raw") -> _Pulled:  # fmt: skip
        version, iterations, weights = self._registry.dispatch(self.key, "pull", [list(names), int(min_version), timeout])
        if known_version is not None and known_version == version:
            return _Pulled(version, iterations, True, None)
        return _Pulled(version, iterations, False, build(version, iterations, list(weights.items())))


class ShardBulkHosts:
    """The coordinator-shaped view ``BulkServer`` needs of a ``ShardRegistry``."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def get(self, key: str) -> ShardBulkHost:
        return ShardBulkHost(self._registry, self._registry.host(key))

    def hosts(self) -> list[Any]:
        return []  # only the shared-memory pull arenas use it; shards offer no shared memory
