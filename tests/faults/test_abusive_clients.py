"""Abusive or broken clients must not stop the others (issue 12, items 1-4).

* idle TCP connections to the bulk port (they need no ticket) cannot keep workers with a
  ticket out, and a cut or refused handshake sends the call to gRPC instead of raising;
* a push that stalls or dribbles (gRPC or bulk) holds no other push up (each is received into
  a gradient set of its own) and is cut at its stall or overall budget;
* unread pulls cannot take every RPC thread: control calls are always answered.

Servers use short budgets (``CallLimits``) so that each test runs in seconds; every loop is
bounded by a count and a deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from adamax_client import RemoteAdamax
from adamax_client import errors as client_errors
from adamax_client.transport import RetryPolicy, Transport
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.transport import bulk as bulk_server
from adamax_server.transport.budget import CallLimits
from adamax_server.transport.server import create_server, stop_server
from adamax_wire import bulk_frames as _bulk
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_wire.proto.adamax.v1 import adamax_pb2_grpc as pb_grpc

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist")
FAST = CallLimits(floor=1.5, stall=0.5, hello_timeout=0.5, max_wait=5.0)
N = 4096  # floats per variable


@contextlib.contextmanager
def serving(**kwargs) -> Iterator[tuple[str, grpc.Server]]:
    kwargs.setdefault("call_limits", FAST)
    server, port = create_server("127.0.0.1:0", coordinator=Coordinator(device="cpu"), **kwargs)
    server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        stop_server(server, grace=None)


def _build(target: str, name: str = "m", n: int = N) -> None:
    with RemoteAdamax(target, optimizer=name, worker_id="builder", bulk="off") as opt:
        opt.build({"a": np.zeros(n, np.float32), "b": np.zeros(n, np.float32)})


def _train(target: str, worker: str, steps: int, results: dict, *, bulk: str = "auto", deadline: float) -> None:
    """A plain pull/compute/push loop; records how many steps were applied and the paths used."""
    done, paths = 0, set()
    try:
        with RemoteAdamax(target, optimizer="m", worker_id=worker, bulk=bulk, timeout=10) as opt:
            for _ in range(steps):
                if time.monotonic() > deadline:
                    break
                opt.pull()
                result = opt.push([np.full(N, 0.01, np.float32), np.full(N, 0.02, np.float32)])
                done += result.outcome == "applied"
                paths.add(opt.transfer_path)
    except Exception as exc:  # noqa: BLE001 - reported through results
        results[worker] = exc
        return
    results[worker] = (done, paths)


def _run_workers(target: str, count: int, steps: int, seconds: float, **kwargs) -> dict:
    results: dict = {}
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_train, args=(target, f"w{i}", steps, results), kwargs={"deadline": deadline, **kwargs})
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return results


# ---------------------------------------------------------------- 1. the bulk handshake


def test_idle_connections_without_a_ticket_cannot_keep_workers_out():
    with serving() as (target, server):
        _build(target)
        port = server.bulk.port
        idle = []
        try:
            for _ in range(300):  # what needs no ticket: plain TCP connections that say nothing
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            results = _run_workers(target, 3, 15, 30.0)
            assert all(r[0] == 15 for r in results.values()), results
            assert all(r[1] <= {"tcp", "shm"} for r in results.values()), results  # the bulk channel itself
            # The silent ones were dropped (for newer connections, or at their hello deadline).
            idle[-1].settimeout(5)
            assert idle[-1].recv(1) == b""
        finally:
            for sock in idle:
                sock.close()


def test_a_full_bulk_port_sends_pushes_to_grpc():
    with serving() as (target, server):
        _build(target)
        server.bulk._max_connections = 1
        with RemoteAdamax(target, optimizer="m", worker_id="first", bulk="tcp", timeout=10) as first:
            first.push([np.ones(N, np.float32)] * 2)
            assert first.transfer_path == "tcp"
            results = _run_workers(target, 2, 5, 20.0)
        assert all(r[0] == 5 and r[1] == {"grpc"} for r in results.values()), results
        assert server.coordinator.get("m").iterations == 11


@pytest.mark.parametrize("cuts", [1, 100])
def test_a_cut_handshake_is_retried_then_sent_through_grpc(monkeypatch, cuts):
    real_hello = bulk_server.BulkServer._hello
    count = {"cut": 0}

    def cutting_hello(self, timed, sock, peer):
        if count["cut"] < cuts:
            count["cut"] += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # RST: the client sees ConnectionResetError mid-handshake
            raise OSError("cut")
        return real_hello(self, timed, sock, peer)

    monkeypatch.setattr(bulk_server.BulkServer, "_hello", cutting_hello)
    with serving() as (target, server):
        _build(target)
        with RemoteAdamax(target, optimizer="m", worker_id="w0", bulk="tcp", timeout=10) as opt:
            for step in range(3):
                assert opt.push([np.ones(N, np.float32)] * 2).outcome == "applied"
                opt.pull()
            assert opt.transfer_path == ("tcp" if cuts == 1 else "grpc")
        assert server.coordinator.get("m").iterations == 3


# ---------------------------------------------------------------- 2 and 3. slow and stalled pushes


def _stalled_grpc_push(target: str, release: threading.Event, outcome: dict) -> threading.Thread:
    """A gRPC push without a deadline that sends half a tensor, then nothing."""
    header, views = _wire.tensor_payload("a", np.ones(N, np.float32))
    payload = bytes(views[0])

    def frames():
        yield _wire.header_frame(pb.PushHeader(optimizer="m", worker_id="staller", step=0, request_id="s", num_tensors=2))
        yield pb.PushRequest(tensor=header).SerializeToString()
        yield pb.PushRequest(chunk=payload[: len(payload) // 2]).SerializeToString()
        release.wait(30)

    channel = grpc.insecure_channel(target)
    push = channel.stream_unary("/adamax.v1.AdamaxService/Push", request_serializer=lambda b: b,
                                response_deserializer=pb.PushResponse.FromString)

    def run():
        try:
            push(frames())  # no deadline
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()
        outcome["at"] = time.monotonic()
        channel.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _pushing(server, worker_id: str, within: float = 5.0) -> bool:
    """Whether ``worker_id``'s push reached the optimizer (seen before its payload is read)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(w.worker_id == worker_id for w in server.coordinator.get("m").status().workers):
            return True
        time.sleep(0.01)
    return False


