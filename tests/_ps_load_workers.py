"""Worker processes for tests/test_load.py (multiprocessing spawn): pushes with injected faults.

Each push may, at random (seeded per worker), fail before it is sent, lose its reply after the
server applied it, or drop its connection mid-stream; the client's retry loop resends with the
same request id, so the server must apply each push exactly once. Only the client package is
imported, as on a worker machine.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))

from adamax_client import RemoteAdamax, RetryPolicy  # noqa: E402

SHAPE = (4,)
RETRY = RetryPolicy(initial_backoff=0.002, max_backoff=0.05, max_attempts=30)


def gradient(worker: int, k: int) -> np.ndarray:
    return np.random.default_rng(worker * 1_000_003 + k).standard_normal(SHAPE).astype(np.float32)


class _Injected(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "injected fault"

    def trailing_metadata(self):
        return ()


class _Dropped(Exception):
    pass


class FaultInjector(grpc.StreamUnaryClientInterceptor):
    """Push faults: before sending, after the reply (lost reply), or mid-stream (dropped connection)."""

    def __init__(self, seed: int, rate: float) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.counts = {"before": 0, "lost_reply": 0, "dropped": 0}

    def intercept_stream_unary(self, continuation, details, request_iterator):
        if not details.method.endswith("/Push") or self.rng.random() >= self.rate:
            return continuation(details, request_iterator)
        fault = self.rng.choice(("before", "lost_reply", "dropped"))
        self.counts[fault] += 1
        if fault == "before":
            raise _Injected()
        if fault == "lost_reply":
            outcome = continuation(details, request_iterator)
            outcome.result()  # the server handled it; the reply is "lost" on the way back
            raise _Injected()

        def cut(frames):
            yield next(iter(frames))  # the header, then the connection "drops"
            raise _Dropped()

        outcome = continuation(details, cut(request_iterator))
        try:
            outcome.result()
        except grpc.RpcError:
            pass
        raise _Injected()


class BulkFaults:
    """The same three faults on the bulk channel, by wrapping its framing functions in this
    worker process: the connection breaks before a push is sent, mid-push (after a tensor
    header), or after the server's reply arrived (lost reply); the channel reconnects and
    resends with the same request id."""

    def __init__(self, seed: int, rate: float) -> None:
        from adamax_wire import bulk_frames as _bulk

        self.rng = random.Random(seed)
        self.rate = rate
        self.counts = {"before": 0, "lost_reply": 0, "dropped": 0}
        self._send, self._recv = _bulk.send_frame, _bulk.recv_frame
        self.planned: str | None = None
        _bulk.send_frame, _bulk.recv_frame = self.send_frame, self.recv_frame

    def _break(self, sock, fault: str) -> None:
        self.counts[fault] += 1
        self.planned = None
        try:
            sock.shutdown(2)  # socket.SHUT_RDWR
        except OSError:
            pass
        raise ConnectionResetError(f"injected fault: {fault}")

    def send_frame(self, sock, frame) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "push" and self.rng.random() < self.rate:
            self.planned = self.rng.choice(("before", "lost_reply", "dropped"))
            if self.planned == "before":
                self._break(sock, "before")
        self._send(sock, frame)
        if kind == "tensor" and self.planned == "dropped":
            self._break(sock, "dropped")

    def recv_frame(self, sock, **kwargs):
        frame = self._recv(sock, **kwargs)
        if frame is not None and frame.WhichOneof("frame") == "push_response" and self.planned == "lost_reply":
            self._break(sock, "lost_reply")
        return frame


def push_worker(target: str, key: str, worker: int, pushes: int, fault_rate: float, bulk: str = "off") -> dict:
    """``pushes`` async pushes; returns [(version, k, start, seconds, duplicate)] and fault counts.

    ``bulk="off"``: gRPC pushes with faults injected by a client interceptor; else the bulk
    channel (``"auto"``: shared memory on this host) with faults injected into its framing.
    """
    injector = FaultInjector(seed=worker, rate=fault_rate)
    if bulk != "off":
        injector = BulkFaults(seed=worker, rate=fault_rate)
    log = []
    with RemoteAdamax(target, worker_id=f"w{worker}", name=key, timeout=60, retry=RETRY, bulk=bulk,
                      interceptors=[injector] if bulk == "off" else [], learning_rate=0.01) as opt:  # fmt: skip
        opt.attach()
        for k in range(pushes):
            if k % 50 == 49:
                opt.pull()
            start = time.perf_counter()
            wall = time.time()
            result = opt.push({"w": gradient(worker, k)})
            log.append((result.version, k, wall, time.perf_counter() - start, result.duplicate))
        path = opt.transfer_path
    return {"log": log, "faults": injector.counts, "path": path}
