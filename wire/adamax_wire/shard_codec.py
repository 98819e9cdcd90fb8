"""Arguments and results of ``ShardService.Call``: JSON for the structure, tensor frames for arrays.

The shard protocol (clients staging slices, the leader driving events, checkpoint tools) is a
small set of named methods whose arguments are plain data, NumPy arrays, row-sparse gradients
and a few records (dataclasses). ``encode`` turns such a value into a JSON document in which
every array is replaced by a reference to a tensor that travels in the call's frames;
``decode`` reverses it. Only records registered by name are rebuilt (never an arbitrary
class), so a peer cannot make the receiver instantiate anything else.

JSON forms: ``{"$t": k}`` tensor ``k``; ``{"$sp": k}`` row-sparse tensor ``k``;
``{"$s": dtype, "v": x}`` a NumPy scalar (exact: float32 and float64 values survive Python
floats); ``{"$tu": [...]}`` a tuple; ``{"$d": [[key, value], ...]}`` a dict (any keys, order
kept); ``{"$r": name, "f": {...}}`` a registered record; ``{"$a": dtype, "v": list}`` a
small array of a dtype the tensor framing has no code for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from adamax_wire import tensors as _wire

_FRAMED = {"float32", "float16", "float64", "int64", "int32"}


class Records:
    """The record types one side accepts, by name."""

    def __init__(self, *types: type) -> None:
        self._by_name: dict[str, type] = {}
        for t in types:
            self.add(t)

    def add(self, t: type) -> None:
        self._by_name[t.__name__] = t

    def get(self, name: str) -> type:
        t = self._by_name.get(name)
        if t is None:
            raise _wire.WireFormatError(f"unknown record type {name!r} in a shard call")
        return t


def encode(value: Any) -> tuple[str, list[tuple[str, Any]]]:
    """(JSON document, [(tensor name, array or row-sparse)]) for ``value``."""
    tensors: list[tuple[str, Any]] = []

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, np.generic):
            return x
        if isinstance(x, np.generic):
            return {"$s": x.dtype.name, "v": x.item()}
        if isinstance(x, np.ndarray):
            if x.dtype.name not in _FRAMED:
                return {"$a": x.dtype.name, "v": x.tolist(), "shape": list(x.shape)}
            tensors.append((str(len(tensors)), np.ascontiguousarray(x) if x.ndim else x.reshape(())))
            return {"$t": len(tensors) - 1}
        if _is_row_sparse(x):
            indices = np.asarray(x.indices, dtype=np.int64)
            tensors.append((str(len(tensors)), _wire.RowSparseGradient(indices, np.asarray(x.values))))
            return {"$sp": len(tensors) - 1}
        if isinstance(x, tuple) and hasattr(x, "_fields") and _registered(x):
            return {"$r": type(x).__name__, "f": {f: enc(getattr(x, f)) for f in x._fields}}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"$r": type(x).__name__, "f": {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, tuple):
            return {"$tu": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            return {"$d": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"cannot send a {type(x).__name__} in a shard call")

    doc = enc(value)
    return json.dumps(doc, allow_nan=True), tensors


def decode(
    doc: str,
    tensors: Sequence[Any],
    records: Records,
    sparse: Callable[[np.ndarray, np.ndarray], Any] = _wire.RowSparseGradient,
) -> Any:
    """The value ``encode`` made; ``sparse(indices, values)`` builds row-sparse gradients."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "$t" in x:
            return _tensor(tensors, x["$t"])
        if "$sp" in x:
            t = _tensor(tensors, x["$sp"])
            if not _is_row_sparse(t):
                raise _wire.WireFormatError("a row-sparse reference points at a dense tensor")
            return sparse(np.asarray(t.indices), np.asarray(t.values))
        if "$s" in x:
            return np.asarray(x["v"], dtype=_dtype(x["$s"]))[()]
        if "$a" in x:
            return np.asarray(x["v"], dtype=_dtype(x["$a"])).reshape(x["shape"])
        if "$tu" in x:
            return tuple(dec(v) for v in x["$tu"])
        if "$d" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["$d"]}
        if "$r" in x:
            t = records.get(x["$r"])
            fields = {k: dec(v) for k, v in x["f"].items()}
            return t(**fields)
        raise _wire.WireFormatError(f"unknown form in a shard call: {sorted(x)}")

    try:
        return dec(json.loads(doc))
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, _wire.WireFormatError):
            raise
        raise _wire.WireFormatError(f"malformed shard call: {exc}") from exc


def _tensor(tensors: Sequence[Any], k: Any) -> Any:
    if not isinstance(k, int) or not 0 <= k < len(tensors):
        raise _wire.WireFormatError(f"shard call refers to tensor {k!r} of {len(tensors)}")
    return tensors[k]


def _dtype(name: Any) -> np.dtype:
    if name not in _FRAMED and name not in {"bool", "uint8", "int8", "int16", "uint16", "uint32", "uint64"}:
        raise _wire.WireFormatError(f"dtype {name!r} is not allowed in a shard call")
    return np.dtype(name)


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


def _is_row_sparse(x: Any) -> bool:
    return isinstance(x, tuple) and getattr(x, "_fields", None) == ("indices", "values")


def _registered(x: Any) -> bool:
    return not _is_row_sparse(x)


# ---------------------------------------------------------------- CallOnce

#: Methods of the shard protocol whose reply is small by construction (no tensors, or a few
#: numbers per variable): sent with ``ShardService.CallOnce``, one message each way, when their
#: request's tensors hold at most ``ONCE_MAX_REQUEST_BYTES``. A streamed call costs several
#: times a unary one in gRPC Python, and these are the calls on every step's path (a commit
#: at the leader; prepare and commit of an event on every shard).
ONCE_METHODS = frozenset({
    "push", "stage_push", "prepare", "commit", "abort", "drop", "check", "mutate", "mutate_job", "set_learning_rate",
    "state_version", "open_bulk", "create", "status", "delete", "exclude_from_weight_decay",
})  # fmt: skip
ONCE_MAX_REQUEST_BYTES = 1 << 20


def call_once(method: str, tensors: Sequence[tuple[str, Any]]) -> bool:
    """Whether a call of ``method`` carrying ``tensors`` (from ``encode``) goes as ``CallOnce``."""
    if method not in ONCE_METHODS:
        return False
    total = 0
    for _, value in tensors:
        parts = (value.indices, value.values) if _is_row_sparse(value) else (value,)
        total += sum(np.asarray(p).nbytes for p in parts)
    return total <= ONCE_MAX_REQUEST_BYTES


def batch_bytes(frames: Any) -> bytes:
    """A serialized ``ShardCallBatch`` of already serialized ``ShardCallFrame``s (field 1, each
    length-delimited), without parsing them again."""
    out = bytearray()
    for frame in frames:
        n = len(frame)
        out.append(0x0A)
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        out += frame
    return bytes(out)
