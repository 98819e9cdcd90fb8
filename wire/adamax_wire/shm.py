"""POSIX shared-memory segments for the bulk channel's same-host path.

A segment is created by the side that writes it (the worker for pushes, the server for
pulls) and attached by the other. Python before 3.13 registers *attached* segments with the
multiprocessing resource tracker, which would unlink them when the attaching process exits;
``attach`` keeps the registration from happening at all, so only the creator ever unlinks. (An
unregister after the fact is not enough: processes spawned by the creator share its tracker,
and a worker's unregister then removed the server's own registration, so the server's unlink
later made the tracker print a KeyError traceback.)
"""

from __future__ import annotations

import secrets
import sys
import threading
from multiprocessing import resource_tracker, shared_memory

NONCE_BYTES = 16
# Segments this process created: attaching one of them (a server and its worker in one test
# process) must not drop the creator's own resource-tracker registration.
_created: set[str] = set()
_tracker_lock = threading.Lock()  # attach() swaps the tracker's register function briefly


def create(size: int) -> tuple[shared_memory.SharedMemory, bytes]:
    """A new segment of at least ``size`` bytes with a random nonce at offset 0.

    Payloads start at ``NONCE_BYTES`` rounded up to 64 (see ``data_offset``).
    """
    with _tracker_lock:
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
    with _tracker_lock:
        register = resource_tracker.register
        resource_tracker.register = _register_unless_shared_memory  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


def _register_unless_shared_memory(name: str, rtype: str) -> None:
    if rtype != "shared_memory":
        _REGISTER(name, rtype)


_REGISTER = resource_tracker.register


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
