"""The bulk channel: pushes and pulls over raw TCP or shared memory, same meaning as gRPC.

Every test runs a real server on 127.0.0.1:0. The three paths ("off" = gRPC streams, "tcp",
"shm") must give bit-identical weights; the bulk-specific parts (tickets, connection scope,
a connection cut mid-push, refusals that keep the connection in step, shared-memory
refusal) are checked on raw sockets where the client would hide them.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from _ps_helpers import running_server

from adamax_wire import bulk_frames as _bulk
from adamax_wire import tensors as _wire
from adamax_client import RemoteAdamax, RowSparseGradient
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_client.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from adamax_client.transport import Transport
from adamax_server import Adamax
from adamax_server.optim.engine import RowSparseGradient as ServerRowSparse
from adamax_server.transport.security import SecurityConfigError, TokenTable

PATHS = ["off", "tcp", "shm"]
pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist")


def _variables(rng):
    return {
        "dense": rng.standard_normal((64, 33)).astype(np.float32),
        "emb": rng.standard_normal((50, 8)).astype(np.float32),
        "bias": rng.standard_normal(7).astype(np.float32),
        "scalar": np.float32(0.5).reshape(()),
    }


def _gradients(rng, step):
    rows = np.array([3, 7, 7, 49])
    return [
        rng.standard_normal((64, 33)).astype(np.float32),
        RowSparseGradient(rows, rng.standard_normal((4, 8)).astype(np.float32)),
        rng.standard_normal(7).astype(np.float32) if step % 2 else None,
        np.float32(step).reshape(()),
    ]


def _run(target, path, *, wire=None, steps=4, **kwargs):
    rng = np.random.default_rng(7)
    with RemoteAdamax(target, optimizer=f"o-{path}-{wire}", worker_id="w0", learning_rate=0.01, use_ema=True,
                      bulk=path, gradient_wire_dtype=wire, **kwargs) as opt:  # fmt: skip
        opt.build(_variables(rng))
        partial = []
        for step in range(steps):
            result = opt.push(_gradients(rng, step))
            assert result.outcome == "applied" and not result.duplicate
            partial.append(opt.pull(["bias", "scalar"]))
        final = opt.pull()
        again = opt.pull()  # not_modified: answered without tensors, served from the client's cache
        assert list(again) == list(final) and all(again[n] is final[n] for n in final)
        return opt.transfer_path, final, partial


@pytest.mark.parametrize("wire", [None, "bfloat16"])
def test_every_path_gives_identical_weights(wire):
    with running_server() as (target, _):
        results = {path: _run(target, path, wire=wire) for path in PATHS}
    assert [results[p][0] for p in PATHS] == ["grpc", "tcp", "shm"]
    for path in ("tcp", "shm"):
        for name, value in results["off"][1].items():
            assert np.array_equal(value, results[path][1][name]), (path, name)
        for got, want in zip(results[path][2], results["off"][2]):
            assert all(np.array_equal(got[n], want[n]) for n in want)


def test_bulk_matches_local_engine():
    rng = np.random.default_rng(7)
    local = Adamax(learning_rate=0.01, use_ema=True)
    local.build(_variables(rng))
    for step in range(4):
        grads = _gradients(rng, step)
        grads[1] = ServerRowSparse(grads[1].indices, grads[1].values)
        local.apply(grads)
    with running_server() as (target, _):
        _, final, _ = _run(target, "shm")
    for name, value in local.trainable_variables.items():
        assert np.array_equal(final[name], value), name


@pytest.mark.parametrize("path", ["tcp", "shm"])
def test_sync_rounds_over_bulk(path):
    """Two workers, K=N=2: the round closes on the second push; pulls wait for it."""
    rng = np.random.default_rng(3)
    init = {"w": rng.standard_normal(1000).astype(np.float32)}
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(2)]
    out = {}
    with running_server() as (target, _):
        for transfer in ("off", path):
            workers = [
                RemoteAdamax(target, optimizer=f"sync-{transfer}", worker_id=f"w{i}", mode="sync", num_workers=2,
                             bulk=transfer)  # fmt: skip
                for i in range(2)
            ]
            workers[0].build(init)
            workers[1].attach()
            pulled = {}

            def second():
                workers[1].push([grads[1]])
                pulled[1] = workers[1].pull()["w"]

            assert workers[0].push([grads[0]]).outcome == "accepted"
            t = threading.Thread(target=second)
            t.start()
            pulled[0] = workers[0].pull()["w"]  # waits for the round
            t.join(30)
            assert np.array_equal(pulled[0], pulled[1])
            out[transfer] = pulled[0]
            for w in workers:
                w.close()
    assert np.array_equal(out["off"], out[path])


# ---------------------------------------------------------------- raw connections


def _ticket(target, optimizer="raw", worker_id="w0", token=None):
    transport = Transport(target, token=token)
    try:
        response = transport.unary("OpenBulkChannel", pb.OpenBulkChannelRequest(optimizer=optimizer, worker_id=worker_id))
    finally:
        transport.close()
    assert response.available and response.port > 0
    return response


def _connect(target, response):
    sock = socket.create_connection(("127.0.0.1", response.port), timeout=10)
    _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=response.ticket)))
    return sock, _bulk.recv_frame(sock)


def _built(target, name="raw", n=1000):
    opt = RemoteAdamax(target, optimizer=name, worker_id="w0", bulk="off")
    opt.build({"a": np.zeros(n, np.float32), "b": np.zeros(n, np.float32)})
    return opt


def _push_header(request_id="r1", num_tensors=2, optimizer="raw", worker_id="w0"):
    return pb.BulkFrame(push=pb.PushHeader(optimizer=optimizer, worker_id=worker_id, step=0, request_id=request_id,
                                           num_tensors=num_tensors))  # fmt: skip


def _send_dense(sock, name, array):
    header, views = _wire.tensor_payload(name, array)
    _bulk.send_tensor(sock, header, views)


def test_tickets_are_single_use_and_checked():
    with running_server() as (target, _):
        _built(target).close()
        response = _ticket(target)
        sock, reply = _connect(target, response)
        assert reply.status.code == "OK"
        sock.close()
        sock, reply = _connect(target, response)  # the same ticket again
        assert reply.status.code == "UNAUTHENTICATED"
        sock.close()
        forged = pb.OpenBulkChannelResponse(port=response.port, ticket=b"x" * 32)
        sock, reply = _connect(target, forged)
        assert reply.status.code == "UNAUTHENTICATED"
        sock.close()
        with pytest.raises(NotFoundError):
            _ticket(target, optimizer="nope")


def test_a_push_cut_mid_payload_changes_nothing_and_its_retry_applies_once():
    with running_server() as (target, coordinator):
        opt = _built(target)
        host = coordinator.get("raw")
        sock, reply = _connect(target, _ticket(target))
        assert reply.status.code == "OK"
        _bulk.send_frame(sock, _push_header("cut"))
        _send_dense(sock, "a", np.ones(1000, np.float32))
        header, views = _wire.tensor_payload("b", np.ones(1000, np.float32))
        _bulk.send_frame(sock, pb.BulkFrame(tensor=header))
        sock.sendall(views[0][:1000])  # a quarter of the second payload, then the worker dies
        sock.close()
        for _ in range(200):  # the server notices the closed connection
            if not host.in_flight():
                break
            threading.Event().wait(0.01)
        assert host.version == 0 and host.iterations == 0
        with RemoteAdamax(target, optimizer="raw", worker_id="w0", bulk="tcp") as retry:
            first = retry.push([np.ones(1000, np.float32)] * 2, request_id="cut")
            again = retry.push([np.ones(1000, np.float32)] * 2, request_id="cut")
        assert (first.outcome, first.duplicate, again.duplicate) == ("applied", False, True)
        assert host.iterations == 1
        opt.close()


def test_refusals_keep_the_connection_in_step():
    """A refused push (wrong shape, other optimizer) is drained; the next call on the same
    connection works."""
    with running_server() as (target, coordinator):
        _built(target).close()
        _built(target, name="other").close()
        sock, _ = _connect(target, _ticket(target))
        _bulk.send_frame(sock, _push_header("bad-shape"))
        _send_dense(sock, "a", np.ones(999, np.float32))
        _send_dense(sock, "b", np.ones(1000, np.float32))
        reply = _bulk.recv_frame(sock)
        assert reply.status.code == "INVALID_ARGUMENT" and "shape" in reply.status.message
        _bulk.send_frame(sock, _push_header("elsewhere", optimizer="other"))
        _send_dense(sock, "a", np.ones(1000, np.float32))
        _send_dense(sock, "b", np.ones(1000, np.float32))
        reply = _bulk.recv_frame(sock)
        assert reply.status.code == "PERMISSION_DENIED"
        _bulk.send_frame(sock, _push_header("good"))
        _send_dense(sock, "a", np.ones(1000, np.float32))
        _send_dense(sock, "b", np.ones(1000, np.float32))
        reply = _bulk.recv_frame(sock)
        assert reply.push_response.outcome == pb.APPLIED
        assert coordinator.get("raw").iterations == 1 and coordinator.get("other").iterations == 0
        sock.close()


def test_client_errors_are_the_grpc_ones():
    with running_server() as (target, _):
        with RemoteAdamax(target, optimizer="errs", worker_id="w0", bulk="tcp") as opt:
            opt.build({"a": np.zeros(10, np.float32)})
            with pytest.raises(InvalidArgumentError, match="shape"):
                opt.push([np.ones(11, np.float32)])
            with pytest.raises(NotFoundError):
                opt.pull(["missing"])
            assert opt.push([np.ones(10, np.float32)]).outcome == "applied"
            assert opt.transfer_path == "tcp"


def test_falls_back_to_grpc_without_a_bulk_channel():
    with running_server(bulk=False) as (target, _):
        with RemoteAdamax(target, optimizer="nb", worker_id="w0") as opt:
            opt.build({"a": np.zeros(10, np.float32)})
            opt.push([np.ones(10, np.float32)])
            assert opt.pull()["a"].shape == (10,)
            assert opt.transfer_path == "grpc"


def test_tokens_and_scopes_apply_to_tickets():
    tokens = TokenTable.from_tokens({"all-token": [], "scoped-token": ["mine"]})
    with running_server(tokens=tokens) as (target, _):
        with RemoteAdamax(target, optimizer="mine", worker_id="w0", token="scoped-token") as opt:
            opt.build({"a": np.zeros(10, np.float32)})
            opt.push([np.ones(10, np.float32)])
            assert opt.transfer_path == "shm"
        with pytest.raises(UnauthenticatedError):
            _ticket(target, optimizer="mine")
        with pytest.raises(PermissionDeniedError):
            RemoteAdamax(target, optimizer="theirs", worker_id="w0", token="scoped-token")


def test_a_plaintext_bulk_port_next_to_tls_is_refused(tmp_path):
    import grpc
    from _certs import make_pki

    pki = make_pki(tmp_path)
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    with pytest.raises(SecurityConfigError, match="bulk"):
        with running_server(credentials=creds, bulk=True):
            pass


def test_shared_memory_refusals_fall_back_to_tcp():
    with running_server(shared_memory=False) as (target, _):
        with RemoteAdamax(target, optimizer="noshm", worker_id="w0") as opt:
            opt.build({"a": np.zeros(10, np.float32)})
            opt.push([np.ones(10, np.float32)])
            assert opt.transfer_path == "tcp"
    with running_server() as (target, _):
        _built(target).close()
        sock, _ = _connect(target, _ticket(target))
        from adamax_wire import shm as _shm

        segment, nonce = _shm.create(128)
        try:
            _bulk.send_frame(sock, pb.BulkFrame(shm_register=pb.ShmRegister(name=segment.name, nonce=b"wrong" * 4)))
            assert _bulk.recv_frame(sock).status.code == "PERMISSION_DENIED"
            _bulk.send_frame(sock, pb.BulkFrame(shm_register=pb.ShmRegister(name="adamax-no-such-segment", nonce=nonce)))
            assert _bulk.recv_frame(sock).status.code == "NOT_FOUND"
            # An in_shm tensor without a registered segment is refused, the stream stays in step.
            _bulk.send_frame(sock, _push_header("noseg", num_tensors=1))
            header, _ = _wire.tensor_payload("a", np.ones(1000, np.float32))
            header.in_shm, header.shm_offset = True, 64
            _bulk.send_frame(sock, pb.BulkFrame(tensor=header))
            assert _bulk.recv_frame(sock).status.code == "INVALID_ARGUMENT"
        finally:
            _shm.release(segment, unlink=True)
            sock.close()


def test_concurrent_async_pushes_swap_their_gradient_sets_in_safely():
    """Eight threads push the same gradient, each received into a gradient set of its own that
    becomes the engine's staging buffers when it is applied. Identical gradients make the
    result independent of the order: it must equal 8 local steps."""
    n = 200_000
    grad = np.linspace(-1, 1, n, dtype=np.float32)
    local = Adamax(learning_rate=0.01)
    local.build({"w": np.zeros(n, np.float32)})
    for _ in range(8):
        local.apply([grad])
    with running_server() as (target, _):
        with RemoteAdamax(target, optimizer="lease", worker_id="chief", learning_rate=0.01, bulk="off") as chief:
            chief.build({"w": np.zeros(n, np.float32)})
        errors = []

        def worker(i, path):
            try:
                with RemoteAdamax(target, optimizer="lease", worker_id=f"w{i}", learning_rate=0.01, bulk=path) as opt:
                    opt.attach()
                    assert opt.push([grad]).outcome == "applied"
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i, PATHS[i % 3])) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        with RemoteAdamax(target, optimizer="lease", worker_id="reader", learning_rate=0.01) as reader:
            reader.attach()
            got = reader.pull(min_version=8)["w"]
    np.testing.assert_array_equal(got, local.trainable_variables["w"])


def test_a_lost_reply_is_retried_on_a_new_connection_and_answered_as_duplicate(monkeypatch):
    from adamax_server.transport.bulk import BulkServer

    class LoseReply:
        def __init__(self, sock):
            self._sock = sock

        def __getattr__(self, name):
            return getattr(self._sock, name)

        def sendall(self, data):
            self._sock.shutdown(socket.SHUT_RDWR)
            raise OSError("injected: reply lost after the push was applied")

    seen = []
    original = BulkServer._push

    def lossy(self, conn, header):
        seen.append(header.request_id)
        if len(seen) > 1:
            return original(self, conn, header)
        real, conn.sock = conn.sock, LoseReply(conn.sock)
        try:
            return original(self, conn, header)
        finally:
            conn.sock = real

    monkeypatch.setattr(BulkServer, "_push", lossy)
    with running_server() as (target, coordinator):
        with RemoteAdamax(target, optimizer="lossy", worker_id="w0", bulk="tcp") as opt:
            opt.build({"a": np.zeros(10, np.float32)})
            result = opt.push([np.ones(10, np.float32)])
        assert len(seen) == 2 and seen[0] == seen[1]
        assert result.duplicate and result.version == 1
        assert coordinator.get("lossy").iterations == 1


def test_bulk_calls_are_in_the_metrics():
    from adamax_server.ops.metrics import ServerMetrics

    from adamax_server.sharding.coordinator import Coordinator
    from prometheus_client import generate_latest

    metrics = ServerMetrics()
    coordinator = Coordinator(device="cpu", observer=metrics)
    with running_server(coordinator=coordinator, metrics=metrics) as (target, _):
        with RemoteAdamax(target, optimizer="m", worker_id="w0", bulk="tcp") as opt:
            opt.build({"a": np.zeros(1000, np.float32)})
            opt.push([np.ones(1000, np.float32)])
            with pytest.raises(InvalidArgumentError):
                opt.push([np.ones(5, np.float32)])
            opt.pull()
    # The server counts a pull after its last byte is sent: the client may have it first.
    deadline = time.monotonic() + 5
    while 'method="BulkPull"' not in generate_latest(metrics.registry).decode() and time.monotonic() < deadline:
        time.sleep(0.02)
    text = generate_latest(metrics.registry).decode()
    assert 'adamax_ps_pushes_total{optimizer="m",outcome="applied"} 1.0' in text
    assert 'adamax_ps_rpcs_total{code="OK",method="BulkPush"} 1.0' in text
    assert 'adamax_ps_rpcs_total{code="INVALID_ARGUMENT",method="BulkPush"} 1.0' in text
    assert 'adamax_ps_received_bytes_total{method="BulkPush"} 4000.0' in text
    assert 'adamax_ps_sent_bytes_total{method="BulkPull"} 4000.0' in text


def test_docker_images_publish_the_bulk_port(monkeypatch):
    """The images set a fixed bulk port through the environment and publish it (workers in
    other containers reach it on the host name they use for gRPC; /dev/shm is not shared
    across containers, so they use TCP by themselves)."""
    import re
    from pathlib import Path

    from adamax_server.cli import commands as cli

    root = Path(__file__).resolve().parents[2]
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (root / "docker" / name).read_text()
        port = re.search(r"ADAMAX_PS_BULK_PORT=(\d+)", text).group(1)
        exposed = re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()
        assert port in exposed, name
        monkeypatch.setenv("ADAMAX_PS_BULK_PORT", port)
        assert cli.build_parser().parse_args(["serve"]).bulk_port == int(port)
    compose = (root / "docker" / "compose.yaml").read_text()
    assert re.search(rf'"(\$\{{PS_BULK_PUBLISH:-{port}\}}|{port}):{port}"', compose), compose


@pytest.mark.parametrize("path", ["tcp", "shm"])
def test_pull_buffers_are_reused_only_when_nothing_points_into_them(path):
    with running_server() as (target, _):
        with RemoteAdamax(target, optimizer=f"pool-{path}", worker_id="w0", learning_rate=0.1, bulk=path) as opt:
            opt.build({"w": np.zeros(1000, np.float32)})
            kept = []
            for step in range(4):
                opt.push([np.full(1000, 1.0 + step, np.float32)])
                weights = opt.pull()["w"]
                kept.append((weights, weights.copy()))
            for held, snapshot in kept:  # every version the caller still holds is intact
                np.testing.assert_array_equal(held, snapshot)
            assert len({held.ctypes.data for held, _ in kept}) == 4
            kept.clear()
            addresses = set()
            for step in range(6):  # dropping each step's weights lets the buffers cycle
                opt.push([np.full(1000, 1.0, np.float32)])
                addresses.add(opt.pull()["w"].ctypes.data)
            assert len(addresses) <= 3


def test_a_stalled_push_fails_and_frees_the_optimizer_for_the_others():
    """A worker that stops sending mid-push (host gone, no FIN) must not hold the staging
    buffer, and the pushes queued behind it, for ever."""
    with running_server(bulk_stall_timeout=0.5) as (target, coordinator):
        _built(target).close()
        sock, _ = _connect(target, _ticket(target))
        _bulk.send_frame(sock, _push_header("stalled"))
        header, views = _wire.tensor_payload("a", np.ones(1000, np.float32))
        _bulk.send_frame(sock, pb.BulkFrame(tensor=header))
        sock.sendall(views[0][:100])  # ... and nothing more
        with RemoteAdamax(target, optimizer="raw", worker_id="w1", bulk="tcp", timeout=10) as other:
            assert other.push([np.ones(1000, np.float32)] * 2).outcome == "applied"
        assert coordinator.get("raw").iterations == 1
        sock.close()


@pytest.mark.parametrize("path", ["tcp", "shm"])
def test_a_duplicate_push_on_the_same_connection_keeps_it_in_step(path):
    """A retry answered from the exactly-once table is not read by the coordinator; its
    tensors must still be consumed, or the next call on the connection would read them."""
    with running_server() as (target, coordinator):
        with RemoteAdamax(target, optimizer=f"dup-{path}", worker_id="w0", bulk=path) as opt:
            opt.build({"a": np.zeros(100, np.float32), "b": np.zeros(3, np.float32)})
            grads = [np.ones(100, np.float32), np.ones(3, np.float32)]
            first = opt.push(grads, request_id="same")
            again = opt.push(grads, request_id="same")
            assert (first.duplicate, again.duplicate) == (False, True)
            assert opt.push(grads).outcome == "applied"
            assert opt.pull()["b"].shape == (3,)
            assert opt.transfer_path == path
        assert coordinator.get(f"dup-{path}").iterations == 2


def test_fuzzed_bulk_connections_never_crash_the_server_or_change_state(caplog):
    """Random bytes and random (well- and ill-formed) frames after a valid hello: every
    connection ends with a status reply or a close, nothing is applied, no internal error is
    logged, and the server keeps serving."""
    import logging
    import random

    rng = random.Random(1234)
    caplog.set_level(logging.ERROR, logger="adamax_server")

    def random_tensor():
        header = pb.TensorHeader(
            name=rng.choice(["a", "b", "zz", ""]), dtype=rng.randrange(0, 9),
            shape=[rng.randrange(-2, 2000) for _ in range(rng.randrange(0, 3))],
            nbytes=rng.choice([0, 4, 4000, rng.randrange(-5, 1 << 40)]), layout=rng.randrange(0, 3),
            num_rows=rng.randrange(-1, 5), absent=rng.random() < 0.1, in_shm=rng.random() < 0.2,
            shm_offset=rng.randrange(-100, 1 << 20),
        )  # fmt: skip
        return pb.BulkFrame(tensor=header)

    def random_message(sock):
        kind = rng.randrange(6)
        if kind == 0:
            sock.sendall(rng.randbytes(rng.randrange(1, 64)))
        elif kind == 1:
            body = rng.randbytes(rng.randrange(0, 40))
            sock.sendall(len(body).to_bytes(4, "little") + body)
        elif kind == 2:
            sock.sendall((rng.randrange(1 << 21, 1 << 32)).to_bytes(4, "little"))
        elif kind == 3:
            _bulk.send_frame(sock, _push_header(rng.choice(["x", "y"]), num_tensors=rng.randrange(-1, 4),
                                                optimizer=rng.choice(["raw", "other", ""])))
        elif kind == 4:
            _bulk.send_frame(sock, random_tensor())
            sock.sendall(rng.randbytes(rng.randrange(0, 5000)))
        else:
            request = pb.PullRequest(optimizer=rng.choice(["raw", "nope"]), names=rng.choice([[], ["a"], ["q"]]),
                                     shm=rng.random() < 0.5, min_version=rng.randrange(0, 3), wait_seconds=0.01)
            _bulk.send_frame(sock, pb.BulkFrame(pull=request))

    with running_server(bulk_stall_timeout=0.3) as (target, coordinator):
        _built(target).close()
        host = coordinator.get("raw")
        connections = 0
        for _ in range(150):
            sock, reply = _connect(target, _ticket(target))
            assert reply.status.code == "OK"
            sock.settimeout(2.0)
            connections += 1
            try:
                for _ in range(rng.randrange(1, 6)):
                    random_message(sock)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(1 << 16):  # the server answers and/or closes; never hangs
                    pass
            except (OSError, socket.timeout):
                pass
            finally:
                sock.close()
        assert host.iterations == 0 and host.version == 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        with RemoteAdamax(target, optimizer="raw", worker_id="w0", bulk="tcp") as opt:
            assert opt.push([np.ones(1000, np.float32)] * 2).outcome == "applied"
    print(f"\nbulk fuzz: {connections} connections of random frames and bytes")


def test_shared_memory_pull_segments_follow_deletes_and_re_creates():
    """A deleted optimizer's pull segment is unlinked, and a re-created optimizer with the
    same name never gets the old one's weights (its versions start again from 0)."""
    import os

    with running_server() as (target, coordinator):
        names = []
        for value in (1.0, 2.0):
            local = Adamax()
            local.build({"a": np.full(10, value, np.float32)})
            local.apply([np.ones(10, np.float32)])
            with RemoteAdamax(target, optimizer="again", worker_id="w0", bulk="shm") as opt:
                opt.build({"a": np.full(10, value, np.float32)})
                opt.push([np.ones(10, np.float32)])  # version 1 in both lives of "again"
                pulled = opt.pull()["a"]
                assert opt.transfer_path == "shm" and len(opt._bulk._pull_segments) == 1
                np.testing.assert_array_equal(pulled, local.trainable_variables["a"])
                names.append(next(iter(opt._bulk._pull_segments)))
                opt._transport.unary("DeleteOptimizer", pb.OptimizerRef(optimizer="again"))
                assert not os.path.exists(f"/dev/shm/{names[-1].lstrip('/')}")  # unlinked by the delete
        assert names[0] != names[1]
        with RemoteAdamax(target, optimizer="third", worker_id="w0", bulk="shm") as opt:
            opt.build({"a": np.zeros(10, np.float32)})
            opt.push([np.ones(10, np.float32)])
            opt.pull()
        assert not os.path.exists(f"/dev/shm/{names[0].lstrip('/')}")
        assert not os.path.exists(f"/dev/shm/{names[1].lstrip('/')}")


