"""The checkpoint stream of the contract: a ``CheckpointHeader`` with the manifest, then each tensor
file's tensors named ``"<file>/<tensor>"`` in the usual chunked tensor framing. Used by
``adamax_client.checkpoints`` (download/upload) and the server's checkpoint service alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

#: ``{file name: {tensor name: array}}``, as the manifest lists them.
Files = dict[str, dict[str, np.ndarray]]
#: ``progress(done_bytes, total_bytes)``.
Progress = Callable[[int, int], None]


def checkpoint_frames(
    checkpoint_id: str,
    manifest: Mapping[str, Any],
    files: Mapping[str, Mapping[str, np.ndarray]],
    *,
    chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
    restore: bool = False,
    save: bool = False,
    progress: Progress | None = None,
) -> Iterator[bytes]:
    """A checkpoint stream: header with the manifest, then tensors named ``"<file>/<tensor>"``."""
    total = sum(np.asarray(a).nbytes for tensors in files.values() for a in tensors.values())
    yield _wire.header_frame(
        pb.CheckpointHeader(
            checkpoint_id=checkpoint_id, manifest_json=json.dumps(manifest), total_bytes=total, restore=restore, save=save
        )
    )
    done = 0
    for file_name, tensors in files.items():
        for name, array in tensors.items():
            yield from _wire.tensor_frames(f"{file_name}/{name}", array, chunk_bytes=chunk_bytes)
            done += np.asarray(array).nbytes
            if progress is not None:
                progress(done, total)


def files_from_tensors(tensors: Sequence[_wire.DecodedTensor]) -> Files:
    """Decoded ``"<file>/<tensor>"`` tensors -> ``{file: {tensor: array}}``."""
    files: Files = {}
    for t in tensors:
        file_name, sep, name = t.header.name.partition("/")
        if not sep or not isinstance(t.value, np.ndarray):
            raise _wire.WireFormatError(f"checkpoint tensor {t.header.name!r} must be a dense '<file>/<tensor>'")
        if name in files.setdefault(file_name, {}):
            raise _wire.WireFormatError(f"checkpoint tensor {t.header.name!r} was sent twice")
        files[file_name][name] = t.value
    return files
