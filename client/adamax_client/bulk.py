"""The worker side of the bulk channel (see proto/adamax/v1/adamax.proto, "bulk channel").

``RemoteAdamax`` sends pushes and pulls through a :class:`BulkChannel` when the server
offers one (``bulk="auto"``, the default) and gRPC otherwise. The channel asks for a ticket
over gRPC (so tokens, optimizer scopes and TLS-verified identities apply), connects to the
server's bulk port on the same host name, and then moves tensor bytes with ``sendall`` /
``recv_into``. When the gRPC channel uses TLS, so does the bulk connection (the same CA, host
name and client certificate, from ``adamax_client.tls_channel_credentials``): a ticket never
travels in the clear. On the server's host it also registers a shared-memory segment: pushes are
copied into it once and pulls are copied out of the server's per-version segment once.

A broken connection is retried on a fresh one with the same request id, so a push is still
applied exactly once. When no connection can be set up or kept (a handshake cut, a bulk port
at its connection limit, a flood of idle connections), the call raises ``BulkUnavailable``
with ``transient=True`` and ``RemoteAdamax`` sends it over gRPC instead, trying the bulk
channel again later; the request id stays the same, so the exactly-once answer holds across
both transports.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from adamax_wire import bulk_frames as _bulk
from adamax_wire import shm as _shm
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_client.errors import (
    AdamaxError, DeadlineExceededError, InvalidArgumentError, ProtocolError, ResourceExhaustedError, UnavailableError,
    UnimplementedError, from_status,
)

BulkMode = Literal["auto", "tcp", "shm", "off"]
BULK_MODES = ("auto", "tcp", "shm", "off")
_ATTEMPTS = 3
_ALIGN = 64


class BulkUnavailable(Exception):
    """This server (or network path) has no usable bulk channel: use gRPC.

    ``offered``: the server offers one but it cannot be reached (a firewalled port).
    ``transient``: it failed now (connection cut, server at its connection limit) and may work
    again later; use gRPC for this call only.
    """

    def __init__(self, message: str, *, offered: bool = False, transient: bool = False) -> None:
        super().__init__(message)
        self.offered = offered
        self.transient = transient


class BulkFull(BulkUnavailable):
    """The server's bulk port is at its connection limit (retrying at once would not help)."""


def _host_of(target: str) -> str:
    host = target.rsplit(":", 1)[0] if ":" in target else target
    if host.startswith("dns:///"):
        host = host[len("dns:///") :]
    return host.strip("[]") or "127.0.0.1"


class ReceivePool:
    """Pull receive buffers, reused once nothing outside the pool references them.

    Fresh memory costs page faults on every pull (about a third of a 40 MB pull here), and a
    training loop drops the weights of the previous step when it pulls the next. Each tensor
    name keeps up to ``keep`` buffers; one is reused only when its reference count shows that
    no array (the caller's, the client's not-modified cache, a torch tensor sharing it) still
    points into it, so returned arrays are never overwritten.
    """

    _FREE_REFS = 3  # the pool's list, the loop variable, getrefcount's argument

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._buffers: dict[str, list[np.ndarray]] = {}

    def take(self, name: str, nbytes: int) -> np.ndarray:
        entries = self._buffers.setdefault(name, [])
        for buf in entries:
            if buf.size == nbytes and sys.getrefcount(buf) <= self._FREE_REFS:
                return buf
        buf = np.empty(nbytes, dtype=np.uint8)
        entries.append(buf)
        if len(entries) > self._keep:
            entries.pop(0)  # still in use by its holders; the pool just forgets it
        return buf

    def allocate(self, header: Any, nbytes: int) -> tuple[np.ndarray, None]:
        """An ``_wire.Allocator`` over the pool."""
        return self.take(header.name, nbytes), None


