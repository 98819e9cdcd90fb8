"""Tensor framing shared by client and server: NumPy arrays <-> adamax.v1 stream frames.

Every streaming message of the contract is a oneof of a call-specific header (field 1), a
``TensorHeader`` (field 14) and a raw ``chunk`` (field 15). Because those field numbers are
the same in every streaming message, a frame can be written as wire bytes directly:

* sending: each chunk frame is ``tag + varint(length) + memoryview slice`` joined once, so
  a tensor is copied exactly once into the outgoing messages (protobuf would copy twice);
* receiving: a chunk frame is recognised by its tag and handed on as a ``memoryview`` of the
  received bytes, then copied once into a buffer preallocated for the whole tensor, which
  ``np.frombuffer``-style views turn into the array without another copy.

Frames that are not chunks are parsed by the generated message class, so the hand-written
part is limited to one tag and one varint. ``tests/test_proto_codegen.py`` checks that the
bytes written here parse identically with protobuf.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from adamax_wire.errors import WireFormatError
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb


DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
# Refuse tensors whose header announces more than this before allocating anything.
DEFAULT_MAX_TENSOR_BYTES = 64 * 1024**3

HEADER_FIELD = 1
TENSOR_FIELD = 14
CHUNK_FIELD = 15
_WIRE_TYPE_LEN = 2


def _tag(field: int) -> bytes:
    return _varint((field << 3) | _WIRE_TYPE_LEN)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise WireFormatError("truncated varint in stream frame")


_HEADER_TAG = _tag(HEADER_FIELD)
_TENSOR_TAG = _tag(TENSOR_FIELD)
_CHUNK_TAG = _tag(CHUNK_FIELD)


@runtime_checkable
class RowSparse(Protocol):
    """Anything with ``indices`` (rows of axis 0) and ``values``: a row-sparse gradient."""

    indices: Any
    values: Any


class RowSparseGradient(NamedTuple):
    """Gradient for rows ``indices`` of axis 0 of a variable; duplicate rows add up."""

    indices: np.ndarray
    values: np.ndarray


# ---------------------------------------------------------------- dtypes

_NUMPY_BY_WIRE: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.BFLOAT16: np.dtype("<u2"),  # raw upper halves of float32
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
}
_WIRE_BY_NAME: dict[str, int] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "float64": pb.FLOAT64,
    "bfloat16": pb.BFLOAT16,
    "int64": pb.INT64,
    "int32": pb.INT32,
}
FLOAT_WIRE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def wire_dtype(dtype: str | np.dtype | type) -> int:
    """The ``adamax.v1.DType`` value for a NumPy dtype or dtype name."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        return _WIRE_BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"`dtype` must be one of {sorted(_WIRE_BY_NAME)}. Received: dtype={name}"
        ) from None


def dtype_name(code: int) -> str:
    """Inverse of :func:`wire_dtype` (``"bfloat16"`` for BFLOAT16)."""
    for name, value in _WIRE_BY_NAME.items():
        if value == code:
            return name
    raise WireFormatError(f"unknown wire dtype {code}")


def numpy_dtype(code: int) -> np.dtype:
    """The dtype arrays of wire dtype ``code`` decode to (float32 for bfloat16)."""
    if code == pb.BFLOAT16:
        return np.dtype(np.float32)
    try:
        return _NUMPY_BY_WIRE[code].newbyteorder("=")
    except KeyError:
        raise WireFormatError(f"unknown wire dtype {code}") from None


