"""Each shard's bulk channel: staging slices and pulling pieces over a plain TCP port.

A shard server opens the same bulk listener as a single server (``transport.bulk.BulkServer``:
tickets, framing, ``recv_into`` straight into receive buffers, ``sendall`` of the weights,
stall and size limits), over ``ShardBulkHosts`` instead of a coordinator. On a shard:

* a bulk *push* is phase 1 of a sharded push, ``stage``: the worker's slices for this shard
  are kept under (worker id, request id) exactly as the gRPC ``stage`` call keeps them (same
  validation, the same widening of narrowed gradients), and the reply is ``ACCEPTED`` with
  this shard's version and the detail "staged"; the commit goes to the leader over gRPC,
  so all-or-none and exactly-once are untouched (a re-sent stage replaces the same entry).
  A push's last stage on the leader (a one-shard job's only one) may carry the commit itself
  (the header's ``commit``): staged, then committed as the gRPC ``push`` would be, and answered
  with the commit's outcome, one call instead of two;
* a bulk *pull* returns this shard's pieces, waiting for ``min_version`` as the gRPC ``pull``.

Tickets come from the ``ShardService`` (method ``open_bulk``, any authenticated caller, bound
to one optimizer and worker id, and to the caller's client certificate under mutual TLS), since
a shard serves no ``AdamaxService``. A shard whose gRPC port is TLS speaks TLS on its bulk
channel too (``bulk_tls``, the single server's rules: ``transport.bulk_tls``).

Workers on the shard's host get shared memory, as on a single server (``shared_memory``,
``--no-shared-memory`` turns it off): a stage reads the worker's registered segment, and a
full pull maps this shard's *pull arena*, one per optimizer and shard process, holding its
pieces under the names the shard keeps them by. The arena is refilled once per (incarnation,
version), so a restore (a new incarnation) never serves the weights it replaced.
Bulk calls are not counted in the push metrics (a stage is not a push; the leader counts it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
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
    return {"available": True, "port": registry.bulk.port, "ticket": ticket.hex(), "ttl": registry.bulk.ticket_ttl,
            "shared_memory": bool(registry.bulk.shared_memory)}  # fmt: skip


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

    # What a shared-memory pull reads (``transport.bulk.BulkServer._pull_shm``), without the lock:
    # the arena is refilled under it when (restore_epoch, version) moved.

    @property
    def version(self) -> int:
        return self._host.version

    @property
    def restore_epoch(self) -> str:
        return self._host.incarnation

    @property
    def iterations(self) -> int:
        return self._host.iterations

    def variable_specs(self) -> list[tuple[str, tuple[int, ...], Any]]:
        """This shard's pieces (name, shape, dtype): the arena's layout."""
        return self._host.piece_specs()

    def wait_for_version(self, min_version: int, timeout: float | None) -> int:
        return self._host.wait_for_version(min_version, timeout)

    def touch(self, worker_id: str) -> None:  # the leader keeps the job's worker records
        return None

    def read_weights_into(self, outs: Mapping[str, Any]) -> tuple[int, int]:
        return self._host.read_pieces_into(outs)

    def check_gradient(self, meta: TensorMeta) -> None:
        """Refuse a slice of a variable this shard holds no piece of before reading its bytes."""
        names = self._host.piece_names()
        if names is not None and meta.name not in names:  # unbuilt: ``stage`` says so
            raise NotFound(f"shard {self._host.shard_index} of optimizer '{self.key}' holds no piece of '{meta.name}'")

    commits = True  # takes a push header's ``commit`` (on the leader: stage, then commit the push)

    def push(self, worker_id: str, request_id: str, step: int, receive: Callable[[Any], list[tuple[str, Any]]],
             *, timeout: float | None = None, progress: Any = None, commit: bool = False) -> PushResult:  # fmt: skip
        # Received into a pooled gradient set of this shard's engine, kept with the staged push
        # and swapped in as the engine's staging buffers at prepare (``sharding.gradient_sets``).
        taken: list[Any] = []
        try:
            grads = receive(self._host.receive_lookup(taken))
        except BaseException:
            self._host.forget_receive(taken)
            raise
        if hasattr(grads, "gradient_sets"):
            grads.gradient_sets = taken
        elif taken:
            self._host.forget_receive(taken)
        if commit:  # the push's last stage: commit it at this shard's leader, answer with the outcome
            return self._registry.dispatch(self.key, "stage_push", [worker_id, request_id, grads, int(step)])
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
    """The coordinator-shaped view ``BulkServer`` needs of a ``ShardRegistry``.

    One view per live ``ShardHost``: a pull arena belongs to the view it was made for, and is
    released once its optimizer is deleted or re-created (``hosts``)."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._lock = threading.Lock()
        self._views: dict[str, ShardBulkHost] = {}

    def get(self, key: str) -> ShardBulkHost:
        host = self._registry.host(key)  # NotFound for an unknown optimizer
        with self._lock:
            view = self._views.get(key)
            if view is None or view._host is not host:
                view = self._views[key] = ShardBulkHost(self._registry, host)
            return view

    def hosts(self) -> list[ShardBulkHost]:
        """The views of optimizers that still exist on this shard."""
        live = []
        with self._lock:
            for key, view in list(self._views.items()):
                try:
                    current = self._registry.host(key)
                except Exception:  # noqa: BLE001 - deleted, or the shard is closing
                    current = None
                if current is view._host:
                    live.append(view)
                else:
                    del self._views[key]
        return live
