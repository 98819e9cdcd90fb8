"""The adamax.v1.CheckpointService servicer: translation only, like ``service.py``.

Checkpoint RPCs become ``CheckpointManager`` calls; a checkpoint travels as a
``CheckpointFrame`` stream: a header with the manifest JSON (sha256 per tensor), then one
tensor per manifest entry named ``"<file>/<tensor>"``, in the shared chunk framing of
``adamax_wire.tensors``, so a state of any size streams in chunks. The receiver verifies every
checksum before anything is written or restored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_wire.proto.adamax.v1 import adamax_pb2_grpc as pb_grpc
from adamax_wire.checkpoints import checkpoint_frames, files_from_tensors

from adamax_server.storage.checkpoint import LATEST, CheckpointInfo, CheckpointCorrupt, check_manifest
from adamax_server.storage.checkpointing import CheckpointManager, Restored
from adamax_server.errors import InvalidArgument, NotFound
from adamax_server.transport.service import translating
from adamax_server.transport.validation import tolerant_handler

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CheckpointService"].full_name


def info_to_proto(info: CheckpointInfo) -> Any:
    return pb.CheckpointInfo(
        checkpoint_id=info.checkpoint_id,
        created_unix=info.created_unix,
        reason=info.reason,
        nbytes=info.nbytes,
        optimizers=[
            pb.CheckpointOptimizer(
                optimizer=o.key, version=o.version, iterations=o.iterations, num_variables=o.num_variables, nbytes=o.nbytes
            )
            for o in info.optimizers
        ],
        valid=info.valid,
        error=info.error,
        format_version=info.format_version,
    )


def _restored_to_proto(restored: list[Restored]) -> list[Any]:
    return [pb.RestoredOptimizer(optimizer=r.optimizer, version=r.version, iterations=r.iterations) for r in restored]


def parse_manifest_json(text: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointCorrupt(f"the checkpoint manifest is not valid JSON: {exc}") from None
    check_manifest(manifest, "streamed checkpoint")
    return manifest


class CheckpointServicer(pb_grpc.CheckpointServiceServicer):
    """Implements adamax.v1.CheckpointService on top of a :class:`CheckpointManager`."""

    def __init__(
        self,
        manager: CheckpointManager,
        *,
        chunk_bytes: int = _wire.DEFAULT_CHUNK_BYTES,
        max_tensor_bytes: int = _wire.DEFAULT_MAX_TENSOR_BYTES,
    ) -> None:
        self._manager = manager
        self._chunk_bytes = chunk_bytes
        self._max_tensor_bytes = max_tensor_bytes

    _translating = staticmethod(translating)  # domain exceptions -> status codes (errors.py)

    def _latest_id(self) -> str:
        ids = self._manager.store.ids()
        if not ids:
            raise NotFound(f"no checkpoints in {self._manager.store.root}")
        return ids[-1]

    def SaveCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return info_to_proto(self._manager.save_all(reason=request.reason or "manual"))

    def ListCheckpoints(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            return pb.ListCheckpointsResponse(checkpoints=[info_to_proto(i) for i in self._manager.store.list()])

    def InspectCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            checkpoint_id = self._latest_id() if request.checkpoint_id == LATEST else request.checkpoint_id
            return info_to_proto(self._manager.store.info(checkpoint_id, verify=request.verify))

    def RestoreCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            used, restored = self._manager.restore(request.checkpoint_id or LATEST, list(request.optimizers))
            return pb.RestoreCheckpointResponse(checkpoint_id=used, restored=_restored_to_proto(restored))

    def DownloadCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._translating(context):
            store_id = request.checkpoint_id
            if not store_id:
                manifest, files = self._manager.encode_live(list(request.optimizers))
                store_id = "live"
            else:
                if store_id == LATEST:
                    store_id, _ = self._manager.store.load_latest()
                manifest, files = self._manager.store.read(store_id)
        yield from checkpoint_frames(store_id, manifest, files, chunk_bytes=self._chunk_bytes)

    def UploadCheckpoint(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self._translating(context):
            header, tensors = _wire.decode_stream(request_iterator, max_tensor_bytes=self._max_tensor_bytes)
            if not (header.save or header.restore):
                raise InvalidArgument("an upload must set `save` and/or `restore`")
            manifest = parse_manifest_json(header.manifest_json)
            files = files_from_tensors(tensors)
            response = pb.UploadCheckpointResponse()
            # Verified in full (every sha256) before anything is written or restored.
            if header.save:
                response.saved.CopyFrom(info_to_proto(self._manager.save_uploaded(manifest, files)))
            else:
                self._manager.verify_encoded(manifest, files)
            if header.restore:
                response.restored.extend(_restored_to_proto(self._manager.restore_encoded(manifest, files)))
            return response


def add_checkpoint_service(server: grpc.Server, servicer: CheckpointServicer) -> None:
    """Register the servicer with frame-aware (de)serializers on its streaming methods."""
    methods = pb.DESCRIPTOR.services_by_name["CheckpointService"].methods_by_name
    handlers = {
        "SaveCheckpoint": grpc.unary_unary_rpc_method_handler(
            servicer.SaveCheckpoint, pb.SaveCheckpointRequest.FromString, pb.CheckpointInfo.SerializeToString
        ),
        "ListCheckpoints": grpc.unary_unary_rpc_method_handler(
            servicer.ListCheckpoints, pb.ListCheckpointsRequest.FromString, pb.ListCheckpointsResponse.SerializeToString
        ),
        "InspectCheckpoint": grpc.unary_unary_rpc_method_handler(
            servicer.InspectCheckpoint, pb.InspectCheckpointRequest.FromString, pb.CheckpointInfo.SerializeToString
        ),
        "RestoreCheckpoint": grpc.unary_unary_rpc_method_handler(
            servicer.RestoreCheckpoint, pb.RestoreCheckpointRequest.FromString, pb.RestoreCheckpointResponse.SerializeToString
        ),
        "DownloadCheckpoint": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadCheckpoint, pb.DownloadCheckpointRequest.FromString, _wire.identity_serializer
        ),
        "UploadCheckpoint": grpc.stream_unary_rpc_method_handler(
            servicer.UploadCheckpoint, _wire.frame_deserializer(pb.CheckpointFrame), pb.UploadCheckpointResponse.SerializeToString
        ),
    }
    assert set(handlers) == set(methods), "every CheckpointService method needs a handler"
    # Unparsable input -> INVALID_ARGUMENT, not INTERNAL (as for the AdamaxService).
    handlers = {name: tolerant_handler(handler) for name, handler in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