def _itemsize(code: int) -> int:
    try:
        return _NUMPY_BY_WIRE[code].itemsize
    except KeyError:
        raise WireFormatError(f"unknown wire dtype {code}") from None


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even, NaN kept NaN."""
    bits = np.asarray(array).astype(np.float32, order="C", copy=False).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32, exactly (shift into the high half of uint32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- sending


def message_frame(field: int, message: Any) -> bytes:
    """Serialized frame holding ``message`` in oneof field ``field``."""
    payload = message.SerializeToString()
    return b"".join((_tag(field), _varint(len(payload)), payload))


def header_frame(message: Any) -> bytes:
    return message_frame(HEADER_FIELD, message)


def _byte_view(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def _as_wire_array(array: Any, name: str, requested: str | None) -> tuple[int, np.ndarray]:
    array = np.asarray(array)
    if array.dtype.name in ("int32", "int64") and requested is None:
        code = wire_dtype(array.dtype)
        return code, array.astype(_NUMPY_BY_WIRE[code], order="C", copy=False)
    if array.dtype.kind != "f":
        raise ValueError(
            f"Tensor '{name}' must have a floating dtype ({', '.join(FLOAT_WIRE_DTYPES)}). "
            f"Received: dtype={array.dtype}"
        )
    target = requested or array.dtype.name
    if target == "bfloat16":
        return pb.BFLOAT16, to_bfloat16_bits(array)
    code = wire_dtype(target)
    # astype, not ascontiguousarray: the latter turns 0-d arrays into 1-d ones.
    return code, array.astype(_NUMPY_BY_WIRE[code], order="C", copy=False)


def tensor_payload(
    name: str, value: Any, *, wire: str | None = None, group: int = pb.TENSOR_GROUP_UNSPECIFIED
) -> tuple[Any, list[memoryview]]:
    """(TensorHeader, the byte views of its payload in order) for one tensor.

    ``value`` is an array, a row-sparse gradient (``indices``/``values``) or None (absent).
    ``wire`` optionally narrows floats on the wire ("float16", "bfloat16", ...).
    """
    if value is None:
        return pb.TensorHeader(name=name, absent=True, group=group), []
    if isinstance(value, RowSparse) and not isinstance(value, np.ndarray):
        indices = np.asarray(value.indices).reshape(-1).astype("<i8", order="C", copy=False)
        code, values = _as_wire_array(value.values, name, wire)
        if values.ndim == 0 or values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"Row-sparse gradient '{name}' needs one row of `values` per index. "
                f"Received: indices.shape={indices.shape}, values.shape={values.shape}"
            )
        header = pb.TensorHeader(
            name=name,
            dtype=code,
            shape=values.shape,
            nbytes=indices.nbytes + values.nbytes,
            layout=pb.ROW_SPARSE,
            num_rows=indices.shape[0],
            group=group,
        )
        return header, [_byte_view(indices), _byte_view(values)]
    code, array = _as_wire_array(value, name, wire)
    header = pb.TensorHeader(
        name=name, dtype=code, shape=array.shape, nbytes=array.nbytes, layout=pb.DENSE, group=group
    )
    return header, [_byte_view(array)]


def tensor_frames(
    name: str,
    value: Any,
    *,
    wire: str | None = None,
    group: int = pb.TENSOR_GROUP_UNSPECIFIED,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """Frames for one tensor: its header, then chunk frames of at most ``chunk_bytes``."""
    header, views = tensor_payload(name, value, wire=wire, group=group)
    yield message_frame(TENSOR_FIELD, header)
    yield from chunk_frames(views, chunk_bytes)


def chunk_frames(views: Iterable[memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Chunk frames over consecutive byte views; each frame copies its slice once."""
    if chunk_bytes <= 0:
        raise ValueError(f"`chunk_bytes` must be positive. Received: chunk_bytes={chunk_bytes}")
    for view in views:
        for start in range(0, len(view), chunk_bytes):
            piece = view[start : start + chunk_bytes]
            yield b"".join((_CHUNK_TAG, _varint(len(piece)), piece))


# ---------------------------------------------------------------- receiving


def frame_deserializer(message_cls: Any) -> Callable[[bytes], Any]:
    """A gRPC deserializer returning a memoryview for chunk frames, else a parsed message."""

    def parse(raw: bytes) -> Any:
        if raw[:1] == _CHUNK_TAG:
            length, pos = _read_varint(raw, 1)
            if pos + length == len(raw):
                return memoryview(raw)[pos:]
        return message_cls.FromString(raw)

    return parse


def identity_serializer(frame: bytes) -> bytes:
    """Serializer for frames that are already wire bytes (see :func:`message_frame`)."""
    return frame


class DecodedTensor(NamedTuple):
    header: Any  # pb.TensorHeader
    value: np.ndarray | RowSparseGradient | None


TensorCheck = Callable[[Any], None]


def expected_nbytes(header: Any) -> int:
    if any(d < 0 for d in header.shape):
        raise WireFormatError(f"tensor '{header.name}': negative dimension in shape {tuple(header.shape)}")
    count = math.prod(header.shape)
    nbytes = count * _itemsize(header.dtype)
    if header.layout == pb.ROW_SPARSE:
        if not header.shape or header.shape[0] != header.num_rows:
            raise WireFormatError(
                f"row-sparse tensor '{header.name}': values shape {tuple(header.shape)} must start "
                f"with num_rows={header.num_rows}"
            )
        nbytes += header.num_rows * 8
    elif header.layout != pb.DENSE:
        raise WireFormatError(f"tensor '{header.name}': unknown layout {header.layout}")
    return nbytes


# ``allocate(header, nbytes)`` may supply a tensor's receive buffer (uint8, nbytes long) and a
# callback told of every byte range as it is filled; None: a plain np.empty buffer. A GPU server
# uses it to receive into pinned memory and start host-to-device copies chunk by chunk.
Allocator = Callable[[Any, int], "tuple[np.ndarray, Callable[[int, int], None] | None] | None"]