def test_shared_memory_gradients_are_copied_before_they_are_checked():
    """The worker owns its segment and may write it at any time: what the server checked
    (finite values) must be what it applies, so the server reads a private copy."""
    with running_server() as (target, coordinator):
        _built(target).close()
        sock, _ = _connect(target, _ticket(target))
        from adamax_wire import shm as _shm

        segment, nonce = _shm.create(8192)
        view = None
        try:
            _bulk.send_frame(sock, pb.BulkFrame(shm_register=pb.ShmRegister(name=segment.name, nonce=nonce)))
            assert _bulk.recv_frame(sock).status.code == "OK"
            view = np.frombuffer(segment.buf, dtype=np.float32, count=2000, offset=64)
            view[:] = 1.0
            engine = coordinator.get("raw")._shard._engine
            original = engine.finish_step

            def poisoning_apply(*args, **kwargs):  # the worker scribbles NaN after the check
                view[:] = np.nan
                return original(*args, **kwargs)

            engine.finish_step = poisoning_apply
            _bulk.send_frame(sock, _push_header("p", num_tensors=2))
            for name, offset in (("a", 64), ("b", 64 + 4000)):
                header, _ = _wire.tensor_payload(name, np.ones(1000, np.float32))
                header.in_shm, header.shm_offset = True, offset
                _bulk.send_frame(sock, pb.BulkFrame(tensor=header))
            assert _bulk.recv_frame(sock).push_response.outcome == pb.APPLIED
            del engine.finish_step
            weights = coordinator.get("raw")._shard.read_engine(lambda e: e.trainable_variables)
            assert all(np.isfinite(w).all() for w in weights.values())
        finally:
            view = None  # let the segment close
            _shm.release(segment, unlink=True)
            sock.close()
