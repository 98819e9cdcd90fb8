"""Security: TLS and mutual TLS, bearer tokens (global and per optimizer), reflection, limits."""

from __future__ import annotations

import os

import hmac
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _certs import make_pki
from _ps_helpers import REPO_ROOT, running_server

from adamax_client import (
    PermissionDeniedError,
    RemoteAdamax,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
    tls_channel_credentials,
)
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server.transport import security
from adamax_server.sharding.coordinator import Coordinator
from adamax_server.transport.security import SecurityConfigError, TlsConfig, TokenTable, server_credentials
from adamax_server.transport.server import SERVICE_NAME
from adamax_server.transport.validation import ResourceLimits

VARS = {"w": np.zeros((3, 2), np.float32)}
GRAD = [np.ones((3, 2), np.float32)]
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _round_trip(target, **kwargs):
    kwargs = {"timeout": 5, **kwargs}
    with RemoteAdamax(target, name="m", retry=NO_RETRY, **kwargs) as remote:
        remote.build(VARS)
        remote.apply(GRAD)
        return remote.iterations


# ---------------------------------------------------------------- TLS


def test_tls_clients_need_the_ca_and_plaintext_clients_are_refused(pki):
    creds = server_credentials(TlsConfig(str(pki.server_cert), str(pki.server_key)))
    with running_server(credentials=creds) as (target, _):
        assert _round_trip(target, credentials=tls_channel_credentials(str(pki.ca))) == 1
        with pytest.raises(UnavailableError):
            _round_trip(target, timeout=2)  # plaintext against a TLS port
        with pytest.raises(UnavailableError):  # a server certificate from an untrusted CA
            _round_trip(target, credentials=tls_channel_credentials(str(pki.rogue_cert)))


def test_mutual_tls_accepts_only_client_certificates_signed_by_the_ca(pki):
    creds = server_credentials(TlsConfig(str(pki.server_cert), str(pki.server_key), str(pki.ca), True))
    with running_server(credentials=creds) as (target, _):
        good = tls_channel_credentials(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        assert _round_trip(target, credentials=good) == 1
        for creds_without_trust in (
            tls_channel_credentials(str(pki.ca)),  # no client certificate
            tls_channel_credentials(str(pki.ca), str(pki.rogue_cert), str(pki.rogue_key)),  # wrong CA
        ):
            with pytest.raises(UnavailableError):
                RemoteAdamax(target, name="m", timeout=2, retry=NO_RETRY, credentials=creds_without_trust)


def test_requiring_client_certificates_without_a_ca_refuses_to_start(pki, tmp_path):
    with pytest.raises(SecurityConfigError, match="no CA"):
        server_credentials(TlsConfig(str(pki.server_cert), str(pki.server_key), None, True))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        server_credentials(TlsConfig(str(tmp_path / "missing.pem"), str(pki.server_key)))
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "server"), str(REPO_ROOT / "client"), str(REPO_ROOT / "wire"), os.environ.get("PYTHONPATH", "")]), "ADAMAX_PS_TLS_CERT": str(pki.server_cert),
           "ADAMAX_PS_TLS_KEY": str(pki.server_key), "ADAMAX_PS_TLS_REQUIRE_CLIENT_CERT": "1"}
    proc = subprocess.run([sys.executable, "-m", "adamax_server.cli", "serve", "--port", "0", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no CA" in proc.stderr and "listening" not in proc.stdout


# ---------------------------------------------------------------- tokens


TOKENS = {"admin-token": [], "job-a-token": ["a", "a-eval"]}


class CountingCoordinator(Coordinator):
    """Counts calls that reach the domain layer (none may, without a valid token)."""

    def __init__(self, **kwargs):
        super().__init__(device="cpu", **kwargs)
        self.calls = 0

    def get(self, key):
        self.calls += 1
        return super().get(key)

    def create(self, key, config, policy, if_exists="resume"):
        self.calls += 1
        return super().create(key, config, policy, if_exists=if_exists)

    def hosts(self):
        self.calls += 1
        return super().hosts()


def _raw_call(channel, method, metadata=()):
    """Call any method with an empty request (whatever its kind); returns the status code."""
    desc = pb.DESCRIPTOR.services_by_name["AdamaxService"].methods_by_name[method]
    path = f"/{SERVICE_NAME}/{method}"
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
        (desc.client_streaming, desc.server_streaming)]
    call = kind(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    request = iter([b""]) if desc.client_streaming else b""
    try:
        result = call(request, timeout=5, metadata=metadata)
        if desc.server_streaming:
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_missing_or_wrong_tokens_are_unauthenticated_before_any_handler_runs():
    coordinator = CountingCoordinator()
    with running_server(coordinator=coordinator, tokens=TokenTable.from_tokens(TOKENS)) as (target, _):
        with grpc.insecure_channel(target) as channel:
            for method in pb.DESCRIPTOR.services_by_name["AdamaxService"].methods_by_name:
                for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "admin-token"),)):
                    assert _raw_call(channel, method, metadata) == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
            assert coordinator.calls == 0
            # health is open: load balancers and Docker's HEALTHCHECK carry no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(UnauthenticatedError):
            RemoteAdamax(target, name="m", timeout=5, retry=NO_RETRY)
        with pytest.raises(UnauthenticatedError, match="invalid bearer token"):
            RemoteAdamax(target, name="m", timeout=5, retry=NO_RETRY, token="nope")
        assert coordinator.calls == 0
        assert _round_trip(target, token="admin-token") == 1


