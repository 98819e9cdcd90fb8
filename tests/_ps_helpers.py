"""Helpers for the service and client tests: an in-process server on 127.0.0.1:0.

Tests bind port 0, connect real channels, and stop the server in teardown.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
for _package_root in (REPO_ROOT / "server", REPO_ROOT / "client", REPO_ROOT / "wire"):
    if str(_package_root) not in sys.path:
        sys.path.insert(0, str(_package_root))

from adamax_server.coordination.coordinator import Coordinator  # noqa: E402
from adamax_server.transport.server import create_server, stop_server  # noqa: E402


@contextlib.contextmanager
def running_server(**kwargs) -> Iterator[tuple[str, Coordinator]]:
    """Start a server on an ephemeral port; yields (target, coordinator)."""
    kwargs.setdefault("device", "cpu")
    coordinator = kwargs.pop("coordinator", None) or Coordinator(device=kwargs.pop("device"))
    kwargs.pop("device", None)
    server, port = create_server("127.0.0.1:0", coordinator=coordinator, **kwargs)
    server.start()
    try:
        yield f"127.0.0.1:{port}", coordinator
    finally:
        stop_server(server, grace=None)


def snapshot(host) -> dict[str, np.ndarray]:
    """Every piece of state of a hosted optimizer, for 'nothing changed' checks."""
    engine = host._engine
    with host._cond:
        state = {f"w/{k}": v.copy() for k, v in engine.trainable_variables.items()} if engine.built else {}
        store: dict[str, np.ndarray] = {}
        if engine.built:
            engine.save_own_variables(store)
        state.update({f"opt/{k}": np.array(v, copy=True) for k, v in store.items()})
        state["version"] = np.array(host._version)
        state["iterations"] = np.array(engine.iterations)
        state["round"] = np.array(sorted(host._round), dtype=object)
    return state


def assert_same_state(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if a.dtype == object:
            assert list(a) == list(b), key
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert a.tobytes() == b.tobytes(), f"{key} changed"


def assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes()


def host_weights(host) -> dict[str, np.ndarray]:
    """The model variables a hosted optimizer holds now (bypassing the pull cache)."""
    with host._cond:
        return host._engine.trainable_variables
