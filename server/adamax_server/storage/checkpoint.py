"""Checkpoints on disk: format, atomic write, verified read, listing, retention, safe ids.

Layout under the checkpoint directory::

    <dir>/ckpt-00000042/manifest.json        format version, optimizers, sha256 of every tensor
    <dir>/ckpt-00000042/opt-0.safetensors    tensors of optimizer 0 (variables, store, open round)
    <dir>/.tmp-ckpt-00000043-1a2b3c/         a write in progress, or one a crash left behind

Only JSON and safetensors files are written and read, so loading a checkpoint never runs
code (nothing is unpickled). The manifest carries a sha256 of each tensor's bytes and its own
sha256; a flipped bit or a truncated file fails ``read`` with ``CheckpointCorrupt``
(DATA_LOSS), and ``load_latest`` falls back to the newest checkpoint that verifies.

A write is atomic: files go to a temporary directory, each is fsynced, the directory is
fsynced, renamed to its id, and the parent is fsynced. A crash at any point leaves either the
previous checkpoints alone or the new one complete; leftover temporaries are never listed
and are removed when a store is opened. Each step is a small module function (``_write``,
``_fsync_file``, ``_fsync_dir``, ``_rename``) so tests can inject a crash at every step.

Checkpoints are addressed only by id (``ckpt-<sequence>``) inside the configured directory;
anything else (``..``, absolute paths, separators, symlinks) is refused. No grpc here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adamax_server.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from adamax_server.coordination.snapshot import OptimizerSnapshot, RoundContribution

_log = logging.getLogger(__name__)

FORMAT = "adamax-ps-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"

_ID_RE = re.compile(r"^ckpt-(\d{8,12})$")
_FILE_RE = re.compile(r"^opt-\d{1,6}\.safetensors$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".del-"
# safetensors dtype codes for the dtypes a checkpoint can hold.
_ST_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64"}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_HASH_BLOCK = 16 * 1024 * 1024


class CheckpointCorrupt(DataLoss):
    """A checkpoint fails its checksums, is truncated, or is not in the expected format."""


# ---------------------------------------------------------------- info


@dataclass(frozen=True)
class OptimizerEntry:
    key: str
    version: int
    iterations: int
    num_variables: int
    nbytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    checkpoint_id: str
    created_unix: float
    reason: str
    nbytes: int
    optimizers: list[OptimizerEntry] = field(default_factory=list)
    valid: bool = True
    error: str = ""
    format_version: int = FORMAT_VERSION


def _info_from_manifest(manifest: Mapping[str, Any], checkpoint_id: str) -> CheckpointInfo:
    entries = []
    for opt in manifest["optimizers"]:
        nbytes = sum(_nbytes(t) for t in opt["tensors"].values())
        entries.append(
            OptimizerEntry(opt["key"], int(opt["version"]), int(opt["iterations"]), len(opt["variables"]), nbytes)
        )
    return CheckpointInfo(
        checkpoint_id=checkpoint_id,
        created_unix=float(manifest["created_unix"]),
        reason=str(manifest.get("reason", "")),
        nbytes=sum(e.nbytes for e in entries),
        optimizers=entries,
        format_version=int(manifest["format_version"]),
    )


def _nbytes(spec: Mapping[str, Any]) -> int:
    return int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(spec["dtype"]).itemsize


# ---------------------------------------------------------------- encode / decode


def sha256_of(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    raw = _contiguous(array).reshape(-1).view(np.uint8)
    for start in range(0, raw.size, _HASH_BLOCK):
        digest.update(raw[start : start + _HASH_BLOCK])
    return digest.hexdigest()


def _contiguous(array: Any) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.name not in _ST_DTYPES:
        raise InvalidArgument(f"a checkpoint cannot hold tensors of dtype {array.dtype}")
    if not array.flags.c_contiguous or array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"), order="C")
    return array


def _spec(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "sha256": sha256_of(array)}


def encode(
    snapshots: Sequence[OptimizerSnapshot], checkpoint_id: str, reason: str = ""
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Snapshots -> (manifest, {file name: {tensor name: array}})."""
    optimizers = []
    files: dict[str, dict[str, np.ndarray]] = {}
    for index, snap in enumerate(snapshots):
        tensors: dict[str, np.ndarray] = {}
        for j, value in enumerate(snap.variables.values()):
            tensors[f"var/{j}"] = _contiguous(value)
        for key, value in snap.store.items():
            tensors[f"store/{key}"] = _contiguous(value)
        round_json = []
        for c, contribution in enumerate(snap.round):
            grads_json = []
            for g, (name, grad) in enumerate(contribution.grads.items()):
                if grad is None:
                    grads_json.append({"name": name, "kind": "absent"})
                elif isinstance(grad, tuple):
                    tensors[f"round/{c}/{g}/indices"] = _contiguous(np.asarray(grad[0], dtype=np.int64))
                    tensors[f"round/{c}/{g}/values"] = _contiguous(grad[1])
                    grads_json.append({"name": name, "kind": "sparse"})
                else:
                    tensors[f"round/{c}/{g}"] = _contiguous(grad)
                    grads_json.append({"name": name, "kind": "dense"})
            round_json.append(
                {"worker_id": contribution.worker_id, "request_id": contribution.request_id, "grads": grads_json}
            )
        file_name = f"opt-{index}.safetensors"
        files[file_name] = tensors
        optimizers.append(
            {
                "key": snap.key,
                "file": file_name,
                "config": snap.config,
                "initial_config": snap.initial_config,
                "policy": snap.policy,
                "exclusions": snap.exclusions,
                "built": snap.built,
                "variables": [
                    {"name": n, "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name}
                    for n, v in snap.variables.items()
                ],
                "store_keys": list(snap.store),
                "version": snap.version,
                "iterations": snap.iterations,
                "dedup": {w: [[rid, res] for rid, res in entries] for w, entries in snap.dedup.items()},
                "workers": snap.workers,
                "round": round_json,
                "last_closed": snap.last_closed,
                "last_abort": snap.last_abort,
                "tensors": {name: _spec(arr) for name, arr in tensors.items()},
            }
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "created_unix": time.time(),
        "reason": reason,
        "optimizers": optimizers,
    }
    return manifest, files


def verify_tensors(entry: Mapping[str, Any], tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Names, dtypes, shapes and sha256 of ``tensors`` against the manifest ``entry``."""
    expected = entry["tensors"]
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CheckpointCorrupt(f"{where}: tensors do not match the manifest (missing {missing}, unexpected {extra})")
    for name, spec in expected.items():
        array = tensors[name]
        if array.dtype.name != spec["dtype"] or list(array.shape) != list(spec["shape"]):
            raise CheckpointCorrupt(
                f"{where}: tensor '{name}' is {array.dtype.name}{list(array.shape)}, "
                f"the manifest says {spec['dtype']}{spec['shape']}"
            )
        if sha256_of(array) != spec["sha256"]:
            raise CheckpointCorrupt(f"{where}: tensor '{name}' fails its sha256 checksum (corrupt data)")


def decode(manifest: Mapping[str, Any], files: Mapping[str, Mapping[str, np.ndarray]]) -> list[OptimizerSnapshot]:
    """(manifest, verified tensors) -> snapshots."""
    out = []
    for opt in manifest["optimizers"]:
        tensors = files[opt["file"]]
        variables = {v["name"]: tensors[f"var/{j}"] for j, v in enumerate(opt["variables"])}
        store = {k: tensors[f"store/{k}"] for k in opt["store_keys"]}
        contributions = []
        for c, item in enumerate(opt["round"]):
            grads: dict[str, Any] = {}
            for g, grad in enumerate(item["grads"]):
                if grad["kind"] == "absent":
                    grads[grad["name"]] = None
                elif grad["kind"] == "sparse":
                    grads[grad["name"]] = (tensors[f"round/{c}/{g}/indices"], tensors[f"round/{c}/{g}/values"])
                else:
                    grads[grad["name"]] = tensors[f"round/{c}/{g}"]
            contributions.append(RoundContribution(item["worker_id"], item["request_id"], grads))
        out.append(
            OptimizerSnapshot(
                key=opt["key"],
                config=dict(opt["config"]),
                initial_config=dict(opt["initial_config"]),
                policy=dict(opt["policy"]),
                exclusions={k: list(v) for k, v in opt["exclusions"].items()},
                built=bool(opt["built"]),
                variables=variables,
                store=store,
                version=int(opt["version"]),
                iterations=int(opt["iterations"]),
                dedup={w: [(rid, dict(res)) for rid, res in entries] for w, entries in opt["dedup"].items()},
                workers={w: dict(v) for w, v in opt["workers"].items()},
                round=contributions,
                last_closed=opt.get("last_closed", ""),
                last_abort=opt.get("last_abort", ""),
            )
        )
    return out


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The manifest file: the manifest and the sha256 of its canonical JSON."""
    body = _canonical(manifest)
    return json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "manifest": manifest}, indent=1).encode()


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check a manifest file (its checksum, format and version)."""
    try:
        outer = json.loads(data)
        manifest, digest = outer["manifest"], outer["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorrupt(f"{where}: the manifest is not valid JSON of the checkpoint format ({exc})") from None
    if hashlib.sha256(_canonical(manifest)).hexdigest() != digest:
        raise CheckpointCorrupt(f"{where}: the manifest fails its sha256 checksum (corrupt or edited)")
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """The structure every reader relies on; refuses other formats and newer versions."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{where}: not an adamax-ps checkpoint manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointCorrupt(
            f"{where}: checkpoint format version {version!r} is not supported (this server reads {FORMAT_VERSION})"
        )
    try:
        for opt in manifest["optimizers"]:
            if not _FILE_RE.match(opt["file"]):
                raise CheckpointCorrupt(f"{where}: refusing tensor file name {opt['file']!r}")
            for spec in opt["tensors"].values():
                if spec["dtype"] not in _ST_DTYPES or any(int(d) < 0 for d in spec["shape"]):
                    raise CheckpointCorrupt(f"{where}: bad tensor spec {spec}")
            for key in ("key", "config", "initial_config", "policy", "exclusions", "variables", "store_keys",
                        "version", "iterations", "dedup", "workers", "round"):
                opt[key]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointCorrupt(f"{where}: the manifest lacks required fields ({exc!r})") from None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


