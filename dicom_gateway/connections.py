"""TCP connections before they become associations: the pending gate and the server that uses it.

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` turns every
accepted TCP connection into an Association thread at once, which then waits up
to ``acse_timeout`` for an A-ASSOCIATE-RQ and counts against
``maximum_associations`` the whole time, even after the peer has closed. A port
scan, a flood of garbage or of idle connections, or a client that trickles its
request byte by byte therefore shuts every station out.

Here a connection first waits in the :class:`PendingGate`, in its own
socketserver thread but with no Association yet:

* it is handed to pynetdicom only once a complete A-ASSOCIATE-RQ PDU is buffered
  in the kernel (looked at with ``MSG_PEEK``: only the 6-byte PDU header, type
  and length, PS3.8 9.3.1, is read here; pynetdicom decodes the PDU itself);
* it is closed as soon as the peer closes, sends something that is not an
  A-ASSOCIATE-RQ, or has not completed one within ``request_timeout_s``;
* at most ``max_pending`` connections wait, ``max_pending_per_address`` from one
  IP address; a newcomer beyond that pushes out the *oldest* waiting connection,
  so a flood of idle connections cannot keep out a station, which sends its
  request within milliseconds of connecting.

Every connection handed over gets a socket timeout (``read_timeout_s``, the
gateway's network timeout; pynetdicom sets none on accepted sockets), so a
stalled read ends instead of blocking an Association thread for ever.

On the DICOM TLS port (``GatedAssociationServer(tls_context=...)``) the TLS
handshake runs first, non-blocking, in the same waiting room and under the same
deadline (:meth:`PendingGate.tls_handshake`); the encrypted A-ASSOCIATE-RQ cannot
be peeked at, so the connection is handed over once its first encrypted bytes
arrive and the gateway's reaper bounds the rest.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ_TYPE = 0x01  # PS3.8 9.3.2
PDU_HEADER_BYTES = 6  # PDU-type, reserved, 4-byte big-endian PDU-length (PS3.8 9.3.1)
# A request longer than this is handed over once this much has arrived (pynetdicom
# reads the rest under the socket timeout); real ones are a few KB to ~20 KB.
PEEK_LIMIT = 64 * 1024
PARTIAL_POLL_S = 0.01  # first look again at a partly received request after this...
PARTIAL_POLL_MAX_S = 0.2  # ... then less often, up to this
LOG_INTERVAL_S = 1.0  # each kind of dropped connection is logged at most this often


@dataclass(frozen=True)
class PendingLimits:
    request_timeout_s: float  # complete A-ASSOCIATE-RQ within this, or closed
    max_pending: int  # connections waiting for their request, all addresses
    max_pending_per_address: int  # ... from one IP address
    read_timeout_s: float | None  # socket timeout once handed to pynetdicom


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: str
    accepted_at: float
    deadline: float
    evicted: bool = False


@dataclass
class GateStats:
    """Counters for logs and tests: why pending connections ended."""

    handed_over: int = 0
    closed_by_peer: int = 0
    not_a_request: int = 0
    timed_out: int = 0
    evicted: int = 0
    refused_stopping: int = 0
    tls_failed: int = 0  # TLS handshake failed (no or untrusted client certificate, not TLS at all)


class PendingGate:
    """Connections that have not yet sent a complete A-ASSOCIATE-RQ."""

    def __init__(self, limits: PendingLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.stats = GateStats()
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []  # oldest first
        self._stopping = False
        self._last_log: dict[str, float] = {}

    def register(self, sock: socket.socket, address: str) -> _Pending | None:
        """Admit a just-accepted connection to the waiting room, evicting the oldest if full.

        Returns None when the gateway is stopping (the caller closes the socket).
        """
        now = self.clock()
        entry = _Pending(sock, address, now, now + self.limits.request_timeout_s)
        victims: list[_Pending] = []
        with self._lock:
            if self._stopping:
                self.stats.refused_stopping += 1
                return None
            same = [p for p in self._pending if p.address == address]
            if len(same) >= self.limits.max_pending_per_address:
                victims.append(same[0])
            elif len(self._pending) >= self.limits.max_pending:
                victims.append(self._pending[0])
            for victim in victims:
                self._pending.remove(victim)
                victim.evicted = True
                self.stats.evicted += 1
            self._pending.append(entry)
        for victim in victims:
            _shutdown(victim.sock)
        if victims:
            self._log(
                "evicted",
                "too many connections without an association request: dropped the oldest",
                {"peer": victims[0].address},
            )
        return entry

    def wait_for_request(self, entry: _Pending) -> bool:
        """Block (in the connection's own thread) until a complete A-ASSOCIATE-RQ is buffered.

        True: hand the connection to pynetdicom. False: close it (the reason is counted
        and logged).
        """
        outcome = self._wait(entry)
        with self._lock:
            if entry.evicted:  # evicted (or stopping) while the request completed: its socket is shut
                outcome = "evicted"
            if entry in self._pending:
                self._pending.remove(entry)
            counter = {
                "request": "handed_over",
                "closed": "closed_by_peer",
                "invalid": "not_a_request",
                "timeout": "timed_out",
                "evicted": "evicted",
            }[outcome]
            if outcome != "evicted":  # counted when evicted
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if outcome == "timeout":
            self._log(
                "timed_out",
                "connection dropped: no complete A-ASSOCIATE-RQ in time",
                {"peer": entry.address, "timeout_s": self.limits.request_timeout_s},
            )
        elif outcome == "invalid":
            self._log(
                "not_a_request",
                "connection dropped: first PDU is not an A-ASSOCIATE-RQ",
                {"peer": entry.address},
            )
        elif outcome == "closed":
            self._log(
                "closed_by_peer",
                "connection closed by the peer before an association request",
                {"peer": entry.address},
                logging.INFO,
            )
        return outcome == "request"

    def tls_handshake(self, entry: _Pending, context: ssl.SSLContext) -> ssl.SSLSocket | None:
        """Run the server side of a TLS handshake within the entry's deadline (DICOM TLS port).

        Non-blocking, so a peer that trickles its handshake byte by byte is cut at the
        same ``request_timeout_s`` (counted from accept) as one that trickles an
        A-ASSOCIATE-RQ, and an evicted entry ends at once. Returns the TLS socket (the
        entry now holds it), or None: the connection is closed and the reason counted.
        """
        try:
            entry.sock.setblocking(False)
            tls = context.wrap_socket(entry.sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            _close(entry.sock)
            return self._handshake_failed(entry, "closed")
        with self._lock:
            entry.sock = tls  # an eviction from now on shuts the TLS socket down
        outcome = "timeout"
        why = ""
        while not entry.evicted:
            remaining = entry.deadline - self.clock()
            if remaining <= 0:
                break
            wait_s = min(remaining, 0.5)
            try:
                tls.do_handshake()
                outcome = "done"
                break
            except ssl.SSLWantReadError:
                select.select([tls], [], [], wait_s)
            except ssl.SSLWantWriteError:
                select.select([], [tls], [], wait_s)
            except ssl.SSLError as exc:
                outcome = "tls"
                why = exc.reason or str(exc)
                break
            except OSError:
                outcome = "closed"
                break
        if outcome == "done" and not entry.evicted:
            tls.setblocking(True)
            return tls
        _close(tls)
        return self._handshake_failed(entry, "evicted" if entry.evicted else outcome, why)

    def _handshake_failed(self, entry: _Pending, outcome: str, why: str = "") -> None:
        with self._lock:
            if entry in self._pending:
                self._pending.remove(entry)
            counter = {"closed": "closed_by_peer", "timeout": "timed_out", "tls": "tls_failed"}.get(outcome)
            if counter is not None:
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if outcome == "timeout":
            self._log(
                "timed_out",
                "connection dropped: TLS handshake not completed in time",
                {"peer": entry.address, "timeout_s": self.limits.request_timeout_s},
            )
        elif outcome == "tls":
            # No or untrusted client certificate, or not TLS at all (plain DICOM on the TLS port).
            self._log(
                "tls_failed", "TLS handshake failed: connection closed", {"peer": entry.address, "why": why}
            )
        return None

    def _log(self, kind: str, message: str, extra: dict[str, object], level: int = logging.WARNING) -> None:
        """Log one kind of drop at most once per LOG_INTERVAL_S (a flood must not flood the
        log), with the running count of that kind."""
        now = self.clock()
        with self._lock:
            if now - self._last_log.get(kind, float("-inf")) < LOG_INTERVAL_S:
                return
            self._last_log[kind] = now
            count = getattr(self.stats, kind)
        log.log(level, message, extra={**extra, "count_so_far": count})

    def _wait(self, entry: _Pending) -> str:
        poller = select.poll()
        poller.register(entry.sock, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
        hangup = select.poll()
        hangup.register(entry.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        partial_wait_s = PARTIAL_POLL_S
        while True:
            if entry.evicted:
                return "evicted"
            remaining = entry.deadline - self.clock()
            if remaining <= 0:
                return "timeout"
            if isinstance(entry.sock, ssl.SSLSocket) and entry.sock.pending():
                return "request"
            if not poller.poll(max(1, int(min(remaining, 0.5) * 1000))):
                continue
            if isinstance(entry.sock, ssl.SSLSocket):
                # Encrypted: the PDU header cannot be peeked at without consuming it. The
                # first bytes after the handshake go to pynetdicom, which rejects anything
                # but an A-ASSOCIATE-RQ; the gateway's reaper cuts one not completed within
                # association_request_timeout_s.
                return "request"
            try:
                data = entry.sock.recv(PEEK_LIMIT, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return "closed"
            if entry.evicted:
                return "evicted"
            if not data:
                return "closed"
            if data[0] != A_ASSOCIATE_RQ_TYPE:
                return "invalid"
            if len(data) >= PDU_HEADER_BYTES:
                wanted = PDU_HEADER_BYTES + int.from_bytes(data[2:6], "big")
                if len(data) >= min(wanted, PEEK_LIMIT):
                    return "request"
            # Part of the request is there. The socket stays readable while the bytes sit
            # unread, so wait for the peer hanging up (POLLRDHUP) or look again shortly,
            # less often the longer it trickles.
            if hangup.poll(int(partial_wait_s * 1000)):
                return "closed"
            partial_wait_s = min(partial_wait_s * 2, PARTIAL_POLL_MAX_S)

    def stop(self) -> int:
        """Refuse new connections and close every waiting one; returns how many were closed."""
        with self._lock:
            self._stopping = True
            waiting, self._pending = self._pending, []
            for entry in waiting:
                entry.evicted = True
        for entry in waiting:
            _shutdown(entry.sock)
        return len(waiting)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the :class:`PendingGate` in front of each association.

    Uses socketserver's documented hooks: ``verify_request`` (accept thread) puts
    the connection in the gate, ``process_request_thread`` (the connection's
    thread) waits there before pynetdicom's own request handler runs.
    """

    request_queue_size = 128  # listen backlog: a burst of connects must not drop a station's SYN
    block_on_close = False  # server_close must not wait for connection threads; stop() ends them
    daemon_threads = True

    def __init__(
        self,
        *args: object,
        gate: PendingGate,
        tls_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        **kwargs: object,
    ) -> None:
        """``reuse_port``: bind with ``SO_REUSEPORT``, so that several gateway processes listen on
        one port and the kernel spreads incoming connections over them (``gateway_processes``)."""
        self.gate = gate
        self.allow_reuse_port = reuse_port  # socketserver's attribute; pynetdicom's server_bind ignores it
        # DICOM TLS: our own context, not pynetdicom's ssl_context, whose get_request
        # would run each handshake in the accept loop, where one slow client stalls all.
        self.tls_context = tls_context
        self._entries: dict[int, _Pending] = {}
        self._entries_lock = threading.Lock()
        # ``handoff(sock, address) -> bool``: offered each plain connection once its A-ASSOCIATE-RQ
        # has arrived; True = another process took it (this one only closes its copy).
        self.handoff: Callable[[socket.socket, tuple[str, int]], bool] | None = None
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def adopt(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        """Serve a connection accepted by another process (handed over with ``SCM_RIGHTS``) as if
        this server had accepted it: the same gate, limits and association handling
        (socketserver's own ``verify_request`` / ``process_request`` sequence)."""
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
        else:
            self.shutdown_request(request)

    def server_bind(self) -> None:
        if self.allow_reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request: socket.socket, client_address: tuple[str, int]) -> bool:  # type: ignore[override]
        entry = self.gate.register(request, str(client_address[0]))
        if entry is None:
            return False
        with self._entries_lock:
            self._entries[id(request)] = entry
        return True

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        with self._entries_lock:
            entry = self._entries.pop(id(request), None)
        try:
            if entry is not None and self.tls_context is not None:
                tls = self.gate.tls_handshake(entry, self.tls_context)
                if tls is None:
                    return  # closed by the gate
                request = tls
            if entry is None or not self.gate.wait_for_request(entry):
                self.shutdown_request(request)
                return
            request.settimeout(self.gate.limits.read_timeout_s)
        except Exception:
            log.exception("error while waiting for an association request", extra={"peer": client_address[0]})
            self.shutdown_request(request)
            return
        if self.handoff is not None and self.tls_context is None and self._handed_off(request, client_address):
            return
        super().process_request_thread(request, client_address)

    def _handed_off(self, request: socket.socket, client_address: tuple[str, int]) -> bool:
        """Offer the connection to ``handoff``; when taken, close this process's copy only (no
        ``shutdown``: that would end the connection for the process that took it)."""
        try:
            taken = self.handoff is not None and self.handoff(request, client_address)
        except Exception:
            log.exception("connection hand-off failed: served here", extra={"peer": client_address[0]})
            return False
        if taken:
            request.close()
        return taken

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (pynetdicom's own ``shutdown``
        also unregisters from ``ae._servers``, where this server, started with
        ``make_server``, never was)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _shutdown(sock: socket.socket) -> None:
    """Shut a socket down from another thread: its reader sees end-of-file."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def force_close(sock: socket.socket | None) -> None:
    """Shut down a connection pynetdicom is blocked reading from (None: already closed)."""
    if sock is not None:
        _shutdown(sock)
