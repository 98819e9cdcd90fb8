"""The bulk channel: Push and Pull over a plain TCP port, or shared memory on the same host.

gRPC stays the control plane: ``OpenBulkChannel`` authenticates a worker (bearer token,
optimizer scope, TLS) and returns a one-time ticket; the worker then opens a TCP connection
to this listener and presents it. After that, a push is a small header frame per tensor
followed by its raw bytes, which the server reads with ``recv_into`` straight into the
tensor's receive buffer; a pull writes the weights of a version with ``sendall`` straight
from the cached copy. Framing and semantics are in proto/adamax/v1/adamax.proto.

A worker on the same host may also register a shared-memory segment: its pushes then carry
only offsets into that segment, and its pulls are answered through a per-optimizer segment
the server fills once per version and every same-host worker copies from.

Everything that decides what a push or pull means (validation, exactly-once, sync rounds,
staleness, version waits) is the coordinator's, exactly as for the gRPC calls; this module
only moves bytes. With ``tls`` (``security.bulk_server_context``) every connection is TLS from
its first byte, with the gRPC port's certificate rules and tickets bound to the mTLS identity
that asked for them (``bulk_tls``); shared memory stays available (its bytes never leave the host).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from adamax_wire import bulk_frames as _bulk
from adamax_wire import shm as _shm
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

from adamax_server.sharding.coordinator import Coordinator
from adamax_server.sharding.single import OptimizerHost
from adamax_server.ops.metrics import ServerMetrics
from adamax_server.errors import (
    ERROR_TYPE_KEY, InvalidArgument, PermissionDenied, ResourceExhausted, ServiceError, Unauthenticated, status_for,
)
from adamax_server.transport.budget import CallLimits, TimedSocket
from adamax_server.transport.bulk_tls import check_identity, tls_accept
from adamax_server.transport.common import (
    OUTCOMES, FoldedStats, PullArena, engine_value, shm_copy, staging_allocator, tensor_meta,
)

_log = logging.getLogger(__name__)

DEFAULT_TICKET_TTL = 60.0
DEFAULT_MAX_CONNECTIONS = 256  # connections that presented a ticket
# Connections that have not presented a ticket yet (they need none to open): when they are
# this many, the oldest is dropped for each new one, so a flood of idle connections cannot
# keep a worker with a ticket out; each must say hello within CallLimits.hello_timeout.
DEFAULT_MAX_PENDING = 64
# Longest silence inside a call (between two reads of one push, or a shared-memory release).
DEFAULT_STALL_TIMEOUT = 30.0


class _CloseConnection(Exception):
    """The stream cannot be kept in step (or the peer is gone): drop the connection."""


@dataclass
class _Ticket:
    optimizer: str
    worker_id: str
    expires: float
    identities: frozenset[str] = frozenset()  # the mTLS identities of the caller it was issued to


@dataclass
class _Connection:
    sock: socket.socket
    peer: str
    optimizer: str
    worker_id: str
    segment: Any = None  # the worker's push segment (shared memory), once registered


def _digest(ticket: bytes) -> bytes:
    return hashlib.sha256(ticket).digest()


class BulkServer:
    """The bulk TCP listener of one server process (see the module docstring)."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shared_memory: bool = True,
        ticket_ttl: float = DEFAULT_TICKET_TTL,
        max_tensor_bytes: int = _wire.DEFAULT_MAX_TENSOR_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        metrics: ServerMetrics | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        limits: CallLimits | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._coordinator = coordinator
        self.tls = tls
        self.limits = limits or CallLimits(stall=stall_timeout)
        self.stall_timeout = self.limits.stall
        self._metrics = metrics
        self.shared_memory = shared_memory
        self.ticket_ttl = float(ticket_ttl)
        self._max_tensor_bytes = max_tensor_bytes
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._tickets: dict[bytes, _Ticket] = {}
        self._connections: set[socket.socket] = set()  # all of them (closed on close())
        self._pending: dict[socket.socket, float] = {}  # not yet past their hello, oldest first
        self._max_pending = max_pending
        self._authenticated = 0
        self._arenas: dict[str, PullArena] = {}
        self._closed = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="adamax-bulk-accept", daemon=True)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> BulkServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, drop open connections, unlink the pull segments."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = list(self._connections)
            arenas = list(self._arenas.values())
            self._arenas.clear()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        for arena in arenas:
            _shm.release(arena.segment, unlink=True)

    # -------------------------------------------------------------- tickets

    def issue_ticket(self, optimizer: str, worker_id: str, identities: frozenset[str] = frozenset()) -> bytes:
        """A one-time ticket for a connection bound to ``optimizer`` and ``worker_id`` (and, when
        the gRPC caller was authenticated by a client certificate, to its ``identities``)."""
        ticket = secrets.token_bytes(32)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, t in self._tickets.items() if t.expires < now]:
                del self._tickets[key]
            self._tickets[_digest(ticket)] = _Ticket(optimizer, worker_id, now + self.ticket_ttl, frozenset(identities))
        return ticket

    def _redeem(self, ticket: bytes) -> _Ticket:
        digest = _digest(ticket)
        with self._lock:
            found = None
            for key in list(self._tickets):  # compare against all: timing does not leak which
                if hmac.compare_digest(key, digest):
                    found = key
            entry = self._tickets.pop(found) if found is not None else None
        if entry is None or entry.expires < time.monotonic():
            raise Unauthenticated("unknown or expired bulk-channel ticket; call OpenBulkChannel for a new one")
        return entry

    # -------------------------------------------------------------- connections

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                if len(self._pending) >= self._max_pending:  # drop the oldest silent one
                    oldest = next(iter(self._pending))
                    del self._pending[oldest]
                    _shutdown(oldest)
                    _log.debug("bulk channel: %d connections without a hello; dropped the oldest", self._max_pending)
                self._connections.add(sock)
                self._pending[sock] = time.monotonic()
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(target=self._serve, args=(sock, peer), name=f"adamax-bulk-{peer}", daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        conn: _Connection | None = None
        counted = False
        try:
            _bulk.tune(sock)
            hello = self.limits.hello_timeout  # for the whole hello (TLS handshake included), not per read
            started = time.monotonic()
            if self.tls is not None:
                sock.settimeout(hello)
                sock = self._tls_handshake(sock)
            conn = self._hello(TimedSocket(sock, started + hello, hello), sock, peer)
            if conn is None:
                return
            counted = True
            _bulk.keepalive(sock)  # an idle connection to a vanished host is found and closed
            while True:
                sock.settimeout(None)  # idle between calls for as long as the worker likes
                frame = _bulk.recv_frame(sock, eof_ok=True)
                if frame is None:
                    return
                # Inside a call the peer must keep the bytes coming: a stalled or vanished sender
                # fails its push (nothing applied) instead of holding the optimizer's staging
                # buffer and the pushes queued behind it.
                sock.settimeout(self.stall_timeout)
                kind = frame.WhichOneof("frame")
                if kind == "push":
                    self._push(conn, frame.push)
                elif kind == "pull":
                    self._pull(conn, frame.pull)
                elif kind == "shm_register":
                    self._register(conn, frame.shm_register)
                else:
                    raise _wire.WireFormatError(f"unexpected bulk frame '{kind}' between calls")
        except _wire.WireFormatError as exc:
            self._send_quietly(sock, _bulk.status_frame("INVALID_ARGUMENT", f"bulk protocol error: {exc}"))
        except (_CloseConnection, OSError):  # (a failed TLS handshake is an OSError)
            pass  # the peer went away (or the server is stopping); nothing to answer
        except Exception:
            _log.exception("bulk connection %s failed", peer)
        finally:
            with self._lock:
                self._connections.discard(sock)
                self._pending.pop(sock, None)
                self._authenticated -= counted
            if conn is not None and conn.segment is not None:
                _shm.release(conn.segment, unlink=False)
            try:
                sock.close()
            except OSError:
                pass

    def _tls_handshake(self, raw: socket.socket) -> socket.socket:
        wrapped = tls_accept(self.tls, raw)  # type: ignore[arg-type]
        with self._lock:  # close() and eviction must reach the socket that now owns the descriptor
            self._connections.discard(raw)
            self._connections.add(wrapped)
            if raw in self._pending:  # same place in the oldest-first order
                self._pending = {(wrapped if k is raw else k): v for k, v in self._pending.items()}
        return wrapped

    @staticmethod
    def _send_quietly(sock: socket.socket, frame: Any) -> None:
        try:
            _bulk.send_frame(sock, frame)
        except OSError:
            pass

    def _hello(self, timed: TimedSocket, sock: socket.socket, peer: str) -> _Connection | None:
        frame = _bulk.recv_frame(timed)
        if frame.WhichOneof("frame") != "hello":
            raise _wire.WireFormatError("a bulk connection must start with its hello frame")
        with self._lock:
            if self._pending.pop(sock, None) is None:
                return None  # dropped for a newer connection meanwhile
            full = self._authenticated >= self._max_connections
            self._authenticated += not full
        try:
            if full:
                raise ResourceExhausted(f"the bulk channel has {self._max_connections} connections open; use gRPC")
            ticket = self._redeem(frame.hello.ticket)
            check_identity(ticket.identities, sock)
        except ServiceError as exc:
            with self._lock:
                self._authenticated -= not full
            self._send_quietly(sock, _bulk.status_frame(exc.code, exc.message))
            return None
        sock.settimeout(self.stall_timeout)
        _bulk.send_frame(sock, _bulk.status_frame("OK"))
        return _Connection(sock, peer, ticket.optimizer, ticket.worker_id)

    def _host(self, conn: _Connection, optimizer: str, worker_id: str) -> OptimizerHost:
        if optimizer != conn.optimizer:
            raise PermissionDenied(
                f"this bulk connection was opened for optimizer '{conn.optimizer}', not '{optimizer}'"
            )
        if worker_id and worker_id != conn.worker_id:
            raise PermissionDenied(
                f"this bulk connection was opened for worker '{conn.worker_id}', not '{worker_id}'"
            )
        return self._coordinator.get(optimizer)

    def _reply_error(self, conn: _Connection, exc: BaseException, method: str, *, push: Any = None,
                     quietly: bool = False) -> None:
        info = status_for(exc)  # once: it logs unexpected exceptions
        self._observe(method, info.code, push=push, info=info)
        frame = _bulk.status_frame(info.code, info.message, info.metadata)
        if quietly:
            self._send_quietly(conn.sock, frame)
        else:
            _bulk.send_frame(conn.sock, frame)

    def _observe(self, method: str, code: str, *, bytes_in: int = 0, bytes_out: int = 0, push: Any = None,
                 response: Any = None, info: Any = None) -> None:
        """Count a bulk call in the same metrics as the gRPC calls (methods "BulkPush", "BulkPull")."""
        m = self._metrics
        if m is None:
            return
        m.observe_call(method, code, bytes_in, bytes_out)
        if push is not None and response is not None:
            m.observe_push(push.optimizer, push.worker_id, response)
        elif push is not None and info is not None:
            reason = dict(info.metadata).get(ERROR_TYPE_KEY) or code
            m.observe_push_rejected(push.optimizer, push.worker_id, push.step, reason, info.message)

    # -------------------------------------------------------------- shared memory

    def _register(self, conn: _Connection, request: Any) -> None:
        if not self.shared_memory:
            _bulk.send_frame(conn.sock, _bulk.status_frame("FAILED_PRECONDITION", "shared memory is off on this server"))
            return
        try:
            segment = _shm.attach(request.name)
        except (OSError, ValueError) as exc:
            _bulk.send_frame(conn.sock, _bulk.status_frame("NOT_FOUND", f"cannot attach segment {request.name!r}: {exc}"))
            return
        if segment.size < _shm.NONCE_BYTES or not hmac.compare_digest(
            bytes(segment.buf[: _shm.NONCE_BYTES]), bytes(request.nonce)
        ):
            _shm.release(segment, unlink=False)
            _bulk.send_frame(conn.sock, _bulk.status_frame("PERMISSION_DENIED", "segment nonce mismatch (not the same host?)"))
            return
        if conn.segment is not None:
            _shm.release(conn.segment, unlink=False)
        conn.segment = segment
        _bulk.send_frame(conn.sock, _bulk.status_frame("OK"))

    def _shm_tensor(self, conn: _Connection, header: Any, allocate: _wire.Allocator | None) -> Any:
        if conn.segment is None:
            raise InvalidArgument(f"tensor '{header.name}' is in shared memory, but no segment is registered")
        nbytes = _wire.expected_nbytes(header)
        if nbytes != header.nbytes:
            raise InvalidArgument(f"tensor '{header.name}': header announces {header.nbytes} bytes, shape needs {nbytes}")
        start = header.shm_offset
        if start < _shm.data_offset() or start + nbytes > conn.segment.size:
            raise InvalidArgument(
                f"tensor '{header.name}': shared-memory range [{start}, {start + nbytes}) is outside the "
                f"registered segment of {conn.segment.size} bytes"
            )
        raw = np.frombuffer(conn.segment.buf, dtype=np.uint8, count=nbytes, offset=start)
        # Always a private copy: the worker can write its segment at any time (a sync round
        # keeps gradients until it closes; a checked gradient must be the applied one). The
        # copy lands in the push's gradient set, which becomes the engine's staging buffers, so
        # the step then copies nothing: the same number of passes as reading the segment in
        # place. ``allocate`` is the receive allocator of the push (its gradient set, or a GPU
        # server's pinned buffer).
        # Statistics fold into this copy (``shm_copy``): the one read of the worker's bytes.
        supplied = allocate(header, nbytes) if allocate is not None else None
        private, on_filled = supplied if supplied is not None else (np.empty(nbytes, dtype=np.uint8), None)
        shm_copy(on_filled, private, raw)
        if on_filled is not None:
            on_filled(0, nbytes)
        return _wire.decode_buffer(header, private).value

    # -------------------------------------------------------------- push

    def _push(self, conn: _Connection, header: Any) -> None:
        reader = _PushReader(self, conn, header.num_tensors)
        try:
            host = self._host(conn, header.optimizer, header.worker_id)
            if header.num_tensors <= 0:
                raise InvalidArgument("a bulk push must state `num_tensors` (at least 1)")
            reader.host = host
            commit = {"commit": True} if header.commit else {}
            if commit and not getattr(host, "commits", False):
                raise InvalidArgument("`commit` on a push header is for a sharded job's leader shard; a server applies every push")
            result = host.push(header.worker_id, header.request_id, header.step, reader.receive,
                               timeout=self.limits.max_wait, progress=reader.progress, **commit)
            # A retry answered from the exactly-once table never read its tensors: skip them.
            if (reader.remaining or reader.payload_left) and not reader.drain():
                raise _CloseConnection()
        except (_CloseConnection, OSError):
            raise
        except Exception as exc:
            in_step = reader.drain()
            self._reply_error(conn, exc, "BulkPush", push=header, quietly=not in_step)
            if not in_step:
                raise _CloseConnection() from exc
            return
        response = pb.PushResponse(
            outcome=OUTCOMES[result.outcome],
            version=result.version,
            iterations=result.iterations,
            duplicate=result.duplicate,
            detail=result.detail,
        )
        _bulk.send_frame(conn.sock, pb.BulkFrame(push_response=response))
        self._observe("BulkPush", "OK", bytes_in=reader.bytes_read, push=header, response=response)

    # -------------------------------------------------------------- pull

    def _pull(self, conn: _Connection, request: Any) -> None:
        wait = min(request.wait_seconds, self.limits.max_wait) if request.wait_seconds > 0 else self.limits.max_wait
        known = request.known_version if request.HasField("known_version") else None
        try:
            host = self._host(conn, request.optimizer, request.worker_id)
            # Shared memory for a full pull with something to map (a shard may hold no piece).
            if request.shm and self.shared_memory and not request.names and host.variable_specs():
                self._pull_shm(conn, host, request, known, wait)
                return
            result = host.pull(
                list(request.names),
                _raw_items,
                min_version=request.min_version,
                known_version=known,
                timeout=wait,
                worker_id=request.worker_id,
                encoding="raw",
            )
        except (_CloseConnection, OSError, _wire.WireFormatError):
            raise
        except Exception as exc:
            self._reply_error(conn, exc, "BulkPull")
            return
        sock = conn.sock
        if result.not_modified or result.payload is None:
            head = pb.PullHeader(version=result.version, iterations=result.iterations, not_modified=True)
            _bulk.send_frame(sock, pb.BulkFrame(pull_header=head))
            return
        items = result.payload
        head = pb.PullHeader(version=result.version, iterations=result.iterations, num_tensors=len(items))
        _bulk.send_frame(sock, pb.BulkFrame(pull_header=head))
        sent = 0
        for name, array in items:
            tensor, views = _wire.tensor_payload(name, array)
            _bulk.send_tensor(sock, tensor, views)
            sent += tensor.nbytes
        self._observe("BulkPull", "OK", bytes_out=sent)

    def release_arenas(self) -> None:
        """Unlink the pull arenas of optimizers deleted since (called after a delete; a pull
        that maps a new arena does it too)."""
        with self._lock:
            self._release_dead_arenas()

    def _release_dead_arenas(self) -> None:
        live = {id(h) for h in self._coordinator.hosts()}
        for key in [k for k, a in self._arenas.items() if id(a.host) not in live]:
            _shm.release(self._arenas.pop(key).segment, unlink=True)  # optimizer deleted

    def _arena(self, host: OptimizerHost) -> PullArena:
        with self._lock:
            self._release_dead_arenas()
            arena = self._arenas.get(host.key)
            specs = host.variable_specs()
            layout, offset = [], _shm.data_offset()
            for name, shape, dtype in specs:
                layout.append((name, tuple(shape), np.dtype(dtype), offset))
                offset += -(-math.prod(shape) * np.dtype(dtype).itemsize // 64) * 64
            if arena is not None and arena.layout == layout and arena.host is host:
                return arena
            if arena is not None:  # the optimizer was re-created (maybe with other variables)
                _shm.release(arena.segment, unlink=True)
            segment, _ = _shm.create(offset)
            arena = PullArena(segment, layout, host)
            self._arenas[host.key] = arena
            return arena

    def _pull_shm(self, conn: _Connection, host: OptimizerHost, request: Any, known: int | None, wait: float | None) -> None:
        if request.min_version > 0:
            host.wait_for_version(request.min_version, wait)
        if request.worker_id:
            host.touch(request.worker_id)
        arena = self._arena(host)
        with arena.cond:
            while True:
                version, epoch = host.version, host.restore_epoch
                if known is not None and known == version:
                    head = pb.PullHeader(version=version, iterations=host.iterations, not_modified=True)
                    _bulk.send_frame(conn.sock, pb.BulkFrame(pull_header=head))
                    return
                if arena.stamp == (epoch, version):
                    break
                if arena.readers == 0:
                    arena.version, arena.iterations = host.read_weights_into(arena.views())
                    arena.stamp = (epoch, arena.version)
                    continue
                arena.cond.wait(1.0)  # readers only copy out; they are gone within milliseconds
            arena.readers += 1
        try:
            head = pb.PullHeader(
                version=arena.version, iterations=arena.iterations, num_tensors=len(arena.layout),
                shm_name=arena.segment.name,
            )  # fmt: skip
            sock = conn.sock
            _bulk.send_frame(sock, pb.BulkFrame(pull_header=head))
            for name, shape, dtype, offset in arena.layout:
                tensor = pb.TensorHeader(
                    name=name, dtype=_wire.wire_dtype(dtype), shape=shape, layout=pb.DENSE,
                    nbytes=math.prod(shape) * dtype.itemsize, in_shm=True, shm_offset=offset,
                )  # fmt: skip
                _bulk.send_frame(sock, pb.BulkFrame(tensor=tensor))
            frame = _bulk.recv_frame(sock)
            if frame.WhichOneof("frame") != "release":
                raise _wire.WireFormatError("a shared-memory pull must be followed by its release frame")
            self._observe("BulkPull", "OK")  # bytes went through shared memory, not the socket
        finally:
            with arena.cond:
                arena.readers -= 1
                arena.cond.notify_all()


def _shutdown(sock: socket.socket) -> None:
    """Wake whatever thread reads ``sock``: its read ends, and it closes the connection."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _raw_items(version: int, iterations: int, items: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Pull payload for the bulk channel: the version's private host copies themselves."""
    return items


class _PushReader:
    """Reads one push's tensors off a bulk connection; keeps the stream in step on refusal."""

    def __init__(self, server: BulkServer, conn: _Connection, count: int) -> None:
        self.server = server
        self.conn = conn
        limits = server.limits
        # The whole push (and the drain of a refused one) shares one budget, growing with the
        # bytes its tensors announce; cancelling it (a stalled staging-buffer holder) shuts the
        # connection, which wakes the read.
        self.start = time.monotonic()
        self.progress = limits.progress(cancel=lambda: _shutdown(conn.sock))
        self.sock = TimedSocket(conn.sock, self.start + limits.budget(0), limits.stall, self.progress)
        self.announced = 0
        self.host: OptimizerHost | None = None
        self.remaining = max(count, 0)  # tensor frames not read yet
        self.payload_left = 0  # payload bytes of the current tensor not read yet
        self.broken = False
        self.bytes_read = 0  # payload bytes received on the socket (metrics)

    def receive(self, staging: Any) -> list[tuple[str, Any]]:
        host, sock = self.host, self.sock
        assert host is not None
        receiver = host.device_receiver()
        folded = FoldedStats()
        allocate = folded.wrap(receiver.allocate if receiver is not None else staging_allocator(staging))
        values: list[tuple[str, Any]] = []
        try:
            while self.remaining:
                header = self._next_header()
                host.check_gradient(tensor_meta(header))
                if header.absent:
                    values.append((header.name, None))
                    continue
                if header.in_shm:
                    value = self.server._shm_tensor(self.conn, header, allocate)
                    self.progress.add(header.nbytes)
                else:
                    pending = _wire.PendingTensor(header, self.server._max_tensor_bytes, allocate)
                    _bulk.recv_payload(sock, pending)
                    self.payload_left = 0
                    self.bytes_read += header.nbytes
                    value = pending.finish().value
                values.append((header.name, engine_value(value)))
        except OSError as exc:
            self.broken = True
            raise _CloseConnection() from exc
        finally:
            if receiver is not None:  # no copy may outlive the push's buffers
                receiver.wait()
        if receiver is not None:
            values = [(name, receiver.wrap(name, value)) for name, value in values]
        return folded.result(values)

    def _next_header(self) -> Any:
        try:
            frame = _bulk.recv_frame(self.sock)
        except _wire.WireFormatError:
            self.broken = True
            raise
        if frame.WhichOneof("frame") != "tensor":
            self.broken = True
            raise _wire.WireFormatError(f"a push announced {self.remaining} more tensors; got '{frame.WhichOneof('frame')}'")
        header = frame.tensor
        self.remaining -= 1
        self.payload_left = 0 if header.absent or header.in_shm else header.nbytes
        if self.payload_left < 0 or self.payload_left > self.server._max_tensor_bytes:
            self.broken = True  # cannot skip what we will not read
            raise _wire.WireFormatError(
                f"tensor '{header.name}' announces {header.nbytes} bytes (limit {self.server._max_tensor_bytes})"
            )
        self.announced += self.payload_left
        self.sock.deadline = self.start + self.server.limits.budget(self.announced)
        return header

    def drain(self) -> bool:
        """Read what is left of a refused push; False when the stream cannot be resynced."""
        if self.broken:
            return False
        try:
            _bulk.skip_bytes(self.sock, self.payload_left)
            self.payload_left = 0
            while self.remaining:
                self._next_header()
                _bulk.skip_bytes(self.sock, self.payload_left)
                self.payload_left = 0
        except (OSError, _wire.WireFormatError):
            return False
        return True