class PendingTensor:
    __slots__ = ("header", "buffer", "filled", "on_filled")

    def __init__(self, header: Any, max_tensor_bytes: int, allocate: Allocator | None = None) -> None:
        expected = expected_nbytes(header)
        if header.nbytes != expected:
            raise WireFormatError(
                f"tensor '{header.name}': header announces {header.nbytes} bytes but shape "
                f"{tuple(header.shape)} of {dtype_name(header.dtype)} needs {expected}"
            )
        if expected > max_tensor_bytes:
            raise WireFormatError(
                f"tensor '{header.name}' has {expected} bytes, more than the limit of {max_tensor_bytes}"
            )
        self.header = header
        supplied = allocate(header, expected) if allocate is not None else None
        if supplied is None:
            self.buffer, self.on_filled = np.empty(expected, dtype=np.uint8), None
        else:
            self.buffer, self.on_filled = supplied
        self.filled = 0

    def add(self, chunk: bytes | memoryview) -> None:
        end = self.filled + len(chunk)
        if end > self.buffer.size:
            raise WireFormatError(
                f"tensor '{self.header.name}': received more than the announced {self.buffer.size} bytes"
            )
        self.buffer[self.filled : end] = np.frombuffer(chunk, dtype=np.uint8)
        if self.on_filled is not None:
            self.on_filled(self.filled, end)
        self.filled = end

    def finish(self) -> DecodedTensor:
        if self.filled != self.buffer.size:
            raise WireFormatError(
                f"tensor '{self.header.name}': stream ended after {self.filled} of {self.buffer.size} bytes"
            )
        return decode_buffer(self.header, self.buffer)


def decode_buffer(header: Any, buffer: np.ndarray) -> DecodedTensor:
    """The tensor a complete payload (uint8, ``expected_nbytes(header)`` long) holds; no copy
    except the bfloat16 -> float32 widening."""
    offset = header.num_rows * 8 if header.layout == pb.ROW_SPARSE else 0
    raw = buffer[offset:].view(_NUMPY_BY_WIRE[header.dtype]).reshape(tuple(header.shape))
    values = from_bfloat16_bits(raw) if header.dtype == pb.BFLOAT16 else raw
    if header.layout == pb.ROW_SPARSE:
        indices = buffer[:offset].view("<i8")
        return DecodedTensor(header, RowSparseGradient(indices, values))
    return DecodedTensor(header, values)


def decode_stream(
    frames: Iterable[Any],
    *,
    check_tensor: TensorCheck | None = None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    on_header: Callable[[Any], None] | None = None,
    allocate: Allocator | None = None,
) -> tuple[Any, list[DecodedTensor]]:
    """Read a whole stream: returns its call header and the decoded tensors in order.

    ``check_tensor(tensor_header)`` runs before any buffer for that tensor is allocated, so
    a receiver can reject unknown names or wrong shapes without reading the payload.
    ``on_header(header)`` runs as soon as the call header arrives (e.g. for dedup lookups).
    """
    header = None
    tensors: list[DecodedTensor] = []
    pending: PendingTensor | None = None
    for frame in frames:
        if isinstance(frame, memoryview):
            kind, payload = "chunk", frame
        else:
            kind = frame.WhichOneof("frame")
            payload = getattr(frame, kind) if kind else None
        if kind == "header":
            if header is not None or tensors or pending is not None:
                raise WireFormatError("the call header must be the first frame, and only once")
            header = payload
            if on_header is not None:
                on_header(header)
            continue
        if header is None:
            raise WireFormatError("the first frame of a stream must be its call header")
        if kind == "tensor":
            if pending is not None:
                tensors.append(pending.finish())
                pending = None
            if check_tensor is not None:
                check_tensor(payload)
            if payload.absent:
                tensors.append(DecodedTensor(payload, None))
            else:
                pending = PendingTensor(payload, max_tensor_bytes, allocate)
        elif kind == "chunk":
            if pending is None:
                raise WireFormatError("a chunk frame must follow a tensor header")
            pending.add(payload)
        else:
            raise WireFormatError("empty frame (no oneof field set)")
    if pending is not None:
        tensors.append(pending.finish())
    if header is None:
        raise WireFormatError("empty stream: the call header is missing")
    return header, tensors


def named_tensor_frames(
    items: Sequence[tuple[str, Any]],
    *,
    wire: str | None = None,
    group: int = pb.TENSOR_GROUP_UNSPECIFIED,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """Frames for several named tensors, in order."""
    for name, value in items:
        yield from tensor_frames(name, value, wire=wire, group=group, chunk_bytes=chunk_bytes)
