"""Tensors far above gRPC's 4 MiB message limit travel in chunks, bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest

from _ps_helpers import running_server

from adamax_client import RemoteAdamax
from adamax_server import Adamax

MIB = 1024 * 1024


def _roundtrip(nbytes: int) -> None:
    n = nbytes // 4
    rng = np.random.default_rng(0)
    initial = rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal(n, dtype=np.float32)
    with running_server() as (target, _):
        with RemoteAdamax(target, name="big", learning_rate=0.01, timeout=120) as remote:
            remote.build({"big": initial, "small": np.ones(3, np.float32)})
            remote.apply({"big": grad})
            pulled = remote.pull()["big"]
    local = Adamax(learning_rate=0.01, device="cpu")
    local.build({"big": initial, "small": np.ones(3, np.float32)})
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        local.apply({"big": grad})
    expected = local.trainable_variables["big"]
    assert pulled.shape == (n,) and pulled.tobytes() == expected.tobytes()


def test_256_mib_variable_through_chunking():
    _roundtrip(256 * MIB)


@pytest.mark.slow
def test_1_gib_variable_through_chunking():
    _roundtrip(1024 * MIB)
