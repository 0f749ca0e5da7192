"""Who may talk to the DICOM listener: client IP networks and DICOM TLS.

``GuardedAssociationServer`` is pynetdicom's threaded association server with two gates in front
of the association:

- ``allowed_networks``: a connection from an address outside them is closed by the server before
  a single byte is read (socketserver's ``verify_request``). pynetdicom has no public hook that
  would answer it with an A-ASSOCIATE-RJ (its ACSE checks only the AE titles, the user identity
  and the association count), so the requestor sees its connection closed, as dcmtk's
  ``dcmqrscp`` does for unknown peers. The refused connection never becomes an association, so
  it takes no ``maximum_associations`` slot.
- TLS: the handshake runs in the connection's own thread with ``acse_timeout_seconds`` as its
  time limit (pynetdicom's own ``ssl_context`` handshakes in the accept loop, where one silent
  client would stall every other). A failed handshake (a plain-TCP client, no or an untrusted
  client certificate when one is required) closes the connection.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.settings import Settings

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TLSConfigError(ValueError):
    """The TLS files in the configuration cannot be loaded."""


def address_allowed(host: str, networks: Sequence[Network]) -> bool:
    """Whether ``host`` (an IP address, v4, v6 or v4-mapped v6) lies in one of ``networks``.

    No networks means any address. A host that is not an IP address is refused.
    """
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(
        candidate.version == network.version and candidate in network
        for candidate in candidates
        for network in networks
    )


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context from the settings; ``None`` when TLS is off."""
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
        if settings.tls_ca_certificates is not None:
            context.load_verify_locations(cafile=settings.tls_ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the DICOM TLS files: {exc}") from exc
    if settings.tls_require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif settings.tls_ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_ssl_context(
    ca_certificates: Path | str | None,
    certificate: Path | str | None = None,
    private_key: Path | str | None = None,
) -> ssl.SSLContext:
    """A TLS context for our side as requestor: verify the peer (certificate chain and host name)
    against ``ca_certificates`` (else the system's CAs), present ``certificate`` when given.

    Raises ``OSError`` (``ssl.SSLError`` included) when a file cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate is not None:
        context.load_cert_chain(certificate, private_key)
    return context


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with an IP allow-list and a per-connection TLS handshake."""

    def __init__(
        self,
        *args: Any,
        allowed_networks: Sequence[Network] = (),
        tls_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        self.allowed_networks = list(allowed_networks)
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> bool:
        host = _host(client_address)
        if address_allowed(host, self.allowed_networks):
            return True
        log.warning("connection from %s refused: not in allowed_networks", host)
        return False

    def finish_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if self.tls_context is not None and isinstance(request, socket.socket):
            request.settimeout(self.handshake_timeout)
            try:
                # the handshake happens here, in this connection's thread; on failure the
                # SSLSocket closes the connection (it owns the descriptor)
                request = self.tls_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning(
                    "TLS handshake with %s failed, connection closed: %s",
                    _host(client_address),
                    exc,
                )
                return
            request.settimeout(None)
        super().finish_request(request, client_address)


def _host(client_address: Any) -> str:
    if isinstance(client_address, tuple) and client_address:
        return str(client_address[0])
    return str(client_address)
