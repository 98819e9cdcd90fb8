"""Helpers for the service and client tests: an in-process server on 127.0.0.1:0.

Tests bind port 0, connect real channels, and stop the server in teardown.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
for _package_root in (REPO_ROOT / "server", REPO_ROOT / "client", REPO_ROOT / "wire"):
    if str(_package_root) not in sys.path:
        sys.path.insert(0, str(_package_root))

from adamax_server.sharding.coordinator import Coordinator  # noqa: E402
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

    def read(engine):
        state = {f"w/{k}": v.copy() for k, v in engine.trainable_variables.items()} if engine.built else {}
        store: dict[str, np.ndarray] = {}
        if engine.built:
            engine.save_own_variables(store)
        state.update({f"opt/{k}": np.array(v, copy=True) for k, v in store.items()})
        state["version"] = np.array(host.version)
        state["iterations"] = np.array(engine.iterations)
        return state

    state = host._shard.read_engine(read)
    state["round"] = np.array(host.status().round_arrivals, dtype=object)
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
    return host._shard.read_engine(lambda engine: engine.trainable_variables)


def json_log_events(proc, wanted: tuple[str, ...], timeout: float = 60.0) -> tuple[dict[str, dict], list[str]]:
    """Read a server's JSON log lines (stderr) until every event in ``wanted`` appeared, within ``timeout``.

    With ``--log-format json`` a server prints no plain "listening on" line: the port is a field of
    its "listening" record. Returns ``({event: record}, lines read)``; a reader thread keeps this bounded.
    """
    import json
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    found: dict[str, dict] = {}
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while set(wanted) - set(found):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {sorted(set(wanted) - set(found))} record within {timeout}s: {seen}") from None
        if line is None:
            raise AssertionError(f"the server exited before logging {sorted(set(wanted) - set(found))}: {seen}")
        seen.append(line)
        record = json.loads(line)
        if record.get("event") in wanted:
            found.setdefault(record["event"], record)
    proc._json_log_lines = lines  # the rest of the log, for callers that read it later
    return found, seen


def drain_json_log(proc, timeout: float = 15.0) -> list[str]:
    """The remaining lines of a log started by ``json_log_events`` (after the process exited)."""
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = proc._json_log_lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            break
        if line is None:
            break
        out.append(line)
    return out
