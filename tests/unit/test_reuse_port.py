"""``GatedAssociationServer(reuse_port=True)``: several gateway processes listen on one port.

Real sockets: the second listener on a port binds only when both set SO_REUSEPORT, as the
gateway process and its receivers do with ``gateway_processes`` > 1 (``gateway_setup.py``).
"""

from __future__ import annotations

import errno
import socket

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_gateway.connections import GatedAssociationServer, PendingGate, PendingLimits

LIMITS = PendingLimits(request_timeout_s=5.0, max_pending=4, max_pending_per_address=4, read_timeout_s=5.0)


def _server(port: int, reuse_port: bool) -> GatedAssociationServer:
    ae = AE(ae_title="XRAY_TRIAGE")
    ae.add_supported_context(Verification)
    return ae.make_server(
        ("127.0.0.1", port),
        server_class=GatedAssociationServer,
        gate=PendingGate(LIMITS),
        reuse_port=reuse_port,
    )


def test_two_listeners_share_a_port_with_reuse_port() -> None:
    first = _server(0, reuse_port=True)
    try:
        port = first.server_address[1]
        second = _server(port, reuse_port=True)
        try:
            assert second.server_address[1] == port
            assert second.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        finally:
            second.server_close()
    finally:
        first.server_close()


def test_without_reuse_port_the_port_stays_exclusive() -> None:
    first = _server(0, reuse_port=False)
    try:
        assert first.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with pytest.raises(OSError) as caught:
            _server(first.server_address[1], reuse_port=True)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        first.server_close()
