"""A sharded job over TLS: every shard's gRPC port and bulk channel are TLS (mutual TLS too), the
weights equal the gRPC path's bit for bit, a shard's bulk ticket is bound to the client
certificate that asked for it, and a plaintext bulk port next to a TLS shard is refused."""

from __future__ import annotations


import grpc
import numpy as np
import pytest

from _certs import client_credentials, make_pki_with_second_identity, tls_connect
from _ps_helpers import assert_bitwise_equal
from _sharding_helpers import start_shard_servers, stop_shard_servers

from adamax_client import RemoteAdamax, tls_channel_credentials
from adamax_wire import bulk_frames as _bulk
from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server.sharding.server import create_shard_server
from adamax_server.transport.security import SecurityConfigError, TlsConfig, bulk_server_context, server_credentials

ROWS = 3000  # split over both shards (min_piece 2048 bytes)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki_with_second_identity(tmp_path_factory.mktemp("pki"))


def _tls_shards(pki, *, mutual: bool):
    config = TlsConfig(str(pki.server_cert), str(pki.server_key), str(pki.ca) if mutual else None, mutual)
    link = grpc.ssl_channel_credentials(  # the leader's calls to the other shards: the shard's own certificate
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.server_key.read_bytes() if mutual else None,
        certificate_chain=pki.server_cert.read_bytes() if mutual else None,
    )
    return start_shard_servers(2, min_piece=2048, credentials=server_credentials(config),
                               bulk_tls=bulk_server_context(config), link_credentials=link)  # fmt: skip


def _train(targets, bulk, credentials, steps=3):
    rng = np.random.default_rng(0)
    with RemoteAdamax(targets, optimizer=f"job-{bulk}", worker_id="w0", learning_rate=0.01, bulk=bulk,
                      credentials=credentials, timeout=20) as opt:  # fmt: skip
        opt.build({"a": np.linspace(-1, 1, ROWS * 4, dtype=np.float32).reshape(ROWS, 4), "b": np.ones(7, np.float32)})
        for _ in range(steps):
            opt.push([rng.standard_normal((ROWS, 4)).astype(np.float32), rng.standard_normal(7).astype(np.float32)])
            weights = opt.pull()
        return opt.transfer_path, weights


@pytest.mark.parametrize("mutual", [False, True])
def test_sharded_tls_bulk_gives_the_same_weights_as_grpc(pki, mutual):
    creds = client_credentials(pki) if mutual else tls_channel_credentials(str(pki.ca))
    servers, targets = _tls_shards(pki, mutual=mutual)
    try:
        assert all(s.bulk is not None and s.bulk.tls is not None for s in servers)
        via_grpc = _train(targets, "off", creds)
        via_tcp = _train(targets, "tcp", creds)
        via_auto = _train(targets, "auto", creds)  # same host: shared memory (its bytes never leave the host)
    finally:
        stop_shard_servers(servers)
    assert (via_grpc[0], via_tcp[0], via_auto[0]) == ("grpc", "tcp", "shm")
    assert sorted(via_grpc[1]) == sorted(via_tcp[1]) == sorted(via_auto[1]) == ["a", "b"]
    for name, expected in via_grpc[1].items():  # the pulled weights, by name
        assert_bitwise_equal(expected, via_tcp[1][name])
        assert_bitwise_equal(expected, via_auto[1][name])


def test_a_shard_ticket_is_bound_to_the_client_certificate_that_asked_for_it(pki):
    servers, targets = _tls_shards(pki, mutual=True)
    try:
        with RemoteAdamax(targets, optimizer="raw", worker_id="w0", credentials=client_credentials(pki), bulk="off",
                          timeout=10) as opt:  # fmt: skip
            opt.build({"a": np.zeros((ROWS, 4), np.float32)})
            for shard in (0, 1):
                got = opt._one(shard, "open_bulk", "w0")
                with tls_connect(int(got["port"]), pki, "other") as sock:  # same CA, another identity
                    _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=bytes.fromhex(got["ticket"]))))
                    reply = _bulk.recv_frame(sock)
                assert reply.status.code == "PERMISSION_DENIED" and "certificate" in reply.status.message
                got = opt._one(shard, "open_bulk", "w0")
                with tls_connect(int(got["port"]), pki, "client") as sock:
                    _bulk.send_frame(sock, pb.BulkFrame(hello=pb.BulkHello(ticket=bytes.fromhex(got["ticket"]))))
                    assert _bulk.recv_frame(sock).status.code == "OK"
    finally:
        stop_shard_servers(servers)


def test_shard_server_configuration_rules(pki):
    config = TlsConfig(str(pki.server_cert), str(pki.server_key))
    with pytest.raises(SecurityConfigError, match="needs TLS"):
        create_shard_server("127.0.0.1:0", 0, ["127.0.0.1:1"], bulk_tls=bulk_server_context(config), warm=False)
    with pytest.raises(SecurityConfigError, match="plaintext bulk port"):
        create_shard_server("127.0.0.1:0", 0, ["127.0.0.1:1"], credentials=server_credentials(config), bulk=True,
                            warm=False)  # fmt: skip
    server, _ = create_shard_server("127.0.0.1:0", 0, ["127.0.0.1:1"], credentials=server_credentials(config),
                                    warm=False)  # fmt: skip
    try:  # TLS without a bulk context: no bulk channel (gRPC only), as on a single server
        assert server.bulk is None
    finally:
        server.shard_registry.close()
        server.stop(0).wait()


def test_serve_shards_with_mutual_tls_from_the_command_line(pki, tmp_path):
    """``serve --shards ... --tls-cert --tls-key --tls-ca --tls-require-client-cert``: the shards
    reach each other under mutual TLS (with their own certificate) and offer TLS bulk channels."""
    import subprocess
    import sys

    from _sharding_helpers import free_ports, shard_process_env

    shards = [f"127.0.0.1:{p}" for p in free_ports(2)]
    env = shard_process_env()
    procs = []
    try:
        for i in range(2):
            cmd = [sys.executable, "-m", "adamax_server.cli", "serve", "--port", shards[i].split(":")[1], "--device", "cpu",
                   "--shard-index", str(i), "--shards", ",".join(shards), "--tls-cert", str(pki.server_cert),
                   "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca), "--tls-require-client-cert", "--grace", "0"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        for p in procs:
            line = p.stdout.readline()
            assert line.startswith("listening on"), (line, p.stderr.read() if p.poll() is not None else "")
        path, weights = _train(shards, "tcp", client_credentials(pki))
        assert path == "tcp" and weights["a"].shape == (ROWS, 4)
        assert _train(shards, "off", client_credentials(pki))[1]["a"].tobytes() == weights["a"].tobytes()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate(timeout=5)
