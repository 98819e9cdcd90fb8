"""Staged gradients (what the server writes as chunks arrive) give exactly what ``apply`` gives."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from adamax_server import Adamax
from adamax_server.optim.kernels import gpu_available

DEVICES = [
    "reference",
    "numpy",
    "numba",
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no CuPy/GPU")]),
]
if os.environ.get("ADAMAX_PS_TEST_DEVICES"):
    DEVICES = os.environ["ADAMAX_PS_TEST_DEVICES"].split(",")

SHAPES = {"emb": (300, 17), "bias": (17,), "scalar": (), "big": (70001,)}


def _init(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"clipnorm": 0.3, "use_ema": True}, {"gradient_accumulation_steps": 2, "weight_decay": 0.01}],
)
def test_chunked_staging_equals_apply(device: str, kwargs: dict) -> None:
    a = Adamax(device=device, **kwargs)
    b = Adamax(device=device, **kwargs)
    a.build(_init())
    b.build(_init())
    rng = np.random.default_rng(1)
    for step in range(5):
        grads = {k: rng.standard_normal(s).astype(np.float16) for k, s in SHAPES.items()}
        if step == 2:
            grads.pop("bias")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a.apply(grads)
        for name, g in grads.items():
            flat = g.reshape(-1)
            # Uneven chunks, written out of order: receive order must not matter.
            cuts = [0, flat.size // 3, flat.size // 3 + 7, flat.size]
            pieces = [(cuts[i], flat[cuts[i] : cuts[i + 1]]) for i in range(len(cuts) - 1)]
            for offset, piece in reversed(pieces):
                if piece.size:
                    b.stage_gradient(name, piece, offset)
        b.apply_staged(list(grads))
        for name in SHAPES:
            np.testing.assert_array_equal(a.trainable_variables[name], b.trainable_variables[name])
    sa: dict = {}
    sb: dict = {}
    a.save_own_variables(sa)
    b.save_own_variables(sb)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key])


@pytest.mark.parametrize("device", DEVICES)
def test_staging_larger_than_pinned_chunk(device: str) -> None:
    """A gradient bigger than one pinned staging buffer (4 MiB) crosses several ring slots."""
    n = 3 * (1 << 20) + 5  # 12 MiB of float32
    a = Adamax(device=device)
    b = Adamax(device=device)
    init = {"w": np.linspace(-1, 1, n, dtype=np.float32)}
    a.build(init)
    b.build(init)
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    a.apply([g])
    b.stage_gradient("w", g)
    b.apply_staged()
    np.testing.assert_array_equal(a.trainable_variables["w"], b.trainable_variables["w"])


def test_stage_gradient_errors() -> None:
    opt = Adamax(device="reference")
    opt.build({"w": np.zeros(10, np.float32)})
    with pytest.raises(KeyError, match="Unknown variable"):
        opt.stage_gradient("nope", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"covers elements \[8, 11\)"):
        opt.stage_gradient("w", np.zeros(3, np.float32), offset=8)
    with pytest.raises(ValueError, match="dtype int64"):
        opt.stage_gradient("w", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.apply_staged([])
    with pytest.raises(ValueError, match="must be built"):
        Adamax(device="reference").apply_staged()


def test_cpu_engines_have_no_device_receiver() -> None:
    opt = Adamax(device="numba")
    opt.build({"w": np.zeros(3, np.float32)})
    assert opt.device_receiver() is None


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CuPy/GPU")
@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_gradients_copied_to_the_gpu_while_received_equal_apply(wire: str) -> None:
    """The server's push path on a GPU: decode into pinned buffers, copy each chunk as it lands."""
    from adamax_wire import tensors as _wire
    from adamax_server.optim.engine import DeviceStagedArray

    init = _init()
    a = Adamax(device="gpu")
    b = Adamax(device="gpu")
    a.build(init)
    b.build(init)
    rng = np.random.default_rng(3)
    for _ in range(3):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        frames = [
            f for name, g in grads.items() for f in _wire.tensor_frames(name, g, wire=wire, chunk_bytes=4096)
        ]
        receiver = b.device_receiver()
        parse = _wire.frame_deserializer(_push_request())
        raw = [_wire.header_frame(_wire_header()), *frames]
        decoded = _wire.decode_stream([parse(f) for f in raw], allocate=receiver.allocate)[1]
        receiver.wait()  # as the server does when the stream ends
        values = {t.header.name: receiver.wrap(t.header.name, t.value) for t in decoded}
        if wire != "bfloat16":  # bfloat16 is widened on the host, so it takes the plain path
            assert all(isinstance(v, DeviceStagedArray) for k, v in values.items() if v.size)
        a.apply({k: np.asarray(v) for k, v in values.items()})
        b.apply(values)
        for name in SHAPES:
            np.testing.assert_array_equal(a.trainable_variables[name], b.trainable_variables[name])


def _wire_header():
    from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

    return pb.PushHeader(optimizer="m", worker_id="w", step=0, request_id="r", num_tensors=len(SHAPES))


def _push_request():
    from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

    return pb.PushRequest


@pytest.mark.parametrize("device", ["reference", "numpy", "numba"])
@pytest.mark.parametrize("kwargs", [{}, {"clipnorm": 0.3, "use_ema": True}, {"gradient_accumulation_steps": 2}])
def test_gradients_received_into_an_exchanged_set_equal_apply(device: str, kwargs: dict) -> None:
    """A server receives a push into a gradient set and swaps it in as the staging buffers."""
    a = Adamax(device=device, **kwargs)
    b = Adamax(device=device, **kwargs)
    a.build(_init())
    b.build(_init())
    spare = a.new_gradient_set()
    for step in range(4):
        grads = _init(seed=step + 1)
        present = {k: v for k, v in grads.items() if not (step == 2 and k == "bias")}
        views = {}
        for name, value in present.items():
            view = a.gradient_set_view(spare, name)
            view[...] = value.reshape(-1)
            views[name] = view.reshape(value.shape)
        spare = a.exchange_gradient_buffers(spare)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a.apply(views)
            b.apply(present)
    for name, value in b.trainable_variables.items():
        np.testing.assert_array_equal(a.trainable_variables[name], value)
        assert a.trainable_variables[name].tobytes() == value.tobytes()


def test_exchange_gradient_buffers_checks_the_layout() -> None:
    a = Adamax(device="numba")
    a.build(_init())
    bad = {k: np.empty(v.size + 1, v.dtype) for k, v in a.new_gradient_set().items()}
    with pytest.raises(ValueError, match="gradient set"):
        a.exchange_gradient_buffers(bad)
    assert a.gradient_set_layout() == tuple((k, v.size, v.dtype.str) for k, v in a.new_gradient_set().items())