# ---------------------------------------------------------------- the write steps (monkeypatched by tests)


def _mkdir(path: Path) -> None:
    path.mkdir()


def _write(path: Path, pieces: Iterable[bytes | memoryview]) -> None:
    with open(path, "xb") as f:
        for piece in pieces:
            f.write(piece)
        f.flush()
        _fsync_file(f.fileno())


def _fsync_file(fd: int) -> None:
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)  # not replace: an existing id is never overwritten


def safetensors_pieces(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> list[Any]:
    """The safetensors file for ``tensors`` as byte pieces (no copy of the tensor data)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    views = []
    for name, array in tensors.items():
        array = _contiguous(array)
        header[name] = {
            "dtype": _ST_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        views.append(memoryview(array.reshape(-1).view(np.uint8)))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)), text, *views]


def read_safetensors(path: Path, where: str) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file; any malformation is ``CheckpointCorrupt``."""
    from safetensors import safe_open

    _require_regular_file(path, where)
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointCorrupt:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointCorrupt(f"{where}: {path.name} is not a readable safetensors file ({exc})") from None


def _require_regular_file(path: Path, where: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{where}: {path.name} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointCorrupt(f"{where}: {path.name} is not a regular file (symlinks are refused)")


# ---------------------------------------------------------------- the store


def _written_by_another_live_process(name: str) -> bool:
    """Whether temporary ``name`` (".tmp-...-p<pid>") belongs to a live process other than this one."""
    match = re.search(r"-p(\d+)$", name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def check_directory(root: Path) -> None:
    """Create ``root`` if needed and prove it writable (a probe directory is made and removed).

    A server must refuse to start on a checkpoint directory it cannot write, with a message
    naming it, rather than fail every automatic checkpoint later with a bare ``[Errno 17]``.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FailedPrecondition(f"checkpoint directory {str(root)!r} exists but is not a directory") from None
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot create the checkpoint directory {str(root)!r}: {exc.strerror or exc}"
        ) from None
    if not root.is_dir():
        raise FailedPrecondition(f"checkpoint directory {str(root)!r} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=_TMP_PREFIX + "probe-", suffix=f"-p{os.getpid()}", dir=root)
        os.rmdir(probe)
    except OSError as exc:
        raise FailedPrecondition(
            f"the checkpoint directory {str(root)!r} is not writable: {exc.strerror or exc}"
        ) from None


class CheckpointStore:
    """The checkpoints of one directory. Thread safe for one writer at a time (the manager's lock)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        check_directory(root)
        self.root = Path(os.path.realpath(root))
        self.clean_temporaries()

    # -------------------------------------------------------------- ids and paths

    def resolve(self, checkpoint_id: str) -> Path:
        """The directory of ``checkpoint_id``; refuses anything that is not a plain id here."""
        if not isinstance(checkpoint_id, str) or not _ID_RE.match(checkpoint_id):
            raise InvalidArgument(
                "`checkpoint_id` must be an id like 'ckpt-00000042' (or 'latest') inside the "
                f"checkpoint directory; paths are refused. Received: checkpoint_id={checkpoint_id!r}"
            )
        path = self.root / checkpoint_id
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound(f"no checkpoint '{checkpoint_id}' in {self.root}. Existing: {self.ids()}") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"checkpoint '{checkpoint_id}' is not a directory of {self.root} (symlinks are refused)")
        if os.path.dirname(os.path.realpath(path)) != str(self.root):
            raise InvalidArgument(f"checkpoint '{checkpoint_id}' resolves outside {self.root}")
        return path

    def ids(self) -> list[str]:
        """Complete checkpoint ids, oldest first (temporaries and foreign names are ignored)."""
        found = []
        for entry in os.scandir(self.root):
            match = _ID_RE.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                found.append((int(match.group(1)), entry.name))
        return [name for _, name in sorted(found)]

    def _next_id(self, above: Iterable[str] = ()) -> str:
        """The next sequence id here, also above every id in ``above`` (another store's)."""
        numbers = [int(m.group(1)) for m in map(_ID_RE.match, [*self.ids(), *above]) if m]
        return f"ckpt-{(max(numbers) + 1 if numbers else 1):08d}"

    def clean_temporaries(self) -> list[str]:
        """Remove what crashed writes and deletions left behind.

        Not the temporaries of another live process on this host (a running server writing a
        checkpoint while ``adamax-ps checkpoint list --dir`` opens the same directory): their
        names carry the writer's pid. Our own pid's are leftovers (a container restarts as pid 1).
        """
        removed = []
        for entry in os.scandir(self.root):
            if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and not entry.is_symlink():
                if _written_by_another_live_process(entry.name):
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        if removed:
            _log.info("removed %d leftover temporary checkpoint directories in %s", len(removed), self.root)
        return removed

    # -------------------------------------------------------------- write

    def write(self, snapshots: Sequence[OptimizerSnapshot], reason: str = "") -> CheckpointInfo:
        manifest, files = encode(snapshots, "pending", reason)
        return self.write_encoded(manifest, files)

    def write_encoded(
        self,
        manifest: dict[str, Any],
        files: Mapping[str, Mapping[str, np.ndarray]],
        *,
        checkpoint_id: str | None = None,
        above: Iterable[str] = (),
    ) -> CheckpointInfo:
        """Atomically write an encoded checkpoint (the manifest's id is replaced).

        The id is ``checkpoint_id`` (a copy keeps the id its source gave it; refused when this
        directory already holds it), else a fresh one, above the ids in ``above`` too.
        """
        if checkpoint_id is None:
            checkpoint_id = self._next_id(above)
        else:
            if not _ID_RE.match(checkpoint_id):
                raise InvalidArgument(f"`checkpoint_id` must be an id like 'ckpt-00000042'. Received: {checkpoint_id!r}")
            if os.path.lexists(self.root / checkpoint_id):
                raise AlreadyExists(f"{self.root} already holds a checkpoint '{checkpoint_id}'")
        manifest = dict(manifest, checkpoint_id=checkpoint_id)
        check_manifest(manifest, "new checkpoint")
        tmp = self.root / f"{_TMP_PREFIX}{checkpoint_id}-{uuid.uuid4().hex[:8]}-p{os.getpid()}"
        _mkdir(tmp)
        try:
            for opt in manifest["optimizers"]:
                _write(tmp / opt["file"], safetensors_pieces(files[opt["file"]], {"checkpoint_id": checkpoint_id}))
            _write(tmp / MANIFEST, [manifest_bytes(manifest)])
            _fsync_dir(tmp)
            _rename(tmp, self.root / checkpoint_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        return _info_from_manifest(manifest, checkpoint_id)

    # -------------------------------------------------------------- read

    def read_manifest(self, checkpoint_id: str) -> dict[str, Any]:
        path = self.resolve(checkpoint_id)
        where = f"checkpoint '{checkpoint_id}'"
        _require_regular_file(path / MANIFEST, where)
        manifest = parse_manifest((path / MANIFEST).read_bytes(), where)
        if manifest.get("checkpoint_id") != checkpoint_id:
            raise CheckpointCorrupt(f"{where}: the manifest names checkpoint {manifest.get('checkpoint_id')!r}")
        return manifest

    def read(self, checkpoint_id: str) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
        """Manifest and tensors, every checksum verified."""
        manifest = self.read_manifest(checkpoint_id)
        path = self.root / checkpoint_id
        files = {}
        for opt in manifest["optimizers"]:
            where = f"checkpoint '{checkpoint_id}', optimizer '{opt['key']}'"
            tensors = read_safetensors(path / opt["file"], where)
            verify_tensors(opt, tensors, where)
            files[opt["file"]] = tensors
        return manifest, files

    def load(self, checkpoint_id: str) -> list[OptimizerSnapshot]:
        if checkpoint_id == LATEST:
            return self.load_latest()[1]
        return decode(*self.read(checkpoint_id))

    def load_latest(self) -> tuple[str, list[OptimizerSnapshot]]:
        """The newest checkpoint that verifies; corrupt ones are logged and skipped."""
        errors = []
        for checkpoint_id in reversed(self.ids()):
            try:
                return checkpoint_id, self.load(checkpoint_id)
            except DataLoss as exc:
                _log.error("skipping corrupt checkpoint: %s", exc)
                errors.append(str(exc))
        if errors:
            raise CheckpointCorrupt(f"no checkpoint in {self.root} verifies: " + "; ".join(errors))
        raise NotFound(f"no checkpoints in {self.root}")

    def info(self, checkpoint_id: str, *, verify: bool = False) -> CheckpointInfo:
        """Summary of one checkpoint; with ``verify`` every tensor checksum is checked too."""
        try:
            manifest = self.read(checkpoint_id)[0] if verify else self.read_manifest(checkpoint_id)
        except DataLoss as exc:
            return CheckpointInfo(checkpoint_id, 0.0, "", 0, valid=False, error=str(exc))
        return _info_from_manifest(manifest, checkpoint_id)

    def list(self) -> list[CheckpointInfo]:
        return [self.info(i) for i in self.ids()]

    # -------------------------------------------------------------- retention

    def delete(self, checkpoint_id: str) -> None:
        path = self.resolve(checkpoint_id)
        trash = self.root / f"{_TRASH_PREFIX}{checkpoint_id}-{uuid.uuid4().hex[:8]}-p{os.getpid()}"
        _rename(path, trash)  # never seen half-deleted under its id
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, keep: int, keep_every: int | None = None) -> list[str]:
        """Keep the newest ``keep`` checkpoints, plus every ``keep_every``-th by sequence number."""
        if keep < 1:
            raise InvalidArgument(f"`keep` must be >= 1. Received: keep={keep}")
        ids = self.ids()
        removed = []
        for checkpoint_id in ids[: max(0, len(ids) - keep)]:
            number = int(_ID_RE.match(checkpoint_id).group(1))  # type: ignore[union-attr]
            if keep_every and number % keep_every == 0:
                continue
            self.delete(checkpoint_id)
            removed.append(checkpoint_id)
        return removed