def test_a_stalled_grpc_push_does_not_block_the_others_and_is_cancelled():
    with serving() as (target, server):
        _build(target)
        release, outcome = threading.Event(), {}
        started = time.monotonic()
        staller = _stalled_grpc_push(target, release, outcome)
        try:
            assert _pushing(server, "staller")  # its push is being received
            results = _run_workers(target, 2, 15, 20.0, bulk="off")
            assert all(r[0] == 15 for r in results.values()), results
            staller.join(10)
            assert outcome["code"] == grpc.StatusCode.CANCELLED
            assert outcome["at"] - started < 5  # well before the test would let it go
        finally:
            release.set()
            staller.join(10)
        assert server.coordinator.get("m").iterations == 30


def test_a_worker_whose_push_stalls_learns_why_it_was_cut(caplog):
    """The server's cut reaches the worker as CANCELLED without words: the client says what the
    server cuts and that a retry is safe, and the server logs which call it cut and why."""
    with serving() as (target, server), RemoteAdamax(target, optimizer="m", worker_id="slow", bulk="off", timeout=10) as opt:
        _build(target)

        def slow_items():
            yield "a", np.ones(N, np.float32)
            time.sleep(1.5)  # the stall budget is 0.5 s
            yield "b", np.ones(N, np.float32)

        with caplog.at_level("WARNING", logger="adamax_server.transport.budget"):
            with pytest.raises(client_errors.CancelledError, match=r"server cut the call.*--stall-seconds.*same request id"):
                opt.push_stream(slow_items(), num_tensors=2)
        assert any("cut a push from" in r.getMessage() and "nothing moved" in r.getMessage() for r in caplog.records)
        assert server.coordinator.get("m").iterations == 0  # nothing of it was applied
        assert opt.push([np.ones(N, np.float32)] * 2).outcome == "applied"


def test_a_lone_stalled_grpc_push_is_cancelled_by_its_stall_budget():
    with serving() as (target, server):
        _build(target)
        release, outcome = threading.Event(), {}
        started = time.monotonic()
        staller = _stalled_grpc_push(target, release, outcome)
        staller.join(10)
        release.set()
        assert outcome.get("code") == grpc.StatusCode.CANCELLED, outcome
        assert outcome["at"] - started < 3  # stall 0.5 s (+ watchdog tick)
        host = server.coordinator.get("m")
        assert host.iterations == 0 and host._shard.staged_keys() == []


