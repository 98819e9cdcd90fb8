"""Worker processes for tests/test_service_workers.py (started with multiprocessing spawn).

Only the client package is imported here, as on a real worker machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))

from adamax_client import RemoteAdamax, StaleGradientError  # noqa: E402

SHAPES = {"w": (8, 4), "b": (4,)}


def initial_variables() -> dict[str, np.ndarray]:
    return {"w": np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4), "b": np.zeros(4, np.float32)}


def gradient(weights: dict[str, np.ndarray], worker: int, version: int) -> dict[str, np.ndarray]:
    """Deterministic in (weights, worker, version), so the test can replay it in-process."""
    rng = np.random.default_rng(1000 * worker + version)
    return {
        name: (weights[name] * np.float32(0.5) + rng.standard_normal(shape).astype(np.float32))
        for name, shape in SHAPES.items()
    }


def sync_worker(target: str, key: str, worker: int, steps: int, kwargs: dict) -> list[tuple[int, str]]:
    """Pull, compute, push until the server reaches ``steps`` versions; returns (step, outcome)."""
    log = []
    with RemoteAdamax(target, worker_id=f"w{worker}", name=key, mode="sync", timeout=30, **kwargs) as opt:
        opt.build(initial_variables())
        while True:
            weights = opt.pull()
            if opt.version >= steps:
                return log
            result = opt.push(gradient(weights, worker, opt.version))
            log.append((opt.version, result.outcome))


def async_worker(target: str, key: str, worker: int, pushes: int, kwargs: dict) -> list[tuple[int, int, str]]:
    """``pushes`` applied pushes, re-pulling on stale rejections; returns (step, version, outcome)."""
    log = []
    with RemoteAdamax(target, worker_id=f"w{worker}", name=key, mode="async", timeout=30, **kwargs) as opt:
        opt.build(initial_variables())
        applied = 0
        while applied < pushes:
            weights = opt.pull()
            step = opt.version
            try:
                result = opt.push(gradient(weights, worker, step))
            except StaleGradientError as exc:
                log.append((step, int(exc.current_version), "stale"))
                continue
            applied += 1
            log.append((step, result.version, result.outcome))
    return log
