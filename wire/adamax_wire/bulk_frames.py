"""Framing of the bulk channel, shared by the client and the server.

The contract is in proto/adamax/v1/adamax.proto (section "bulk channel"): every message is a
4-byte little-endian length and a serialized ``BulkFrame``; a ``BulkFrame{tensor}`` carrying
a payload is followed by exactly ``nbytes`` raw bytes. Payloads are written straight from
the caller's arrays (``sendall`` of a memoryview) and read straight into the receiver's
buffer (``recv_into``), so a tensor crosses the process boundary with the kernel's copies
only; that is what lets the bulk channel run near a raw TCP socket.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

_LENGTH = struct.Struct("<I")
# Frames are small headers; anything bigger is a protocol error, not an allocation.
MAX_FRAME_BYTES = 1 << 20
# Largest piece handed to one send/recv call (the kernel moves it in one go on loopback).
IO_BYTES = 8 << 20


class BulkClosed(ConnectionError):
    """The peer closed the connection (cleanly, between or inside messages)."""


def send_frame(sock: socket.socket, frame: Any) -> None:
    payload = frame.SerializeToString()
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` (bytes) from the socket; raises BulkClosed on a short read."""
    filled, total = 0, len(view)
    while filled < total:
        got = sock.recv_into(view[filled : filled + IO_BYTES])
        if got == 0:
            raise BulkClosed(f"connection closed after {filled} of {total} bytes")
        filled += got


def recv_frame(sock: socket.socket, *, eof_ok: bool = False) -> Any | None:
    """The next BulkFrame; None at a clean end of stream when ``eof_ok``."""
    head = bytearray(_LENGTH.size)
    view = memoryview(head)
    got = sock.recv_into(view)
    if got == 0:
        if eof_ok:
            return None
        raise BulkClosed("connection closed before a frame")
    if got < len(head):
        recv_exact_into(sock, view[got:])
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise _wire.WireFormatError(f"bulk frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    body = bytearray(length)
    if length:
        recv_exact_into(sock, memoryview(body))
    frame = pb.BulkFrame()
    try:
        frame.ParseFromString(bytes(body))
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise _wire.WireFormatError(f"unparsable bulk frame: {exc}") from exc
    if frame.WhichOneof("frame") is None:
        raise _wire.WireFormatError("empty bulk frame (no oneof field set)")
    return frame


def skip_bytes(sock: socket.socket, count: int) -> None:
    """Read and drop ``count`` payload bytes (keeps the stream in step after a refusal)."""
    scratch = memoryview(bytearray(min(count, IO_BYTES) or 1))
    while count > 0:
        piece = min(count, len(scratch))
        recv_exact_into(sock, scratch[:piece])
        count -= piece


def recv_payload(sock: socket.socket, pending: _wire.PendingTensor) -> None:
    """Read a tensor's whole payload into its receive buffer, telling its ``on_filled`` hook
    of each piece (a GPU server starts the host-to-device copy of a piece as it lands)."""
    view = memoryview(pending.buffer).cast("B")
    total = len(view)
    for start in range(0, total, IO_BYTES):
        end = min(total, start + IO_BYTES)
        recv_exact_into(sock, view[start:end])
        if pending.on_filled is not None:
            pending.on_filled(start, end)
    pending.filled = total


def send_tensor(sock: socket.socket, header: Any, views: list[memoryview]) -> None:
    send_frame(sock, pb.BulkFrame(tensor=header))
    for view in views:
        if len(view):
            sock.sendall(view)


def status_frame(code: str, message: str = "", metadata: Any = ()) -> Any:
    return pb.BulkFrame(status=pb.BulkStatus(code=code, message=message, metadata=dict(metadata)))


def tune(sock: socket.socket) -> None:
    """Socket options for bulk transfers: no Nagle delay on the small frames. Buffer sizes are
    left to the kernel's autotuning (setting SO_RCVBUF turns it off and measured slower)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def keepalive(sock: socket.socket, idle: int = 30, interval: int = 10, count: int = 3) -> None:
    """TCP keepalive probes, so a connection to a host that vanished is noticed (Linux options
    where the platform has them)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        option = getattr(socket, name, None)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:
                pass
