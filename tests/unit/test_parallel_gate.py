"""numba's ``workqueue`` threading layer aborts the process on concurrent parallel launches.

It is the layer numba falls back to without TBB or libgomp (the ``python:3.11-slim`` image), and
the server launches kernels from many threads. Each test runs in a subprocess with
``NUMBA_THREADING_LAYER`` forced, so the layer is the one named whatever this machine has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")

REPO_ROOT = Path(__file__).resolve().parents[2]

_HAMMER = textwrap.dedent(
    """
    import threading
    import numpy as np
    from adamax_server.optim.engine import Adamax
    from adamax_server.optim.kernels import stats
    from adamax_server.optim.kernels.parallel_gate import threading_layer

    stats._RECEIVE_PARALLEL_MIN = 1 << 10  # a push's statistics and copy through the pool too

    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 21).astype(np.float32)
    parts = [rng.standard_normal(1 << 21).astype(np.float32) for _ in range(2)]
    engines = []
    for k in range(2):  # two optimizers stepping at once, as two jobs on one server do
        opt = Adamax(learning_rate=0.01, global_clipnorm=1.0, device="numba")
        opt.build({"w": np.zeros(1 << 20, np.float32)})
        engines.append(opt)
    expected = stats.gradient_stats(x)
    errors = []

    def hammer(k):
        try:
            for i in range(12):
                assert stats.gradient_stats(x) == expected
                out = np.empty_like(x)
                stats.copy_with_stats(out, x)
                total = np.empty_like(x)
                stats.sum_with_stats(total, parts, 2)
                if k < 2:
                    engines[k].apply({"w": x[: 1 << 20]})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    print("layer", threading_layer())
    """
)


def _run(layer: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer,
           "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / d) for d in ("server", "client", "wire"))}
    return subprocess.run([sys.executable, "-c", _HAMMER], capture_output=True, text=True, timeout=600, env=env)


def test_concurrent_kernels_survive_the_workqueue_layer() -> None:
    proc = _run("workqueue")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Concurrent access" not in proc.stderr
    assert proc.stdout.split()[-1] == "workqueue"


def test_a_thread_safe_layer_is_not_serialized() -> None:
    proc = _run("threadsafe")  # TBB or OpenMP, whichever this machine has
    if proc.returncode != 0 and "No threading layer could be loaded" in proc.stderr:
        pytest.skip("neither TBB nor OpenMP is available to numba here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] in {"tbb", "omp"}