class BulkChannel:
    """One worker's bulk connection for one optimizer; one call at a time (a lock orders them)."""

    def __init__(self, transport: Any, optimizer: str, worker_id: str, *, mode: BulkMode = "auto",
                 open_ticket: Callable[[float], Any] | None = None) -> None:
        """``open_ticket(timeout)`` returns an ``OpenBulkChannelResponse`` (default: the
        ``OpenBulkChannel`` call of ``transport``; a shard answers it on its ``ShardService``)."""
        if mode not in BULK_MODES or mode == "off":
            raise ValueError(f"`mode` must be one of {BULK_MODES[:3]}. Received: mode={mode!r}")
        self._open_ticket = open_ticket
        self._transport = transport
        self.optimizer = optimizer
        self.worker_id = worker_id
        self.mode = mode
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._push_segment: Any = None
        self._push_nonce = b""
        self._pull_segments: dict[str, Any] = {}
        self._pool = ReceivePool()
        self.shared_memory = False  # shared memory in use on the current connection
        self._server_shm = False
        self._shm_failed = mode == "tcp"
        self._closed = False
        self._ssl_context: ssl.SSLContext | None = None

    # -------------------------------------------------------------- connection

    def _connect(self, timeout: float) -> socket.socket:
        try:
            if self._open_ticket is not None:
                response = self._open_ticket(timeout)
            else:
                response = self._transport.unary(
                    "OpenBulkChannel",
                    pb.OpenBulkChannelRequest(optimizer=self.optimizer, worker_id=self.worker_id),
                    timeout=timeout,
                )
        except UnimplementedError as exc:  # an older server without the bulk channel
            raise BulkUnavailable(str(exc)) from exc
        if not response.available:
            raise BulkUnavailable("the server has no bulk channel")
        host = _host_of(self._transport.target)
        context = self._tls_context()
        try:
            sock = socket.create_connection((host, response.port), timeout=timeout)
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            # The port answered and then cut the connection (a handshake cut that raced the connect):
            # transient, like a cut during the hello, not an unreachable port.
            raise BulkUnavailable(f"bulk connection to {host}:{response.port} was cut: {exc!r}",
                                  offered=True, transient=True) from exc
        except OSError as exc:
            raise BulkUnavailable(f"cannot reach the bulk port {host}:{response.port}: {exc}", offered=True) from exc
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=getattr(self._transport, "server_name", None) or host)
            except (ssl.SSLError, ssl.CertificateError) as exc:  # refused: never fall back to plaintext
                sock.close()
                raise BulkUnavailable(f"TLS handshake with the bulk port failed: {exc}", offered=True) from exc
        try:
            _bulk.tune(sock)
            _bulk.keepalive(sock)
            sock.settimeout(timeout)
            try:
                _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=response.ticket)))
                self._expect_ok(_bulk.recv_frame(sock))
            except ResourceExhaustedError as exc:  # the bulk port is at its connection limit
                raise BulkFull(f"bulk channel full: {exc}", offered=True, transient=True) from exc
            except (OSError, _wire.WireFormatError) as exc:  # cut or refused during the handshake
                raise BulkUnavailable(f"bulk handshake with {host}:{response.port} failed: {exc!r}",
                                      offered=True, transient=True) from exc
            self._server_shm = response.shared_memory
            self.shared_memory = False
            if self._server_shm and not self._shm_failed:
                if self._push_segment is None:  # small until the first push says how big
                    self._push_segment, self._push_nonce = _shm.create(4096)
                self._register(sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _tls_context(self) -> ssl.SSLContext | None:
        """The bulk socket's TLS context when the gRPC channel is secure (None: plaintext)."""
        credentials = getattr(self._transport, "credentials", None)
        if credentials is None:
            return None
        if self._ssl_context is None:
            make = getattr(credentials, "ssl_context", None)
            if make is None:
                raise BulkUnavailable(
                    "the bulk channel over TLS needs credentials from adamax_client.tls_channel_credentials "
                    "(plain grpc credentials cannot be reused for its socket)"
                )
            self._ssl_context = make()
        return self._ssl_context

    @staticmethod
    def _expect_ok(frame: Any) -> None:
        if frame.WhichOneof("frame") != "status":
            raise ProtocolError(f"expected a status frame, got '{frame.WhichOneof('frame')}'")
        if frame.status.code != "OK":
            raise from_status(frame.status.code, frame.status.message, frame.status.metadata)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self.shared_memory = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()
            _shm.release(self._push_segment, unlink=True)
            self._push_segment = None
            for segment in self._pull_segments.values():
                _shm.release(segment, unlink=False)
            self._pull_segments.clear()
            self._pool = ReceivePool()

    def _call(self, body: Any, timeout: float) -> Any:
        """Run ``body(sock, remaining)`` on a connection; reconnect and retry on a broken one."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise UnavailableError("the bulk channel was closed")
            for attempt in range(_ATTEMPTS):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    sock = self._sock or self._connect(remaining)
                except BulkUnavailable as exc:
                    if not exc.transient or isinstance(exc, BulkFull) or attempt == _ATTEMPTS - 1:
                        raise
                    continue  # a cut handshake: try a fresh ticket and connection
                sock.settimeout(max(remaining, 1e-3))
                try:
                    return body(sock, remaining)
                except AdamaxError:  # the server's answer (some are OSErrors too): not a broken connection
                    raise
                except OSError as exc:  # a broken or timed-out connection (BulkClosed included)
                    self._drop()
                    if attempt == _ATTEMPTS - 1 or time.monotonic() >= deadline:
                        if isinstance(exc, TimeoutError):
                            raise DeadlineExceededError(f"bulk call ran past its {timeout:.3g}s deadline") from exc
                        # The same call (same request id) may still go through gRPC.
                        raise BulkUnavailable(f"bulk connection failed {_ATTEMPTS} times: {exc!r}",
                                              offered=True, transient=True) from exc
                except _wire.WireFormatError as exc:
                    self._drop()
                    raise ProtocolError(f"malformed bulk reply: {exc}") from exc
            raise DeadlineExceededError(f"bulk call ran past its {timeout:.3g}s deadline")

    # -------------------------------------------------------------- shared memory

    def _ensure_segment(self, nbytes: int) -> bool:
        """A push segment of at least ``nbytes`` registered on the current connection."""
        if self._shm_failed or not self._server_shm:
            return False
        if self._push_segment is not None and self._push_segment.size - _shm.data_offset() >= nbytes:
            return self.shared_memory
        _shm.release(self._push_segment, unlink=True)
        self._push_segment, self._push_nonce = _shm.create(nbytes)
        if self._sock is not None:
            self._register(self._sock)
        return self.shared_memory

    def _register(self, sock: socket.socket) -> None:
        segment = self._push_segment
        request = pb.ShmRegister(name=segment.name, nonce=self._push_nonce, size=segment.size)
        _bulk.send_frame(sock, pb.BulkFrame(shm_register=request))
        frame = _bulk.recv_frame(sock)
        if frame.WhichOneof("frame") != "status":
            raise ProtocolError("expected the reply to a shared-memory registration")
        if frame.status.code == "OK":
            self.shared_memory = True
        else:  # another host, another /dev/shm, or shared memory off: TCP from now on
            self.shared_memory = False
            self._shm_failed = True
            if self.mode == "shm":
                warnings.warn(f"shared memory refused by the server ({frame.status.message}); using TCP", stacklevel=4)
            _shm.release(self._push_segment, unlink=True)
            self._push_segment = None

    # -------------------------------------------------------------- push

    def push(
        self, header: Any, items: Iterable[tuple[str, Any]], *, wire: str | None, timeout: float,
        nbytes: int | None = None,
    ) -> Any:
        """Send one push; returns the PushResponse (raises the call's AdamaxError).

        ``items`` may be a lazy iterable (re-iterable: a retry iterates it again) whose tensors
        become ready while the push is under way (gradients arriving from backward); then
        ``nbytes`` bounds their payload (64-byte aligned each) so the shared-memory segment can be
        sized up front. A tensor that does not fit goes over the socket instead.
        """
        if isinstance(items, Sequence):
            payloads: Iterable[tuple[Any, list[memoryview]]] = [
                _wire.tensor_payload(name, value, wire=wire) for name, value in items
            ]
            total = sum(_aligned(sum(len(v) for v in views)) for _, views in payloads)  # type: ignore[union-attr]
        else:
            payloads = _LazyPayloads(items, wire, int(header.num_tensors))
            total = int(nbytes or 0)

        def body(sock: socket.socket, remaining: float) -> Any:
            try:
                send(sock)
            except OSError:
                raise
            except BaseException:  # the items failed mid-push (or were more or fewer than announced): cut it
                self._drop()  # the server applies nothing
                raise
            frame = _bulk.recv_frame(sock)
            kind = frame.WhichOneof("frame")
            if kind == "push_response":
                return frame.push_response
            if kind == "status":
                raise from_status(frame.status.code, frame.status.message, frame.status.metadata)
            raise ProtocolError(f"unexpected reply '{kind}' to a push")

        def send(sock: socket.socket) -> None:
            use_shm = total > 0 and self._ensure_segment(total)
            _bulk.send_frame(sock, pb.BulkFrame(push=header))
            if use_shm:
                buf = self._push_segment.buf
                limit = self._push_segment.size
                offset = _shm.data_offset()
                for tensor, views in payloads:
                    size = sum(len(v) for v in views)
                    if tensor.absent or offset + size > limit:
                        _bulk.send_tensor(sock, tensor, views)
                        continue
                    placed = pb.TensorHeader()
                    placed.CopyFrom(tensor)
                    placed.in_shm, placed.shm_offset = True, offset
                    for view in views:
                        # numpy's copy drops the GIL: backward keeps running while gradients land
                        np.copyto(np.frombuffer(buf, np.uint8, len(view), offset), np.frombuffer(view, np.uint8))
                        offset += len(view)
                    offset = _aligned(offset)
                    _bulk.send_frame(sock, pb.BulkFrame(tensor=placed))
            else:
                for tensor, views in payloads:
                    _bulk.send_tensor(sock, tensor, views)

        return self._call(body, timeout)

    # -------------------------------------------------------------- pull

    def pull(
        self, request: Any, *, timeout: float, out: Mapping[str, np.ndarray] | None = None
    ) -> tuple[Any, list[tuple[str, np.ndarray]]]:
        """One pull; returns (PullHeader, [(name, private array), ...]).

        ``out`` (name -> writable C-contiguous array of the variable's dtype and shape): tensors
        are received (socket) or copied (shared memory) straight into these arrays, which are
        then the returned values.
        """
        allocate = self._pool.allocate if out is None else _OutAllocator(out, self._pool).allocate

        def body(sock: socket.socket, remaining: float) -> tuple[Any, list[tuple[str, np.ndarray]]]:
            sent = pb.PullRequest()
            sent.CopyFrom(request)
            sent.wait_seconds = max(remaining - 0.5, 1e-3)  # answer before our socket gives up
            sent.shm = self.shared_memory and not request.names
            _bulk.send_frame(sock, pb.BulkFrame(pull=sent))
            frame = _bulk.recv_frame(sock)
            kind = frame.WhichOneof("frame")
            if kind == "status":
                raise from_status(frame.status.code, frame.status.message, frame.status.metadata)
            if kind != "pull_header":
                raise ProtocolError(f"unexpected reply '{kind}' to a pull")
            head = frame.pull_header
            if head.not_modified:
                return head, []
            headers = []
            received: list[tuple[str, np.ndarray]] = []
            for _ in range(head.num_tensors):
                frame = _bulk.recv_frame(sock)
                if frame.WhichOneof("frame") != "tensor":
                    raise ProtocolError("a pull reply ended before its announced tensors")
                tensor = frame.tensor
                if tensor.in_shm:
                    headers.append(tensor)
                    continue
                pending = _wire.PendingTensor(tensor, _wire.DEFAULT_MAX_TENSOR_BYTES, allocate)
                _bulk.recv_payload(sock, pending)
                received.append((tensor.name, pending.finish().value))
            if headers or head.shm_name:  # a shared-memory reply is always released, even empty
                copied = self._copy_from_shm(sock, head.shm_name, headers, allocate)
                if copied is None:  # could not attach the server's segment: ask again over TCP
                    return body(sock, remaining)
                received = copied
            return head, received

        return self._call(body, timeout)

    def _copy_from_shm(
        self, sock: socket.socket, name: str, headers: list[Any], allocate: Any
    ) -> list[tuple[str, np.ndarray]] | None:
        out: list[tuple[str, np.ndarray]] | None = []
        try:
            segment = self._pull_segments.get(name)
            if segment is None:
                for old in self._pull_segments.values():  # the server replaced its segment
                    _shm.release(old, unlink=False)
                self._pull_segments.clear()
                segment = self._pull_segments[name] = _shm.attach(name)
            for tensor in headers:
                nbytes = _wire.expected_nbytes(tensor)
                if tensor.shm_offset < 0 or tensor.shm_offset + nbytes > segment.size:
                    raise ProtocolError(f"tensor '{tensor.name}' lies outside the server's segment")
                raw = np.frombuffer(segment.buf, dtype=np.uint8, count=nbytes, offset=tensor.shm_offset)
                private, _ = allocate(tensor, nbytes)
                np.copyto(private, raw)
                out.append((tensor.name, _wire.decode_buffer(tensor, private).value))  # type: ignore[union-attr]
        except (OSError, ValueError):  # not the server's /dev/shm after all (or not our uid)
            self.shared_memory = False
            self._shm_failed = True
            out = None
        finally:
            _bulk.send_frame(sock, pb.BulkFrame(release=pb.ShmRelease()))
        return out


class _LazyPayloads:
    """(TensorHeader, views) of items as they are produced; iterable again for a retry.

    Exactly ``count`` (the header's ``num_tensors``): the server acts on a push the moment its
    last announced tensor arrives, so that tensor is held until ``items`` has ended, and items
    more or fewer than announced raise (the push is cut: nothing is applied), as over gRPC.
    """

    def __init__(self, items: Iterable[tuple[str, Any]], wire: str | None, count: int) -> None:
        self._items = items
        self._wire = wire
        self._count = count

    def __iter__(self) -> Iterator[tuple[Any, list[memoryview]]]:
        source = iter(self._items)
        for sent in range(1, self._count + 1):
            item = next(source, None)
            if item is None:
                raise InvalidArgumentError(
                    f"the push announced {self._count} tensors but its items ended after {sent - 1}; nothing was applied"
                )
            if sent == self._count:
                self._require_end(source)
            yield _wire.tensor_payload(item[0], item[1], wire=self._wire)
        if self._count == 0:
            self._require_end(source)

    def _require_end(self, source: Iterator[tuple[str, Any]]) -> None:
        if next(source, None) is not None:
            raise InvalidArgumentError(
                f"the push announced {self._count} tensors but its items carried more; nothing was applied"
            )


class _OutAllocator:
    """Receive buffers that are the caller's arrays (pool buffers for anything else)."""

    def __init__(self, out: Mapping[str, np.ndarray], pool: ReceivePool) -> None:
        self._out = out
        self._pool = pool

    def allocate(self, header: Any, nbytes: int) -> tuple[np.ndarray, None]:
        dest = self._out.get(header.name)
        if (
            dest is not None
            and header.layout == pb.DENSE
            and header.dtype != pb.BFLOAT16
            and dest.nbytes == nbytes
            and dest.flags.c_contiguous
            and dest.flags.writeable
            and dest.dtype == _wire.numpy_dtype(header.dtype)
        ):
            return dest.reshape(-1).view(np.uint8), None
        return self._pool.take(header.name, nbytes), None


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN if n else 0


__all__ = ["BULK_MODES", "BulkChannel", "BulkMode", "BulkUnavailable"]
