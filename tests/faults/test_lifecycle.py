"""Process faults and shutdown: a worker killed mid-push, SIGTERM with calls in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _ps_helpers import REPO_ROOT, assert_same_state, drain_json_log, json_log_events, running_server, snapshot

from adamax_client import RemoteAdamax
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server.transport.server import SERVICE_NAME

BIG = 1 << 20  # float32 elements: 4 MiB, many chunks

_DOOMED_WORKER = f"""
import sys, time, grpc, numpy as np
from adamax_wire import tensors as _wire
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb

def frames():
    yield _wire.header_frame(pb.PushHeader(optimizer="big", worker_id="doomed", step=0, request_id="r1"))
    rest = _wire.tensor_frames("w", np.ones({BIG}, np.float32), chunk_bytes=65536)
    yield next(rest)
    yield next(rest)
    print("half sent", flush=True)
    time.sleep(60)  # killed long before this ends
    yield from rest

channel = grpc.insecure_channel(sys.argv[1])
push = channel.stream_unary("/{SERVICE_NAME}/Push", request_serializer=lambda b: b, response_deserializer=lambda b: b)
push(frames(), timeout=120)
"""


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "server"), str(REPO_ROOT / "client"), str(REPO_ROOT / "wire"), os.environ.get("PYTHONPATH", "")]
    )
    env.update(extra)
    return env


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _in_flight(host):
    return host.in_flight()


def test_a_worker_killed_mid_push_leaves_no_partial_update():
    with running_server() as (target, coordinator):
        with RemoteAdamax(target, name="big", worker_id="setup") as remote:
            remote.build({"w": np.zeros(BIG, np.float32)})
            host = coordinator.get("big")
            before = snapshot(host)
            proc = subprocess.Popen([sys.executable, "-c", _DOOMED_WORKER, target], env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert proc.stdout.readline().strip() == "half sent"
                _wait_until(lambda: _in_flight(host) == [("doomed", "r1")], 10, "the push to be in flight")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            _wait_until(lambda: not _in_flight(host), 10, "the server to drop the dead push")
            assert_same_state(before, snapshot(host))
            # the same request id, sent again in full, is applied (it was never recorded as done)
            remote.worker_id = "doomed"
            result = remote.push([np.ones(BIG, np.float32)], request_id="r1")
            assert result.outcome == "applied" and not result.duplicate and result.version == 1


def _slow_push_frames(gate: threading.Event):
    yield _wire.header_frame(pb.PushHeader(optimizer="m", worker_id="slow", step=0, request_id="slow-1"))
    gate.wait(10)  # the rest is sent after SIGTERM
    time.sleep(0.3)
    yield from _wire.tensor_frames("w", np.ones(3, np.float32))


def test_sigterm_finishes_calls_in_flight_reports_not_serving_and_exits_0(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "--log-format", "json", "serve", "--port", "0", "--device", "cpu",
         "--grace", "3"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        events, _ = json_log_events(proc, ("listening",))  # JSON logs: the port is a field, no plain line
        target = f"127.0.0.1:{events['listening']['port']}"
        with RemoteAdamax(target, name="m", worker_id="w0") as remote:
            remote.build({"w": np.zeros(3, np.float32)})
        channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        gate = threading.Event()
        push = channel.stream_unary(f"/{SERVICE_NAME}/Push", request_serializer=lambda b: b,
                                    response_deserializer=pb.PushResponse.FromString)
        future = push.future(_slow_push_frames(gate), timeout=20)
        time.sleep(0.3)  # the push is in flight: its header has arrived
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        reply = future.result(timeout=10)  # the call in flight completes during the grace period
        assert reply.outcome == pb.APPLIED and reply.version == 1
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 3 + 2  # inside the grace period (Docker waits 10 s)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    logs = [json.loads(line) for line in drain_json_log(proc) if line.startswith("{")]
    messages = [entry["message"] for entry in logs]
    assert any(m.startswith("shutting down (SIGTERM)") for m in messages), messages
    assert any(m.startswith("stopped after") for m in messages), messages


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port, checkpoint_dir, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "adamax_server.cli", "serve", "--port", str(port), "--device", "cpu",
         "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every-steps", "5", *extra],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc


def test_server_killed_with_sigkill_restarts_from_the_latest_checkpoint_and_workers_continue(tmp_path):
    from adamax_client import RetryPolicy

    port = _free_port()
    target = f"127.0.0.1:{port}"
    first = _serve(port, tmp_path)
    second = None
    try:
        assert "listening" in first.stdout.readline()
        remote = RemoteAdamax(target, name="m", worker_id="w0", timeout=60,
                              retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.3, max_attempts=200))
        remote.build({"w": np.zeros(3, np.float32)})
        for _ in range(23):
            remote.pull()
            remote.apply([np.ones(3, np.float32)])
        _wait_until(lambda: any(p.name.startswith("ckpt-") for p in tmp_path.iterdir()), 10, "a checkpoint")
        time.sleep(0.5)  # let the policy thread catch up with version 20
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        def restart():
            nonlocal second
            time.sleep(0.5)  # the worker sees UNAVAILABLE meanwhile and backs off
            second = _serve(port, tmp_path, "--restore", "latest")

        starter = threading.Thread(target=restart)
        starter.start()
        weights = remote.pull()  # retried with backoff until the restarted server answers
        starter.join(10)
        restored = remote.version
        # The policy thread saves once 5 or more steps have passed since its last checkpoint, so
        # the newest one is at some version in [5, 23]; the restart must resume exactly there.
        from adamax_server.storage.checkpoint import CheckpointStore

        newest = max(CheckpointStore(tmp_path).list(), key=lambda c: c.created_unix)
        assert 5 <= restored <= 23, restored
        assert restored == newest.optimizers[0].version, (restored, newest)
        info = remote.status()
        assert info["iterations"] == restored  # async: one iteration per version
        np.testing.assert_array_equal(weights["w"].shape, (3,))
        versions = []
        for _ in range(3):
            remote.pull()
            versions.append(remote.apply([np.ones(3, np.float32)]).version)
        assert versions == [restored + 1, restored + 2, restored + 3]  # never backwards from the restore
        remote.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(15)
