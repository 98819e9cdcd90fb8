"""The committed generated code matches proto/, and the hand-written framing matches protobuf."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest

from _ps_helpers import REPO_ROOT

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb


def _load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO_ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_matches_a_fresh_generation():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (pinned in scripts/gen_proto.py) is needed to regenerate")
    problems = _load_gen_script().check()
    assert problems == [], "run scripts/gen_proto.py: " + "; ".join(problems)


def test_generated_code_has_type_stubs():
    assert (REPO_ROOT / "wire/adamax_wire/proto/adamax/v1/adamax_pb2.pyi").exists()


@pytest.mark.parametrize("message_cls", [pb.PushRequest, pb.BuildRequest, pb.PullResponse, pb.StoreFrame,
                                         pb.AssignRequest, pb.SetWeightsRequest, pb.StatelessApplyFrame])
def test_every_stream_message_shares_the_tensor_and_chunk_field_numbers(message_cls):
    fields = message_cls.DESCRIPTOR.fields_by_name
    assert fields["tensor"].number == _wire.TENSOR_FIELD
    assert fields["chunk"].number == _wire.CHUNK_FIELD
    assert fields["header"].number == _wire.HEADER_FIELD


def test_hand_written_frames_are_valid_protobuf():
    header = pb.PushHeader(optimizer="m", worker_id="w", step=3, request_id="r")
    frames = [_wire.header_frame(header)]
    frames += list(_wire.tensor_frames("a", np.arange(10, dtype=np.float32), chunk_bytes=16))
    frames += list(_wire.tensor_frames("big", np.zeros(70_000, np.float64), chunk_bytes=300_000))
    for frame in frames:
        parsed = pb.PushRequest.FromString(frame)
        assert parsed.SerializeToString() == frame
    assert pb.PushRequest.FromString(frames[0]).header == header
    # chunk frames come back as memoryviews with the raw bytes
    chunk = _wire.frame_deserializer(pb.PushRequest)(frames[2])
    assert isinstance(chunk, memoryview) and bytes(chunk) == pb.PushRequest.FromString(frames[2]).chunk


def _roundtrip(items, **kwargs):
    frames = [_wire.header_frame(pb.OptimizerRef(optimizer="x"))]
    for name, value in items:
        frames += list(_wire.tensor_frames(name, value, **kwargs))
    parse = _wire.frame_deserializer(pb.StoreFrame)
    header, tensors = _wire.decode_stream(parse(f) for f in frames)
    assert header.optimizer == "x"
    return tensors


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 4)])
def test_dense_roundtrip_is_exact(dtype, shape):
    value = (np.random.default_rng(0).standard_normal(shape) * 100).astype(dtype)
    (tensor,) = _roundtrip([("v", value)], chunk_bytes=7)
    assert tensor.value.dtype == np.dtype(dtype) and tensor.value.shape == shape
    assert tensor.value.tobytes() == value.tobytes()


def test_non_contiguous_and_big_endian_inputs_are_sent_in_c_order():
    base = np.arange(24, dtype=">f4").reshape(4, 6)
    (a, b) = _roundtrip([("t", base.T), ("s", base[:, ::2])])
    np.testing.assert_array_equal(a.value, base.T)
    np.testing.assert_array_equal(b.value, base[:, ::2])


def test_bfloat16_widens_exactly_by_shifting():
    values = np.array([1.0, -2.5, 3.140625, 1e-30, np.inf, -np.inf, 0.0, -0.0], np.float32)
    (tensor,) = _roundtrip([("b", values)], wire="bfloat16")
    assert tensor.header.dtype == pb.BFLOAT16 and tensor.value.dtype == np.float32
    bits = values.view(np.uint32) >> 16 << 16
    # every value above is representable in bfloat16 except 1e-30 (rounded)
    assert tensor.value.view(np.uint32)[[0, 1, 2, 4, 5, 6, 7]].tolist() == bits[[0, 1, 2, 4, 5, 6, 7]].tolist()
    nan = _roundtrip([("n", np.array([np.nan], np.float32))], wire="bfloat16")[0].value
    assert np.isnan(nan).all()


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20], np.float32)
    widened = _wire.from_bfloat16_bits(_wire.to_bfloat16_bits(x))
    np.testing.assert_array_equal(widened, np.array([1.0, 1.0 + 2**-6, 1.0 + 2**-7], np.float32))


def test_row_sparse_and_absent_roundtrip():
    sparse = _wire.RowSparseGradient(np.array([4, 0, 4]), np.ones((3, 2), np.float16))
    tensors = _roundtrip([("e", sparse), ("none", None)], chunk_bytes=5)
    assert tensors[0].header.layout == pb.ROW_SPARSE
    np.testing.assert_array_equal(tensors[0].value.indices, [4, 0, 4])
    assert tensors[0].value.values.dtype == np.float16
    assert tensors[1].value is None and tensors[1].header.absent


def _frames_for(value, **kwargs):
    return [_wire.header_frame(pb.OptimizerRef(optimizer="x")), *_wire.tensor_frames("v", value, **kwargs)]


def test_truncated_and_overlong_streams_are_rejected():
    parse = _wire.frame_deserializer(pb.StoreFrame)
    frames = _frames_for(np.zeros(100, np.float32), chunk_bytes=64)
    with pytest.raises(_wire.WireFormatError, match="stream ended after"):
        _wire.decode_stream(parse(f) for f in frames[:-1])
    with pytest.raises(_wire.WireFormatError, match="more than the announced"):
        _wire.decode_stream(parse(f) for f in itertools.chain(frames, frames[-1:]))


def test_header_byte_length_must_match_shape_and_dtype():
    header = pb.TensorHeader(name="v", dtype=pb.FLOAT32, shape=[3], nbytes=10, layout=pb.DENSE)
    frames = [_wire.header_frame(pb.OptimizerRef()), _wire.message_frame(_wire.TENSOR_FIELD, header)]
    with pytest.raises(_wire.WireFormatError, match="announces 10 bytes but shape"):
        _wire.decode_stream(pb.StoreFrame.FromString(f) for f in frames)


def test_tensor_size_limit_is_checked_before_allocation():
    header = pb.TensorHeader(name="v", dtype=pb.FLOAT64, shape=[2**40], nbytes=8 * 2**40, layout=pb.DENSE)
    frames = [_wire.header_frame(pb.OptimizerRef()), _wire.message_frame(_wire.TENSOR_FIELD, header)]
    with pytest.raises(_wire.WireFormatError, match="more than the limit"):
        _wire.decode_stream((pb.StoreFrame.FromString(f) for f in frames), max_tensor_bytes=2**30)


def test_stream_must_start_with_its_header():
    frames = list(_wire.tensor_frames("v", np.zeros(2, np.float32)))
    with pytest.raises(_wire.WireFormatError, match="first frame"):
        _wire.decode_stream(pb.StoreFrame.FromString(f) for f in frames)


def test_integer_gradients_and_unknown_dtypes_are_refused_locally():
    with pytest.raises(ValueError, match="dtype"):
        list(_wire.tensor_frames("v", np.zeros(2, np.complex64)))
    with pytest.raises(ValueError, match="one row of `values` per index"):
        list(_wire.tensor_frames("v", _wire.RowSparseGradient(np.array([1, 2]), np.zeros((3, 2), np.float32))))
