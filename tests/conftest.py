"""Shared pytest setup: Keras on its NumPy backend, import paths, and the engine backend list.

Keras must see ``KERAS_BACKEND`` before its first import, so this file sets it first. The
``engine_backend`` fixture parametrises a test over the engine's array backends: the three CPU
backends always, plus ``"gpu"`` (marked ``gpu``, skipped without CuPy and a CUDA device).
``ADAMAX_PS_TEST_DEVICES`` (a comma list, e.g. ``gpu,reference``) replaces that list; the GPU
CI run uses it to push the engine tests through CuPy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "numpy")

_ROOT = Path(__file__).resolve().parents[1]
for _sub in ("server", "client", "wire", "tests"):
    _path = str(_ROOT / _sub)
    if _path not in sys.path:  # running without PYTHONPATH=server:client:wire or an install
        sys.path.insert(0, _path)

import pytest  # noqa: E402

from adamax_server.optim.kernels import gpu_available  # noqa: E402

CPU_BACKENDS = ("reference", "numpy", "numba")
ALL_BACKENDS = (*CPU_BACKENDS, "gpu")


def _have_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def selected_backends() -> list[str]:
    """The backend names this run tests: ``ADAMAX_PS_TEST_DEVICES`` or every backend."""
    env = os.environ.get("ADAMAX_PS_TEST_DEVICES", "").strip()
    if not env:
        return list(ALL_BACKENDS)
    names = [n.strip() for n in env.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"ADAMAX_PS_TEST_DEVICES names unknown backends {unknown}; choose from {ALL_BACKENDS}"
        )
    return names


def backend_param(name: str):
    """``pytest.param(name)`` with the marks that backend needs (gpu marker, skips)."""
    marks = []
    if name == "gpu":
        marks = [
            pytest.mark.gpu,
            pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU"),
        ]
    elif name == "numba":
        marks = [pytest.mark.skipif(not _have_numba(), reason="numba is not installed")]
    return pytest.param(name, marks=marks, id=name)


BACKEND_PARAMS = [backend_param(n) for n in selected_backends()]
# The fast paths are compared with the reference backend, so the reference itself is left out.
FAST_BACKEND_PARAMS = [backend_param(n) for n in selected_backends() if n != "reference"]


@pytest.fixture(params=BACKEND_PARAMS)
def engine_backend(request: pytest.FixtureRequest) -> str:
    """One engine backend name ("reference", "numpy", "numba" or "gpu")."""
    return request.param


@pytest.fixture(params=FAST_BACKEND_PARAMS or [pytest.param(None, marks=pytest.mark.skip(reason="no fast backend selected"))])
def fast_backend(request: pytest.FixtureRequest) -> str:
    """One backend other than "reference", to be compared with the reference backend."""
    return request.param
