"""The gateway process's receiver processes (``gateway_processes`` > 1): start, relay, restart, stop.

The gateway process (``serve.py``) listens first, then starts ``gateway_processes - 1``
receivers (:mod:`xray_triage_server.receiver`) as ``xray-triage serve --roles receiver``, each
handed the settings on stdin (with the ports this process actually bound) and the write end of
one shared events pipe. This module:

* hands plain connections to the receivers in turn (``handoff``, round robin over this process
  and the receivers that listen; one ``SOCK_SEQPACKET`` Unix socket each, ``SCM_RIGHTS``), once
  the connection's A-ASSOCIATE-RQ has arrived (the gate ran here);
* reads the events pipe and dispatches the events the receivers committed on this process's
  ``EventHandlers`` (triage workers, outbox consumers, live updates and metrics react to them
  as to their own), and notes which receivers listen;
* restarts a receiver that died (logged as an error) after a back-off that doubles with each
  failure in a row (``RESTART_BACKOFF_S`` .. ``RESTART_BACKOFF_MAX_S``), and only while the
  storage is ready (a degraded start retries its storage work before anyone receives);
* keeps ``health["dicom_receivers"]``: ``configured``, ``listening`` and ``status``
  (``degraded`` while fewer listen than configured), which ``/healthz`` shows;
* stops them: SIGTERM, ``shutdown_grace_s`` (plus a margin for their own shutdown) to exit,
  then SIGKILL. A receiver whose gateway process died sees its stdin reach end-of-file and stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xray_triage.events import Event, EventHandlers, UnknownEvent, relayed
from xray_triage.settings import Settings
from xray_triage_server.receiver import ROLE

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0  # first wait before restarting a receiver that died
RESTART_BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a receiver that ran this long before dying starts the back-off again from the first wait
SUPERVISE_INTERVAL_S = 0.25
STOP_MARGIN_S = 5.0  # on top of shutdown_grace_s: the receiver's own shutdown after its associations
HANDOFF_TIMEOUT_S = 1.0  # a receiver that cannot take a connection in this long: it is served here
PIPE_SIZE = 1 << 20  # asked for (F_SETPIPE_SZ; Linux caps it at /proc/sys/fs/pipe-max-size)


def receiver_command() -> list[str]:
    """How a receiver is started: this interpreter running the CLI (the same installation)."""
    return [sys.executable, "-m", "xray_triage_server.cli"]


def settings_line(settings: Settings, plain_port: int | None, tls_port: int | None) -> bytes:
    """What a receiver reads on its stdin (``receiver.read_settings``): every setting of this
    process as one JSON line, with the ports this process bound (a configured 0 is a free port
    chosen at bind time, which the receivers must share)."""
    overrides: dict[str, Any] = {}
    if plain_port is not None:
        overrides["dicom_port"] = plain_port
    if tls_port is not None:
        overrides["dicom_tls_port"] = tls_port
    return json.dumps({**settings.model_dump(mode="json"), **overrides}).encode() + b"\n"


@dataclass(eq=False)
class _Receiver:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    listening: bool = False
    failures: int = 0  # deaths in a row (reset by a run of STABLE_S)
    start_after: float = 0.0
    channel: socket.socket | None = None  # our end of its hand-off socket


class ReceiverPool:
    """``settings.gateway_processes - 1`` receiver processes of this gateway process.

    ``events``: this process's in-process handlers (``Database.events``), called with the
    receivers' events; ``health``: the ``/healthz`` state dict; ``command``: the CLI to start
    (default :func:`receiver_command`); ``clock``: monotonic seconds; ``serve_here``: whether this
    process takes its turn at serving plain connections (``handoff``).
    """

    def __init__(
        self,
        settings: Settings,
        events: EventHandlers,
        health: dict[str, Any],
        command: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        serve_here: bool = True,
    ) -> None:
        self.settings = settings
        self.serve_here = serve_here
        self.events = events
        self.health = health
        self.command = list(command or receiver_command())
        self.clock = clock
        self.receivers = [_Receiver(index) for index in range(1, settings.gateway_processes)]
        self.relayed = 0  # events dispatched from the receivers (tests, logs)
        self._child_settings = b""
        self._read_fd = -1
        self._write_fd = -1
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._storage_ready: Callable[[], bool] = lambda: True
        self._turn = 0
        self.handed_off = 0  # plain connections passed to a receiver (tests, logs)
        self._update_health()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, plain_port: int | None, tls_port: int | None, storage_ready: Callable[[], bool]) -> None:
        """Start the receivers on the ports this process bound (None: that listener is off).

        ``storage_ready``: whether receiving is allowed (the start-up storage work is done); a
        receiver is (re)started only then.
        """
        self._child_settings = settings_line(self.settings, plain_port, tls_port)
        self._storage_ready = storage_ready
        self._read_fd, self._write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # a smaller pipe only drops more under a burst
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        for target, name in (
            (self._relay_loop, "receiver-events"),
            (self._supervise_loop, "receiver-supervisor"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("starting receiver processes", extra={"receivers": len(self.receivers)})

    def request_stop(self) -> None:
        """SIGTERM every receiver (they finish their associations within shutdown_grace_s); no restarts.
        Once: a second SIGTERM could reach a receiver while its interpreter exits."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            for receiver in self.receivers:
                if receiver.proc is not None and receiver.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        receiver.proc.terminate()

    def join(self, grace_s: float) -> None:
        """Wait ``grace_s`` + a margin for the receivers to exit, SIGKILL the rest; end the threads."""
        self.request_stop()
        deadline = self.clock() + grace_s + STOP_MARGIN_S
        for receiver in self.receivers:
            proc = receiver.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.error(
                    "receiver did not stop in time: killed",
                    extra={"receiver": receiver.index, "pid": proc.pid},
                )
                proc.kill()
                proc.wait()
            if proc.returncode != 0:
                log.warning(
                    "receiver exited with an error at shutdown",
                    extra={"receiver": receiver.index, "pid": proc.pid, "exit_status": proc.returncode},
                )
            self._close_stdin(proc)
            if receiver.channel is not None:
                receiver.channel.close()
                receiver.channel = None
        for thread in self._threads:
            thread.join(5)
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = -1

    # -- supervision ----------------------------------------------------------------------

    def _supervise_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.supervise()
            except Exception:
                log.exception("receiver supervision failed")
            self._stopping.wait(SUPERVISE_INTERVAL_S)

    def supervise(self) -> None:
        """One round: note the receivers that died, start those that are due."""
        now = self.clock()
        for receiver in self.receivers:
            if self._stopping.is_set():
                return
            proc = receiver.proc
            if proc is not None and proc.poll() is not None:
                lived_s = now - receiver.started_at
                receiver.failures = 1 if lived_s >= STABLE_S else receiver.failures + 1
                wait_s = min(RESTART_BACKOFF_S * 2 ** (receiver.failures - 1), RESTART_BACKOFF_MAX_S)
                log.error(
                    "receiver process died: restarting it",
                    extra={
                        "receiver": receiver.index,
                        "pid": proc.pid,
                        "exit_status": proc.returncode,
                        "ran_s": round(lived_s, 1),
                        "restart_in_s": wait_s,
                    },
                )
                self._close_stdin(proc)
                with self._lock:
                    receiver.proc = None
                    receiver.listening = False
                    channel, receiver.channel = receiver.channel, None
                if channel is not None:
                    channel.close()
                receiver.start_after = now + wait_s
                self._update_health()
            if receiver.proc is None and now >= receiver.start_after and self._storage_ready():
                self._spawn(receiver)

    def _spawn(self, receiver: _Receiver) -> None:
        args = [
            *self.command,
            "serve",
            "--roles",
            ROLE,
            "--events-fd",
            str(self._write_fd),
            "--receiver-index",
            str(receiver.index),
        ]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.settimeout(HANDOFF_TIMEOUT_S)
        args += ["--handoff-fd", str(theirs.fileno())]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, pass_fds=(self._write_fd, theirs.fileno()))
        except OSError as exc:
            ours.close()
            theirs.close()
            log.error(
                "cannot start a receiver process", extra={"receiver": receiver.index, "error": str(exc)}
            )
            receiver.failures += 1
            receiver.start_after = self.clock() + RESTART_BACKOFF_MAX_S
            return
        theirs.close()
        assert proc.stdin is not None
        try:
            proc.stdin.write(
                self._child_settings
            )  # stdin stays open: its end-of-file tells the receiver we are gone
            proc.stdin.flush()
        except OSError:
            pass  # it died at once: the next round sees it
        with self._lock:
            receiver.proc = proc
            receiver.channel = ours
            receiver.started_at = self.clock()
            receiver.listening = False
            if self._stopping.is_set():  # stop requested while it was starting
                proc.terminate()
        log.info("receiver process started", extra={"receiver": receiver.index, "pid": proc.pid})

    @staticmethod
    def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    # -- plain connections ----------------------------------------------------------------

    def handoff(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Pass ``sock`` to the process whose turn it is (True), or keep it (False).

        Round robin over the receivers, and this process too when ``serve_here`` (it does not
        triage; one that does keeps its interpreter for triage and hands every connection on).
        A receiver that is not listening is skipped; one that cannot take the connection within
        HANDOFF_TIMEOUT_S leaves it here, as does having no receiver listening at all.
        """
        with self._lock:
            if self._stopping.is_set():
                return False
            turns = len(self.receivers) + (1 if self.serve_here else 0)
            channel, receiver = None, None
            for _ in range(turns):
                self._turn = (self._turn + 1) % turns
                if self._turn == len(self.receivers):  # this process's turn
                    return False
                candidate = self.receivers[self._turn]
                if candidate.listening and candidate.channel is not None:
                    channel, receiver = candidate.channel, candidate
                    break
        if channel is None or receiver is None:
            return False
        try:
            socket.send_fds(channel, [b"c"], [sock.fileno()])
        except OSError as exc:
            log.warning(
                "cannot hand a connection to a receiver: served here",
                extra={"receiver": receiver.index, "peer": address[0], "error": str(exc)},
            )
            return False
        self.handed_off += 1
        return True

    # -- the events pipe ------------------------------------------------------------------

    def _relay_loop(self) -> None:
        rest = b""
        while True:
            ready, _, _ = select.select([self._read_fd], [], [], 0.5)
            if not ready:
                if self._stopping.is_set() and all(
                    r.proc is None or r.proc.poll() is not None for r in self.receivers
                ):
                    return
                continue
            try:
                chunk = os.read(self._read_fd, 1 << 16)
            except OSError:
                return
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            self.take_lines(lines)

    def take_lines(self, lines: Sequence[bytes]) -> None:
        """Dispatch the relayed events among ``lines`` (in order, in one call) and note which
        receivers say they listen; a line this version cannot read is logged and skipped."""
        events: list[Event] = []
        for line in lines:
            if line.startswith(b'{"receiver"'):
                try:
                    self._listening(json.loads(line))
                except ValueError as exc:
                    log.warning("unreadable line from a receiver process", extra={"error": str(exc)})
                continue
            try:
                events.append(relayed(line))
            except UnknownEvent as exc:
                log.warning("unreadable line from a receiver process", extra={"error": str(exc)})
        if events:
            self.relayed += len(events)
            self.events.dispatch(events)

    def _listening(self, message: dict[str, Any]) -> None:
        with self._lock:
            for receiver in self.receivers:
                proc = receiver.proc
                # the pid: not the line of a receiver that has died since
                if (
                    receiver.index == message.get("receiver")
                    and proc is not None
                    and proc.pid == message.get("pid")
                ):
                    receiver.listening = True
        self._update_health()

    def _update_health(self) -> None:
        with self._lock:
            listening = sum(1 for r in self.receivers if r.listening)
        self.health["dicom_receivers"] = {
            "status": "ok" if listening == len(self.receivers) else "degraded",
            "configured": len(self.receivers),
            "listening": listening,
        }

    @property
    def pids(self) -> list[int]:
        """The process ids of the receivers running now."""
        with self._lock:
            return [r.proc.pid for r in self.receivers if r.proc is not None and r.proc.poll() is None]
