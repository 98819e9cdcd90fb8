"""Throw-away PKI for the TLS tests, made with the ``openssl`` command at test time.

A CA, a server certificate for ``localhost`` / ``127.0.0.1``, a client certificate signed by
the CA, and a client certificate from a second (untrusted) CA. EC P-256 keys: fast to make.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=cwd)


def _ca(name: str, cwd: Path) -> None:
    _key(name, cwd)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-out", f"{name}.pem", cwd=cwd)


def _leaf(name: str, ca: str, cwd: Path, *, san: str) -> None:
    _key(name, cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd)


def make_pki(directory: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", directory)
    _ca("rogue-ca", directory)
    _leaf("server", "ca", directory, san="DNS:localhost,IP:127.0.0.1")
    _leaf("client", "ca", directory, san="DNS:worker")
    _leaf("rogue", "rogue-ca", directory, san="DNS:worker")
    d = directory
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")


def make_pki_with_second_identity(directory: Path) -> Pki:
    """``make_pki`` plus ``other.pem``/``other.key``: another client identity from the same CA
    (a ticket issued to ``client`` must not open a connection presenting ``other``)."""
    made = make_pki(directory)
    _leaf("other", "ca", directory, san="DNS:other-worker")
    return made


def client_credentials(pki: Pki, name: str = "client"):
    """``adamax_client`` TLS credentials presenting the client certificate ``name`` of ``pki``."""
    from adamax_client import tls_channel_credentials

    d = pki.ca.parent
    return tls_channel_credentials(str(pki.ca), str(d / f"{name}.pem"), str(d / f"{name}.key"))


def tls_connect(port: int, pki: Pki, name: str):
    """A TLS socket to ``127.0.0.1:port`` presenting the client certificate ``name`` of ``pki``."""
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client_credentials(pki, name).ssl_context().wrap_socket(raw, server_hostname="localhost")
