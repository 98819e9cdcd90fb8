"""The thread plan of co-located workers: the cores split over the host's workers, only ever lowered."""

from __future__ import annotations

import logging

import pytest

from adamax_client import _threads


@pytest.mark.parametrize(
    ("target", "local"),
    [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:50051", True), ("dns:///127.0.0.1:5", True),
     ("10.255.255.1:50051", False), ("192.0.2.7:1", False)],
)
def test_local_targets_are_recognised(target, local):
    assert _threads.is_local_target(target) is local


@pytest.mark.parametrize(
    ("cores", "workers", "local", "threads", "oversubscribed"),
    [(16, 4, True, 4, False), (16, 4, False, 4, False), (2, 2, True, 1, False), (2, 1, True, 2, False),
     (8, 1, False, 8, False), (2, 4, True, 1, True)],
)
def test_the_plan_splits_the_cores(monkeypatch, cores, workers, local, threads, oversubscribed):
    monkeypatch.setattr(_threads, "available_cores", lambda: cores)
    target = "127.0.0.1:1" if local else "192.0.2.7:1"
    plan = _threads.plan_threads(target, workers)
    assert (plan.threads, plan.oversubscribed, plan.shares_server_host) == (threads, oversubscribed, local)


def test_torch_threads_are_only_lowered_and_explained(monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setattr(_threads, "available_cores", lambda: 8)
    try:
        torch.set_num_threads(8)
        with caplog.at_level(logging.INFO, logger="adamax_client"):
            assert _threads.apply_torch_threads("127.0.0.1:1", 2, "auto") == 4
        assert torch.get_num_threads() == 4 and "8 -> 4" in caplog.text
        assert _threads.apply_torch_threads("127.0.0.1:1", 2, "auto") is None  # already low enough
        assert _threads.apply_torch_threads("127.0.0.1:1", 2, None) is None and torch.get_num_threads() == 4
        assert _threads.apply_torch_threads("127.0.0.1:1", 2, 2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            _threads.apply_torch_threads("127.0.0.1:1", 2, 0)
        monkeypatch.setattr(_threads, "available_cores", lambda: 2)
        with caplog.at_level(logging.WARNING, logger="adamax_client"):
            _threads.apply_torch_threads("127.0.0.1:1", 4, "auto")
        assert "4 workers on 2 core(s)" in caplog.text
    finally:
        torch.set_num_threads(before)
