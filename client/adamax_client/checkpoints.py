"""``CheckpointClient``: save, list, inspect, restore, download and upload a server's checkpoints.

A checkpoint is handled as ``(manifest, files)``: the manifest is the JSON dict the server
wrote (format version, optimizers, a sha256 per tensor) and ``files`` maps each tensor file
named in it to ``{tensor name: array}``. ``download`` returns that pair, ``upload`` sends one
(the server verifies every checksum before it writes or restores anything). The framing is
the chunked tensor framing of every other stream, so states of any size stream in chunks;
``progress(done_bytes, total_bytes)`` is called as chunks go by.

Errors are :class:`adamax_client.errors.AdamaxError` subclasses (a corrupt checkpoint is
``DataLossError``); no grpc or protobuf types escape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from adamax_wire import tensors as _wire
from adamax_wire.checkpoints import Files, Progress, checkpoint_frames, files_from_tensors
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_client.transport import RetryPolicy, Transport

@dataclass(frozen=True)
class CheckpointSummary:
    checkpoint_id: str
    created_unix: float
    reason: str
    nbytes: int
    optimizers: list[dict[str, Any]]  # optimizer, version, iterations, num_variables, nbytes
    valid: bool
    error: str
    format_version: int


@dataclass(frozen=True)
class RestoredOptimizer:
    optimizer: str
    version: int  # the new weights version; workers see it on their next call
    iterations: int


def _summary(msg: Any) -> CheckpointSummary:
    return CheckpointSummary(
        checkpoint_id=msg.checkpoint_id,
        created_unix=msg.created_unix,
        reason=msg.reason,
        nbytes=msg.nbytes,
        optimizers=[
            {"optimizer": o.optimizer, "version": o.version, "iterations": o.iterations,
             "num_variables": o.num_variables, "nbytes": o.nbytes}
            for o in msg.optimizers
        ],
        valid=msg.valid,
        error=msg.error,
        format_version=msg.format_version,
    )


def _restored(items: Iterable[Any]) -> list[RestoredOptimizer]:
    return [RestoredOptimizer(r.optimizer, r.version, r.iterations) for r in items]


def _counting(frames: Iterator[Any], total: Callable[[], int], progress: Progress) -> Iterator[Any]:
    done = 0
    for frame in frames:
        if isinstance(frame, memoryview):
            done += len(frame)
            progress(done, total())
        yield frame


# ``adamax_client.sharded.ShardedCheckpointClient``, registered when that module is imported (the
# package does): what ``CheckpointClient(shard_list)`` returns.
_SHARDED_CLASS: Any = None


class CheckpointClient:
    """The checkpoint calls of one server (``adamax-ps checkpoint ...`` uses this).

    Given a sharded job's shard list (``["h0:50051", "h1:50051"]`` or ``"h0:50051,h1:50051"``) it
    is an ``adamax_client.sharded.ShardedCheckpointClient`` acting on the whole job.
    """

    def __new__(cls, target: Any = "", *args: Any, **kwargs: Any) -> Any:
        targets = target.split(",") if isinstance(target, str) else list(target)
        if cls is CheckpointClient and len([t for t in targets if str(t).strip()]) > 1:
            if _SHARDED_CLASS is None:
                raise ImportError("import adamax_client (it registers the sharded checkpoint client)")
            return _SHARDED_CLASS(target, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
    ) -> None:
        self._transport = Transport(
            target, timeout=timeout, retry=retry, credentials=credentials, token=token, channel_options=channel_options
        )
        self._chunk_bytes = chunk_bytes

    def save(self, reason: str = "manual") -> CheckpointSummary:
        """Write a checkpoint of every optimizer now, in the server's checkpoint directory."""
        return _summary(self._transport.unary("SaveCheckpoint", pb.SaveCheckpointRequest(reason=reason)))

    def list(self) -> list[CheckpointSummary]:
        response = self._transport.unary("ListCheckpoints", pb.ListCheckpointsRequest())
        return [_summary(c) for c in response.checkpoints]

    def inspect(self, checkpoint_id: str = "latest", *, verify: bool = False) -> CheckpointSummary:
        request = pb.InspectCheckpointRequest(checkpoint_id=checkpoint_id, verify=verify)
        return _summary(self._transport.unary("InspectCheckpoint", request))

    def restore(self, checkpoint_id: str = "latest", optimizers: Sequence[str] = ()) -> tuple[str, list[RestoredOptimizer]]:
        """Restore the server's running optimizers from one of its checkpoints (fenced)."""
        request = pb.RestoreCheckpointRequest(checkpoint_id=checkpoint_id, optimizers=list(optimizers))
        response = self._transport.unary("RestoreCheckpoint", request)
        return response.checkpoint_id, _restored(response.restored)

    def download(
        self, checkpoint_id: str = "", optimizers: Sequence[str] = (), *, progress: Progress | None = None
    ) -> tuple[str, dict[str, Any], Files]:
        """(id, manifest, files) of a stored checkpoint, or of the live state when ``checkpoint_id`` is empty."""
        request = pb.DownloadCheckpointRequest(checkpoint_id=checkpoint_id, optimizers=list(optimizers))
        seen: dict[str, int] = {"total": 0}

        def consume(frames: Iterator[Any]) -> tuple[Any, list[_wire.DecodedTensor]]:
            def on_header(header: Any) -> None:
                seen["total"] = header.total_bytes

            if progress is not None:
                frames = _counting(frames, lambda: seen["total"], progress)
            return _wire.decode_stream(frames, on_header=on_header)

        header, tensors = self._transport.unary_stream("DownloadCheckpoint", request, consume)
        return header.checkpoint_id, json.loads(header.manifest_json), files_from_tensors(tensors)

    def upload(
        self,
        manifest: Mapping[str, Any],
        files: Mapping[str, Mapping[str, np.ndarray]],
        *,
        save: bool = True,
        restore: bool = False,
        progress: Progress | None = None,
    ) -> tuple[CheckpointSummary | None, list[RestoredOptimizer]]:
        """Send a checkpoint; the server verifies it, then saves it and/or restores it (fenced)."""
        response = self._transport.stream_unary(
            "UploadCheckpoint",
            lambda: checkpoint_frames(
                str(manifest.get("checkpoint_id", "")), manifest, files,
                chunk_bytes=self._chunk_bytes, save=save, restore=restore, progress=progress,
            ),
        )
        return (_summary(response.saved) if response.HasField("saved") else None), _restored(response.restored)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
