"""A receiver process: one more interpreter receiving DICOM on the gateway's port(s) (``gateway_processes``).

One Python process receives about 80 small images a second however many stations send at once:
pynetdicom's threads, pydicom and SQLAlchemy share one interpreter lock (issue 17). With
``gateway_processes = N`` the gateway process (``serve.py``) starts N - 1 of these with
``xray-triage serve --roles receiver`` (:mod:`xray_triage_server.receiver_pool`); each binds the
same TLS port with ``SO_REUSEPORT`` (Linux spreads TLS connections over all N by a hash of their
addresses), and is handed plain connections by the gateway process in turn (round robin over the
N processes, after the connection's A-ASSOCIATE-RQ has arrived), over a Unix socket with
``SCM_RIGHTS`` (``--handoff-fd``): a hash spreads a few long associations unevenly (4 stations
on 2 processes split 2-2 only 3 times in 8), a turn does not.

A receiver runs only the DICOM side: its own ``Database``, ``StorageGuard``, ``Ingestor`` and
``DicomGateway`` (C-ECHO, C-STORE, Q/R if configured). No triage workers, delivery senders,
result-object consumer or web app: those run in the gateway process, which learns of what a
receiver committed through the events pipe (``xray_triage.events.EventRelay``), so its triage
workers start at once and its metrics count every process's images.

Talking to the gateway process, which starts it:

* stdin: the first line is the settings, as JSON (``Settings.model_dump``, with the ports the
  gateway process actually bound); after it stdin stays open and reaches end-of-file only when
  the gateway process has gone (however it ended, kill -9 included): the receiver then stops;
* ``--handoff-fd``: a ``SOCK_SEQPACKET`` Unix socket on which the gateway process sends plain
  connections (one file descriptor per message); its end-of-file also means the gateway
  process has gone;
* ``--events-fd``: the write end of the events pipe: one JSON line per committed event, and
  :func:`listening_line` once the listeners are bound;
* SIGTERM: stop (in-flight associations get ``shutdown_grace_s``), exit 0. SIGINT is ignored:
  Ctrl-C reaches the whole process group, and the gateway process stops its receivers itself.

It takes its own data-directory lock (``store/data_dir_lock.py``) and never runs the start-up
clean-up of leftovers: the gateway process does that before it starts any receiver, and any
process that runs it later sees the receivers' locks and removes only old files.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from dataclasses import replace

from dicom_gateway.scp import DicomGateway
from xray_triage.events import Event, EventRelay
from xray_triage.settings import Settings
from xray_triage.store.data_dir_lock import DataDirLock
from xray_triage.store.db import Database
from xray_triage.store.diskspace import StorageGuard
from xray_triage_server import gateway_setup
from xray_triage_server.gateway_setup import gateway_config, query_retrieve

log = logging.getLogger(__name__)

ROLE = "receiver"  # `serve --roles receiver`: never combined with other roles, never set in a config file


def listening_line(index: int) -> bytes:
    """The line a receiver writes to the events pipe once it listens (not an event: no ``type``)."""
    return json.dumps({"receiver": index, "pid": os.getpid()}).encode() + b"\n"


def read_settings(fd: int) -> Settings:
    """The settings the gateway process wrote as the first line of ``fd`` (stdin; exact: no file,
    environment or default is read again). Raises ValueError when there is none.

    Plain ``os.read``, no buffered reader: ``_watch_parent`` then blocks on the same descriptor
    in a daemon thread, and a buffered reader's lock held there aborts the interpreter at exit."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise ValueError("no settings on stdin: the receiver role is started by the gateway process")
        data += chunk
    return Settings.model_validate(json.loads(data))


def run_receiver(
    settings: Settings, index: int, events_fd: int, parent_fd: int, handoff_fd: int | None = None
) -> int:
    """Receive until SIGTERM or until ``parent_fd`` (stdin) reaches end-of-file; returns the exit status.

    ``index``: this receiver's number (1 .. gateway_processes - 1), in its log lines;
    ``events_fd``: the write end of the events pipe; ``handoff_fd``: the Unix socket on which
    plain connections arrive (None: this receiver listens on the plain port itself, ``SO_REUSEPORT``).
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_watch_parent, args=(parent_fd, stop), name="receiver-parent-watch", daemon=True
    ).start()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    data_dir_lock = DataDirLock(settings.data_dir)
    try:
        data_dir_lock.acquire()
    except OSError as exc:
        log.warning("cannot take the data directory's process lock", extra={"error": str(exc)})
    db = Database(settings.resolved_database_url)
    relay = EventRelay(events_fd)
    db.events.register(Event, relay)
    storage = StorageGuard(settings.data_dir, settings.min_free_disk_mb)
    ingestor = gateway_setup.ingestor(settings, db, storage)
    config = replace(gateway_config(settings), reuse_port=True, adopt_only=handoff_fd is not None)
    gateway = DicomGateway(config, db, ingestor, qr=query_retrieve(settings, db))
    try:
        try:
            gateway.start()
        except OSError as exc:
            log.error("receiver cannot listen", extra={"port": settings.dicom_port, "error": str(exc)})
            return 1
        if handoff_fd is not None:
            threading.Thread(
                target=_adopt_loop, args=(handoff_fd, gateway, stop), name="receiver-handoff", daemon=True
            ).start()
        _write_listening(events_fd, index, stop)
        stop.wait()
        return 0
    finally:
        # Stopping already: a further SIGTERM (a supervisor signalling the whole group) must not kill
        # the interpreter while it exits (Python restores the default action at finalization).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        gateway.stop(settings.shutdown_grace_s)
        if relay.dropped:
            log.warning(
                "events not relayed to the gateway process (pipe full)", extra={"count": relay.dropped}
            )
        db.dispose()
        data_dir_lock.release()
        log.info("stopped")


def _write_listening(events_fd: int, index: int, stop: threading.Event) -> None:
    """Tell the gateway process that this receiver listens (``/healthz`` counts it); the pipe is
    non-blocking, and full only while the gateway process is busy: try again shortly."""
    while not stop.is_set():
        try:
            os.write(events_fd, listening_line(index))
            return
        except BlockingIOError:
            stop.wait(0.1)
        except OSError:  # the gateway process has gone; _watch_parent stops this one
            return


def _watch_parent(parent_fd: int, stop: threading.Event) -> None:
    """Block on stdin: end-of-file (or an error) means the gateway process has gone."""
    try:
        while os.read(parent_fd, 4096):
            pass
    except OSError:
        pass
    if not stop.is_set():
        log.warning("the gateway process has gone: stopping")
        stop.set()


def _adopt_loop(handoff_fd: int, gateway: DicomGateway, stop: threading.Event) -> None:
    """Serve each connection the gateway process hands over; end-of-file: it has gone."""
    channel = socket.socket(fileno=handoff_fd)
    try:
        while not stop.is_set():
            try:
                message, fds, _flags, _address = socket.recv_fds(channel, 16, 4)
            except OSError as exc:
                log.warning("hand-off channel failed", extra={"error": str(exc)})
                break
            if not message and not fds:
                break
            for fd in fds:
                _adopt(fd, gateway)
    finally:
        channel.close()
    if not stop.is_set():
        log.warning("the gateway process has gone: stopping")
        stop.set()


def _adopt(fd: int, gateway: DicomGateway) -> None:
    conn = socket.socket(fileno=fd)
    try:
        address = conn.getpeername()
    except OSError:  # the station has gone already
        conn.close()
        return
    if not gateway.adopt(conn, (str(address[0]), int(address[1]))):
        conn.close()
