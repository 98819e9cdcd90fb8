"""The staging-buffer lease without a transport: a holder that stops moving while others wait is
cancelled; one that keeps its pace is not (coordination.staging)."""

from __future__ import annotations

import threading
import time

import numpy as np

from adamax_server.coordination.coordinator import Coordinator
from adamax_server.coordination.policy import Policy, ReceiveProgress

VALUES = [("w", np.zeros(256, np.float32))]


def _host():
    _, host = Coordinator(device="cpu").create("m", {"learning_rate": 0.01}, Policy())
    host.build(VALUES)
    return host


def _grads():
    return [("w", np.ones(256, np.float32))]


def _holder(host, progress, receive, outcome):
    def run():
        try:
            outcome["result"] = host.push("holder", "h", 0, receive, timeout=10, progress=progress)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 5
    while not host._staging_leased and time.monotonic() < deadline:
        time.sleep(0.005)
    assert host._staging_leased
    return thread


def test_a_stalled_holder_is_cancelled_when_others_wait():
    host = _host()
    cancelled = threading.Event()
    progress = ReceiveProgress(min_rate=1e6, patience=0.2, cancel=cancelled.set)

    def stalled(staging):
        assert staging is not None  # it was lent the staging buffer
        if not cancelled.wait(10):
            return _grads()
        raise ConnectionError("cancelled")  # what a transport's read does once cancelled

    outcome: dict = {}
    thread = _holder(host, progress, stalled, outcome)
    started = time.monotonic()
    assert host.push("w1", "r1", 0, lambda _s: _grads(), timeout=5).outcome == "applied"
    assert time.monotonic() - started < 5  # about one patience (0.2 s), not the holder's 10 s
    thread.join(5)
    assert isinstance(outcome.get("error"), ConnectionError) and progress.cancelled
    assert host.iterations == 1 and not host._staging_leased


def test_a_holder_that_keeps_its_pace_is_waited_for():
    host = _host()
    cancelled = threading.Event()
    progress = ReceiveProgress(min_rate=1000, patience=0.5, cancel=cancelled.set)

    def moving(staging):
        for _ in range(20):  # 1 s at 10 kB/s: ten times the minimum pace, in small bursts
            time.sleep(0.05)
            progress.add(500)
        return _grads()

    outcome: dict = {}
    thread = _holder(host, progress, moving, outcome)
    assert host.push("w1", "r1", 0, lambda _s: _grads(), timeout=5).outcome == "applied"
    thread.join(5)
    assert outcome["result"].outcome == "applied" and not cancelled.is_set()
    assert host.iterations == 2
