"""POSIX shared-memory segments for the bulk channel's same-host path.

A segment is created by the side that writes it (the worker for pushes, the server for
pulls) and attached by the other. Python before 3.13 registers *attached* segments with the
multiprocessing resource tracker, which would unlink them when the attaching process exits;
``attach`` opts out of that, so only the creator ever unlinks.
"""

from __future__ import annotations

import secrets
import sys
from multiprocessing import resource_tracker, shared_memory

NONCE_BYTES = 16
# Segments this process created: attaching one of them (a server and its worker in one test
# process) must not drop the creator's own resource-tracker registration.
_created: set[str] = set()


def create(size: int) -> tuple[shared_memory.SharedMemory, bytes]:
    """A new segment of at least ``size`` bytes with a random nonce at offset 0.

    Payloads start at ``NONCE_BYTES`` rounded up to 64 (see ``data_offset``).
    """
    segment = shared_memory.SharedMemory(create=True, size=max(1, data_offset() + size))
    nonce = secrets.token_bytes(NONCE_BYTES)
    segment.buf[:NONCE_BYTES] = nonce
    _created.add(segment.name)
    return segment, nonce


def data_offset() -> int:
    """Where payloads may start in a segment (after the nonce, cache-line aligned)."""
    return 64


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach an existing segment without letting this process's exit unlink it."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)  # type: ignore[call-arg]
    segment = shared_memory.SharedMemory(name=name, create=False)
    if segment.name in _created:
        return segment
    try:
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # the tracker is an implementation detail; never fail an attach on it
        pass
    return segment


def release(segment: shared_memory.SharedMemory | None, *, unlink: bool) -> None:
    """Close (and unlink when this side created it); tolerant of views still alive."""
    if segment is None:
        return
    try:
        segment.close()
    except BufferError:  # a numpy view still points into it; the mapping goes with the view
        pass
    if unlink:
        _created.discard(segment.name)
        try:
            segment.unlink()
        except FileNotFoundError:
            pass