def _dribbling_bulk_push(target: str, stop: threading.Event, log: dict) -> threading.Thread:
    """A bulk push that sends one byte every 0.2 s: under the 0.5 s stall limit of each read."""
    transport = Transport(target)
    try:
        ticket = transport.unary("OpenBulkChannel", pb.OpenBulkChannelRequest(optimizer="m", worker_id="dribbler"))
    finally:
        transport.close()
    sock = socket.create_connection(("127.0.0.1", ticket.port), timeout=10)
    _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=ticket.ticket)))
    assert _bulk.recv_frame(sock).status.code == "OK"
    header, _ = _wire.tensor_payload("a", np.ones(N, np.float32))
    _bulk.send_frame(sock, pb.BulkFrame(push=pb.PushHeader(optimizer="m", worker_id="dribbler", step=0,
                                                           request_id="d", num_tensors=2)))
    _bulk.send_frame(sock, pb.BulkFrame(tensor=header))

    def run():
        started = time.monotonic()
        try:
            for _ in range(200):  # at most 40 s
                if stop.is_set():
                    break
                sock.sendall(b"\x00")
                time.sleep(0.2)
        except OSError:
            log["closed_after"] = time.monotonic() - started
        finally:
            sock.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_dribbling_bulk_push_does_not_block_the_others_and_runs_out_of_budget():
    with serving() as (target, server):
        _build(target)
        stop, log = threading.Event(), {}
        dribbler = _dribbling_bulk_push(target, stop, log)
        try:
            assert _pushing(server, "dribbler")
            results = _run_workers(target, 2, 15, 20.0, bulk="tcp")
            assert all(r[0] == 15 for r in results.values()), results
            dribbler.join(10)
            assert "closed_after" in log and log["closed_after"] < 5, log
        finally:
            stop.set()
            dribbler.join(10)


def test_a_lone_dribbling_bulk_push_is_cut_at_its_budget():
    with serving() as (target, server):
        _build(target)
        stop, log = threading.Event(), {}
        dribbler = _dribbling_bulk_push(target, stop, log)
        dribbler.join(15)
        stop.set()
        # floor 1.5 s + 32 KiB at 1 MiB/s: cut at about 1.5 s although every read got a byte in time.
        assert "closed_after" in log and 1.0 < log["closed_after"] < 4, log
        assert server.coordinator.get("m").iterations == 0


# ---------------------------------------------------------------- 4. threads


def test_unread_pulls_cannot_take_every_thread():
    big = 4 << 20  # 16 MB of float32: far more than gRPC's flow-control window
    with serving(max_workers=8) as (target, server):
        _build(target, n=big)
        channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.AdamaxServiceStub(channel)
        pulls = [stub.Pull(pb.PullRequest(optimizer="m")) for _ in range(40)]  # never read, no deadline
        try:
            time.sleep(0.5)
            transport = Transport(target, timeout=3)
            try:
                started = time.monotonic()
                for i in range(5):  # control calls are answered at once
                    transport.unary("CreateOptimizer", pb.CreateOptimizerRequest(optimizer=f"x{i}", config_json="{}"))
                    transport.unary("ListOptimizers", pb.ListOptimizersRequest())
                assert time.monotonic() - started < 2
            finally:
                transport.close()
            assert server.admission.refused > 0  # the pulls beyond the data threads were refused at once
            # The unread ones are cancelled once they stall, so an honest worker gets its weights.
            with RemoteAdamax(target, optimizer="m", worker_id="honest", bulk="off", timeout=15,
                              retry=RetryPolicy(initial_backoff=0.1, max_backoff=0.5, max_attempts=50)) as opt:
                weights = opt.pull()
            assert weights["a"].shape == (big,)
        finally:
            for call in pulls:
                call.cancel()
            channel.close()


def test_budgets_and_reserved_threads_are_serve_flags(monkeypatch):
    from adamax_server.cli import commands
    from adamax_server.cli.runtime import server_kwargs

    monkeypatch.setenv("ADAMAX_PS_STALL_SECONDS", "7")
    args = commands.build_parser().parse_args(
        ["serve", "--call-floor-seconds", "2", "--min-transfer-mib", "4", "--reserved-threads", "3"]
    )
    kwargs = server_kwargs(args)
    assert kwargs["reserved_threads"] == 3
    assert kwargs["call_limits"] == CallLimits(floor=2.0, min_rate=4.0 * 2**20, stall=7.0)
    with pytest.raises(ValueError, match="stall"):
        server_kwargs(commands.build_parser().parse_args(["serve", "--stall-seconds", "0"]))


def test_a_received_grpc_push_waiting_for_the_staging_buffer_is_not_cut_by_the_stall_limit():
    """The stall limit is about bytes that stop coming; a push that has all its bytes and waits
    (for the staging buffer, for an earlier copy of itself) has other bounds."""
    with serving() as (target, server):
        _build(target)
        host = server.coordinator.get("m")
        holding = threading.Event()

        def slow_receive(_staging):
            holding.set()
            time.sleep(1.5)  # three stall limits; in-process, so nobody can cancel it
            return [("a", np.ones(N, np.float32)), ("b", np.ones(N, np.float32))]

        holder = threading.Thread(target=lambda: host.push("inproc", "r0", 0, slow_receive, timeout=10))
        holder.start()
        try:
            assert holding.wait(5)
            with RemoteAdamax(target, optimizer="m", worker_id="w1", bulk="off", timeout=10) as opt:
                assert opt.push([np.ones(N, np.float32)] * 2, step=0).outcome == "applied"
        finally:
            holder.join(10)
        assert host.iterations == 2
