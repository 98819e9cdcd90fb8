"""Array backends for the Adamax engine and how one is chosen.

``device`` names a backend:

* ``"auto"``: CuPy on a GPU when CuPy imports and sees a device, else the CPU backend.
* ``"cpu"``: numba's fused parallel kernels, or blocked NumPy when numba is missing.
* ``"gpu"``: CuPy; an error when no GPU is usable.
* ``"numba"``, ``"numpy"``, ``"reference"``: one CPU backend by name (tests and benchmarks).

``ADAMAX_PS_DEVICE`` in the environment overrides ``"auto"`` (the GPU test run sets it to
``gpu`` to push the whole suite through CuPy).
"""

from __future__ import annotations

import os
from functools import lru_cache

# numba's parallel kernels run on OpenMP threads. GNU OpenMP's default lets idle threads spin
# after every parallel region; a server runs several short regions per push (statistics, apply)
# and shares its cores with the receiving threads (and, on a small host, other processes): the
# spinning cost 10-40 ms of CPU per 1M-param push here against 3 ms with sleeping threads.
# Set before the OpenMP runtime loads (the first parallel call); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from adamax_server.optim.kernels.base import Backend, FlatGroup, GroupStep, SegmentTable  # noqa: E402

__all__ = ["Backend", "FlatGroup", "GroupStep", "SegmentTable", "get_backend", "gpu_available"]

DEVICES = ("auto", "cpu", "gpu", "numba", "numpy", "reference")


@lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    try:
        import cupy  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_backend(device: str = "auto") -> Backend:
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {DEVICES}. Received: device={device!r}")
    if device == "auto":
        device = os.environ.get("ADAMAX_PS_DEVICE", "auto") or "auto"
        if device not in DEVICES:
            raise ValueError(
                f"ADAMAX_PS_DEVICE must be one of {DEVICES}. Received: {device!r}"
            )
        if device == "auto":
            device = "gpu" if gpu_available() else "cpu"
    if device == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "device='gpu' needs CuPy and a CUDA device; install adamax-ps[gpu] "
                "or use device='cpu'"
            )
        from adamax_server.optim.kernels.gpu import CupyBackend

        return CupyBackend()
    if device == "reference":
        from adamax_server.optim.kernels.reference import ReferenceBackend

        return ReferenceBackend()
    from adamax_server.optim.kernels.cpu import HAVE_NUMBA, BlockedNumpyBackend, NumbaBackend

    if device == "numpy" or (device == "cpu" and not HAVE_NUMBA):
        return BlockedNumpyBackend()
    return NumbaBackend()
