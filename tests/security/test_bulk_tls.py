"""The bulk channel over TLS: same certificates, client-certificate rules, tokens and tickets as
the gRPC port, identical results, and no plaintext path next to a TLS server."""

from __future__ import annotations

import socket
import ssl

import grpc
import numpy as np
import pytest

from _certs import client_credentials, make_pki_with_second_identity, tls_connect
from _ps_helpers import assert_bitwise_equal, running_server

from adamax_client import RemoteAdamax, tls_channel_credentials
from adamax_client.transport import Transport
from adamax_wire import bulk_frames as _bulk
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server.transport.security import (
    SecurityConfigError,
    TlsConfig,
    TokenTable,
    bulk_server_context,
    certificate_identities,
    server_credentials,
)

N = 50_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki_with_second_identity(tmp_path_factory.mktemp("pki"))


def _tls_server(pki, *, mutual: bool, **kwargs):
    config = TlsConfig(str(pki.server_cert), str(pki.server_key), str(pki.ca) if mutual else None, mutual)
    return running_server(credentials=server_credentials(config), bulk_tls=bulk_server_context(config), **kwargs)


def _train(target, bulk, credentials, steps=3, **kwargs):
    rng = np.random.default_rng(0)
    with RemoteAdamax(target, optimizer=f"job-{bulk}", worker_id="w0", learning_rate=0.01, bulk=bulk,
                      credentials=credentials, timeout=20, **kwargs) as opt:
        opt.build({"a": np.linspace(-1, 1, N, dtype=np.float32), "b": np.ones(7, np.float32)})
        for _ in range(steps):
            opt.push([rng.standard_normal(N).astype(np.float32), rng.standard_normal(7).astype(np.float32)])
            weights = opt.pull()
        return opt.transfer_path, weights


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_bulk_gives_the_same_weights_as_grpc(pki, mutual):
    creds = client_credentials(pki) if mutual else tls_channel_credentials(str(pki.ca))
    with _tls_server(pki, mutual=mutual) as (target, _):
        via_grpc = _train(target, "off", creds)
        via_tcp = _train(target, "tcp", creds)
        via_auto = _train(target, "auto", creds)
    assert via_grpc[0] == "grpc" and via_tcp[0] == "tcp" and via_auto[0] == "shm"
    assert sorted(via_grpc[1]) == sorted(via_tcp[1]) == sorted(via_auto[1]) == ["a", "b"]
    for name, expected in via_grpc[1].items():  # the pulled weights, by name
        assert_bitwise_equal(expected, via_tcp[1][name])
        assert_bitwise_equal(expected, via_auto[1][name])


def test_tls_bulk_with_tokens(pki):
    tokens = TokenTable.from_tokens({"job-token": ["job-tcp"]})
    with _tls_server(pki, mutual=False, tokens=tokens) as (target, _):
        path, _ = _train(target, "tcp", tls_channel_credentials(str(pki.ca)), token="job-token")
        assert path == "tcp"


def _ticket(target, credentials):
    transport = Transport(target, credentials=credentials,
                          channel_options=[("grpc.ssl_target_name_override", "localhost")])
    try:
        RemoteAdamax(target, optimizer="raw", worker_id="w0", credentials=credentials, bulk="off",
                     timeout=10).build({"a": np.zeros(10, np.float32)})
        return transport.unary("OpenBulkChannel", pb.OpenBulkChannelRequest(optimizer="raw", worker_id="w0"))
    finally:
        transport.close()


def test_a_ticket_is_bound_to_the_client_certificate_that_asked_for_it(pki):
    with _tls_server(pki, mutual=True) as (target, _):
        response = _ticket(target, client_credentials(pki))
        sock = tls_connect(response.port, pki, "other")  # same CA, another identity
        with sock:
            _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=response.ticket)))
            reply = _bulk.recv_frame(sock)
        assert reply.status.code == "PERMISSION_DENIED" and "certificate" in reply.status.message
        response = _ticket(target, client_credentials(pki))
        with tls_connect(response.port, pki, "client") as sock:
            _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=response.ticket)))
            assert _bulk.recv_frame(sock).status.code == "OK"


def test_untrusted_and_plaintext_peers_cannot_use_the_tls_bulk_port(pki):
    with _tls_server(pki, mutual=True) as (target, _):
        response = _ticket(target, client_credentials(pki))
        with pytest.raises((ssl.SSLError, ConnectionError)):  # certificate from another CA
            sock = tls_connect(response.port, pki, "rogue")
            _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=response.ticket)))
            _bulk.recv_frame(sock)
        plain = socket.create_connection(("127.0.0.1", response.port), timeout=10)
        with plain:  # a plaintext hello is not TLS: the server drops the connection, unanswered
            _bulk.send_frame(plain, pb.BulkFrame(hello=pb.BulkHello(ticket=response.ticket)))
            with pytest.raises((ConnectionError, _bulk.BulkClosed, OSError)):
                _bulk.recv_frame(plain)


def test_plain_grpc_credentials_fall_back_to_grpc_streams(pki):
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with _tls_server(pki, mutual=False) as (target, _):
        path, _ = _train(target, "auto", creds, steps=1)
    assert path == "grpc"


def test_server_configuration_rules(pki):
    config = TlsConfig(str(pki.server_cert), str(pki.server_key))
    with pytest.raises(SecurityConfigError, match="needs TLS"):
        with running_server(bulk_tls=bulk_server_context(config)):
            pass
    with _tls_server(pki, mutual=False, bulk=False) as (target, _):  # --no-bulk still works
        assert _train(target, "auto", tls_channel_credentials(str(pki.ca)), steps=1)[0] == "grpc"


def test_certificate_identities_follow_grpc():
    assert certificate_identities({"subjectAltName": (("DNS", "w"), ("IP Address", "10.0.0.1"))}) == {"w", "10.0.0.1"}
    assert certificate_identities({"subject": ((("commonName", "cn-only"),),)}) == {"cn-only"}
    assert certificate_identities(None) == frozenset()
