"""The exactly-once table: (worker id, request id) -> the outcome of a push, bounded LRU."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from adamax_server.coordination.policy import PushResult

# ---------------------------------------------------------------- exactly-once table


@dataclass
class DedupEntry:
    result: PushResult | None = None  # None while the first copy is in flight


class DedupTable:
    """Per-worker request id -> outcome, bounded; in-flight entries are never evicted."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_worker: dict[str, OrderedDict[str, DedupEntry]] = {}

    def get(self, worker_id: str, request_id: str) -> DedupEntry | None:
        return self._by_worker.get(worker_id, {}).get(request_id)

    def begin(self, worker_id: str, request_id: str) -> None:
        entries = self._by_worker.setdefault(worker_id, OrderedDict())
        entries[request_id] = DedupEntry()
        excess = len(entries) - self._capacity
        if excess > 0:  # the oldest answered ones go; a walk from the old end, not a copy of all
            doomed = []
            for old_id, old in entries.items():
                if len(doomed) == excess:
                    break
                if old.result is not None:
                    doomed.append(old_id)
            for old_id in doomed:
                del entries[old_id]

    def finish(self, worker_id: str, request_id: str, result: PushResult) -> None:
        self._by_worker[worker_id][request_id] = DedupEntry(result)

    def discard(self, worker_id: str, request_id: str) -> None:
        self._by_worker.get(worker_id, {}).pop(request_id, None)

    def finished(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Answered requests per worker, oldest first, as JSON data (for checkpoints)."""
        return {
            worker: [(rid, asdict(e.result)) for rid, e in entries.items() if e.result is not None]
            for worker, entries in self._by_worker.items()
        }

    @classmethod
    def from_finished(cls, capacity: int, finished: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]]) -> DedupTable:
        table = cls(capacity)
        for worker, entries in finished.items():
            table._by_worker[worker] = OrderedDict(
                (rid, DedupEntry(PushResult(**{**result, "duplicate": False}))) for rid, result in entries
            )
        return table
