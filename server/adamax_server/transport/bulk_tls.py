"""TLS on the bulk channel's server side: the handshake of an accepted connection and the binding
of a ticket to the client certificate that asked for it over gRPC (see ``bulk.py``)."""

from __future__ import annotations

import socket
import ssl

from adamax_server.errors import PermissionDenied
from adamax_server.transport.security import certificate_identities


def tls_accept(context: ssl.SSLContext, raw: socket.socket) -> ssl.SSLSocket:
    """Wrap an accepted connection in TLS; the handshake is bounded by ``raw``'s timeout. A
    plaintext or untrusted peer fails it (``ssl.SSLError``, an ``OSError``): nothing to answer."""
    return context.wrap_socket(raw, server_side=True)


def check_identity(ticket_identities: frozenset[str], sock: socket.socket) -> None:
    """A ticket issued to an mTLS-authenticated caller is only redeemed by a connection that
    presents a certificate with one of that caller's identities (PERMISSION_DENIED otherwise)."""
    if not ticket_identities:
        return
    presented = certificate_identities(sock.getpeercert()) if isinstance(sock, ssl.SSLSocket) else frozenset()
    if not ticket_identities & presented:
        raise PermissionDenied(
            "this bulk-channel ticket was issued to another client certificate; connect with the "
            "certificate used on the gRPC channel"
        )