def test_a_scoped_token_cannot_touch_another_optimizer():
    coordinator = CountingCoordinator()
    with running_server(coordinator=coordinator, tokens=TokenTable.from_tokens(TOKENS)) as (target, _):
        with RemoteAdamax(target, name="b", token="admin-token", timeout=5) as other:
            other.build(VARS)
            other.apply(GRAD)
        before = coordinator.get("b").status()
        # gRPC's scope check (a bulk connection is bound to one optimizer: test_bulk.py)
        with RemoteAdamax(target, name="a", token="job-a-token", timeout=5, bulk="off") as mine:
            mine.build(VARS)
            assert mine.apply(GRAD).version == 1
            # the same client object, aimed at the other job's optimizer
            mine.key = "b"
            calls = coordinator.calls
            for attempt in (lambda: mine.apply(GRAD), mine.pull, lambda: mine.iterations, mine.finalize_variable_values):
                with pytest.raises(PermissionDeniedError, match="limited to"):
                    attempt()
            assert coordinator.calls == calls  # refused before the servicer ran
        with pytest.raises(PermissionDeniedError):
            RemoteAdamax(target, name="b", token="job-a-token", timeout=5)
        after = coordinator.get("b").status()
        assert (after.version, after.iterations) == (before.version, before.iterations) == (1, 1)
        with grpc.insecure_channel(target) as channel:  # listing spans jobs: unscoped tokens only
            code = _raw_call(channel, "ListOptimizers", (("authorization", "Bearer job-a-token"),))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert _raw_call(channel, "ListOptimizers", (("authorization", "Bearer admin-token"),)) == grpc.StatusCode.OK


def test_token_check_compares_every_token_in_constant_time(monkeypatch):
    table = TokenTable.from_tokens({"t1": [], "t2": ["x"], "t3": []})
    seen = []
    compare = hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    for token in ("t1", "t3", "guess", "t1" * 1000):
        seen.clear()
        table.match(token)
        assert seen == [(32, 32)] * 3  # digests of equal length, every grant compared, no early exit
    assert table.match("t2").optimizers == frozenset({"x"}) and table.match("t4") is None


def test_token_file_format(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# tokens\nadmin\n\njob-token a b  # job a\n")
    table = TokenTable.from_file(path)
    assert not table.match("admin").scoped
    assert table.match("job-token").optimizers == {"a", "b"}
    path.write_text("# nothing\n")
    with pytest.raises(SecurityConfigError):
        TokenTable.from_file(path)


# ---------------------------------------------------------------- reflection and limits


def _reflection_services(target):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        return [s.name for r in replies for s in r.list_services_response.service]


def test_reflection_can_be_turned_off():
    with running_server() as (target, _):
        assert SERVICE_NAME in _reflection_services(target)
    with running_server(reflection=False) as (target, _):
        with pytest.raises(grpc.RpcError) as info:
            _reflection_services(target)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_limits_on_variables_and_bytes_per_optimizer_name_the_limit():
    limits = ResourceLimits(max_variables_per_optimizer=2, max_bytes_per_optimizer=1000)
    with running_server(limits=limits) as (target, coordinator):
        with RemoteAdamax(target, name="m", timeout=5) as remote:
            many = {f"v{i}": np.zeros(2, np.float32) for i in range(3)}
            with pytest.raises(ResourceExhaustedError, match="max_variables_per_optimizer=2"):
                remote.build(many)
            big = {"a": np.zeros(150, np.float32), "b": np.zeros(150, np.float32)}
            with pytest.raises(ResourceExhaustedError, match="max_bytes_per_optimizer=1000"):
                remote.build(big)
            assert not coordinator.get("m").status().built
            remote.build({"a": np.zeros(100, np.float32), "b": np.zeros(100, np.float32)})
            assert coordinator.get("m").status().built


def test_message_size_limit_is_resource_exhausted():
    with running_server(max_message_bytes=64 * 1024) as (target, _):
        with RemoteAdamax(target, name="m", timeout=5, chunk_bytes=1 << 20) as remote:
            with pytest.raises(ResourceExhaustedError, match="larger than max"):
                remote.build({"w": np.zeros(100_000, np.float32)})
        with RemoteAdamax(target, name="m", timeout=5, chunk_bytes=16 * 1024) as remote:
            remote.build({"w": np.zeros(100_000, np.float32)})  # the same tensor in smaller chunks


def test_concurrent_rpc_limit_is_resource_exhausted():
    with running_server(max_concurrent_rpcs=2) as (target, _):
        # the limit counts gRPC calls; bulk-channel connections have their own cap
        remote = RemoteAdamax(target, name="m", mode="sync", num_workers=2, timeout=5, bulk="off")
        remote.build(VARS)
        remote.apply(GRAD)  # the round stays open: pulls wait
        waiters = [threading.Thread(target=_ignore, args=(lambda: remote.pull(timeout=2),)) for _ in range(2)]
        for t in waiters:
            t.start()
        time.sleep(0.5)
        with pytest.raises(ResourceExhaustedError, match="Concurrent RPC limit"):
            remote.status()
        for t in waiters:
            t.join(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # served again once the server has let the waiters go
            try:
                assert remote.status()["round_arrivals"] == [remote.worker_id]
                break
            except ResourceExhaustedError:
                time.sleep(0.05)
        else:
            pytest.fail("the server did not serve again after the waiting calls ended")
        remote.close()


def _ignore(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - the waiters time out by design
        pass
