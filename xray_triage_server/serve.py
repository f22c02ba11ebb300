"""``xray-triage serve``: DICOM gateway, triage workers and HTTP app, in one process or split.

``roles`` (``--roles gateway,worker,web``, all three by default) says which parts this
process runs; several processes on the same or other machines share the database
(PostgreSQL for more than one machine) and the data directory (shared storage). The triage
queue's job leases (``xray_triage/triage/jobs.py``) let any number of worker processes
share the work; live updates go through the outbox table, so every web process sees them.
With ``gateway_processes`` > 1 the gateway role also starts that many - 1 receiver processes on
the same DICOM port(s) (``receiver_pool.py``, ``receiver.py``), once its own gateway listens.

Start-up order is chosen so that nothing is acknowledged that cannot be
processed: the model is loaded, checked against its card's sha256 and warmed up
*before* the gateway starts listening. If the start-up storage work (schema,
leftover files, interrupted jobs) cannot be written, e.g. on a full disk, the
server still starts, *degraded*: the gateway answers C-STORE 0xA700 (the
modality keeps the image and retries), ``/healthz`` says so, and the work is
retried every ``storage_retry_s`` until it succeeds; only then do the triage
workers start. Shutdown runs the other way: the gateway
stops accepting and lets in-flight associations finish (or aborts them after a
grace period), then the workers finish the image in hand; queued jobs stay in
the database for the next start.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from consult_web.app import create_app
from dicom_gateway.scp import DicomGateway
from dicom_gateway.tls import TlsConfigError, server_context
from xray_triage.events import InstanceStored
from xray_triage.inference.card import ModelCard, load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.metrics import Metrics
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.results import producer as results_producer
from xray_triage.settings import Settings
from xray_triage.store import migrate
from xray_triage.store.data_dir_lock import DataDirLock, other_processes_alive
from xray_triage.store.db import Database
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.files import clean_incoming, quarantined_files, remove_file, stored_files
from xray_triage.store.ingest import Ingestor
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance, QuarantinedInstance
from xray_triage.store.schema_error import SchemaError
from xray_triage.triage.worker import TriageWorkers
from xray_triage_server import gateway_setup
from xray_triage_server.cli_error import CliError
from xray_triage_server.delivery import DeliveryRuntime, DestinationError
from xray_triage_server.gateway_setup import gateway_config, query_retrieve, tls_config
from xray_triage_server.receiver_pool import ReceiverPool

log = logging.getLogger(__name__)


def reconcile_files(
    settings: Settings,
    db: Database,
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Remove what a crash left between writing a file and committing its row.

    Such files were never acknowledged to the modality (it will resend them),
    so removing them loses nothing and keeps "no file without a row" true. When another live
    process shares the data directory (``store/data_dir_lock.py``) only files older than
    ``leftover_grace_s`` go: it may be writing a ``.part`` file or be about to commit the row
    of a file it has just renamed. Alone, this process removes every leftover at once (it has
    not started receiving yet: the storage guard refuses stores until this has run).
    """
    shared = other_processes_alive(settings.data_dir)
    older_than = clock() - settings.leftover_grace_s if shared else float("inf")
    parts = clean_incoming(settings.data_dir, older_than=older_than)
    with db.read_session() as session:
        known = set(session.scalars(select(Instance.file_path))) | set(session.scalars(select(ResultObject.file_path)))
        kept_apart = set(session.scalars(select(QuarantinedInstance.file_path)))
    candidates = (stored_files(settings.data_dir) - known) | (quarantined_files(settings.data_dir) - kept_apart)
    orphans = {p for p in candidates if _modified_before(settings.data_dir / p, older_than)}
    if orphans:  # a row may have been committed since we read them: check again before deleting
        with db.read_session() as session:
            known_now = set(session.scalars(select(Instance.file_path).where(Instance.file_path.in_(orphans))))
            known_now |= set(
                session.scalars(select(QuarantinedInstance.file_path).where(QuarantinedInstance.file_path.in_(orphans)))
            )
        orphans -= known_now
    for relpath in orphans:
        remove_file(settings.data_dir, Path(relpath))
    missing = len(known - stored_files(settings.data_dir)) if known else 0
    if parts or orphans:
        log.warning("removed unacknowledged leftovers of an interrupted run", extra={"partial": parts, "orphans": len(orphans)})
    if missing:
        log.error("instances whose DICOM file is missing from the data directory", extra={"count": missing})


def _modified_before(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime < when
    except FileNotFoundError:
        return False


def prepare_storage(settings: Settings, db: Database, workers: TriageWorkers | None) -> None:
    """The start-up storage work: schema, leftovers of a crash (gateway role), then the workers.

    Raises SQLAlchemyError or OSError when it cannot be written (e.g. the disk is full),
    SchemaError when the schema is not this code's.
    """
    db.create_schema()
    if "gateway" in settings.role_set:
        reconcile_files(settings, db)
    if workers is not None:
        workers.start()  # re-queues the jobs of dead local processes before any worker thread starts


class StorageRecovery:
    """Runs :func:`prepare_storage` at start-up and, while it fails, every ``storage_retry_s``.

    While it has not succeeded the storage guard is degraded: C-STORE answers 0xA700
    and ``/healthz`` says why, instead of the server exiting on a full disk.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        workers: TriageWorkers | None,
        storage: StorageGuard,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.db = db
        self.workers = workers
        self.storage = storage
        self.stop = stop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.attempt():
            return
        log.error(
            "storage not ready: started degraded, C-STORE answers 0xA700 until it recovers",
            extra={"retry_s": self.settings.storage_retry_s, "why": self.storage.degraded},
        )
        self._thread = threading.Thread(target=self._loop, name="storage-recovery", daemon=True)
        self._thread.start()

    def attempt(self) -> bool:
        """One try; True once the storage work is done (the guard is then cleared)."""
        try:
            prepare_storage(self.settings, self.db, self.workers)
        except (SQLAlchemyError, OSError) as exc:
            self.storage.set_degraded(_storage_problem(exc))
            return False
        except SchemaError as exc:  # readable only now, and older than the code: stay degraded, say why
            log.error("database schema does not fit this version", extra={"error": str(exc)})
            self.storage.set_degraded("database schema: run xray-triage db upgrade")
            return False
        self.storage.clear_degraded()
        return True

    def _loop(self) -> None:
        while not self.stop.wait(self.settings.storage_retry_s):
            if self.attempt():
                log.warning("storage recovered: accepting images again", extra={"free_mb": self.storage.free_mb()})
                return

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(30)


def _storage_problem(exc: BaseException) -> str:
    """A short reason for /healthz and the logs (no SQL, no paths)."""
    if isinstance(exc, SQLAlchemyError):
        original = getattr(exc, "orig", None)
        return f"database: {original or type(exc).__name__}"
    if isinstance(exc, OSError):
        return f"file system: {exc.strerror or type(exc).__name__}"
    return type(exc).__name__


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before anything else starts.

    Binding first means a port in use stops start-up with one clear line (``CliError``)
    before the DICOM gateway listens: a gateway that accepts images while the web app
    is down would acknowledge studies nobody can read. uvicorn serves on this socket.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CliError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise CliError(f"cannot listen for HTTP on {host}:{port}: {reason} (set http_port or --http-port)") from exc
    sock.set_inheritable(True)
    return sock


def run_server(settings: Settings) -> int:
    if "web" not in settings.role_set:
        return _run(settings, None)
    http_socket = bind_http(settings.http_host, settings.http_port)  # first: a busy port starts nothing
    try:
        return _run(settings, http_socket)
    finally:
        http_socket.close()


def check_schema(db: Database) -> None:
    """Refuse to start on a schema older (or newer) than the code; an empty database is fine
    (``prepare_storage`` creates it). A database that cannot be read now is left to the
    storage recovery, which retries."""
    try:
        state = migrate.schema_state(db.engine)
    except SQLAlchemyError:
        return
    if state.state in (migrate.OUTDATED, migrate.NEWER):
        try:
            migrate.ensure_schema(db.engine)
        except SchemaError as exc:
            raise CliError(str(exc)) from exc


def _run(settings: Settings, http_socket: socket.socket | None) -> int:
    import uvicorn

    roles = settings.role_set
    tls = tls_config(settings) if "gateway" in roles else None
    if tls is not None:
        try:
            server_context(tls)  # a bad certificate, key or CA file stops start-up with one line, before anything
        except TlsConfigError as exc:
            raise CliError(str(exc)) from exc
    card = load_card(settings.model_dir, variant=settings.model_variant)  # sha256 checked: a bad model stops start-up
    runner = None
    if "worker" in roles:
        runner = ModelRunner(
            card,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            batch_max_size=settings.batch_max_size,
            batch_max_wait_ms=settings.batch_max_wait_ms,
        )
        if runner.batcher is not None and settings.triage_workers < settings.batch_max_size:
            log.warning(
                "batch_max_size > triage_workers: batches can never fill, each waits batch_max_wait_ms",
                extra={"batch_max_size": settings.batch_max_size, "triage_workers": settings.triage_workers},
            )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    data_dir_lock = DataDirLock(settings.data_dir)  # held until this process exits
    try:
        data_dir_lock.acquire()
    except OSError as exc:  # e.g. a full disk: start anyway (degraded storage is handled below)
        log.warning("cannot take the data directory's process lock", extra={"error": str(exc)})
    db = Database(settings.resolved_database_url)
    log.info(
        "starting",
        extra={
            "data_dir": str(settings.data_dir.resolve()),
            "database": db.engine.url.render_as_string(hide_password=True),
            "roles": settings.roles,
        },
    )
    workers = None
    if runner is not None:
        workers = TriageWorkers(
            db,
            runner,
            settings.data_dir,
            count=settings.triage_workers,
            nice=settings.triage_nice,
            max_attempts=settings.max_job_attempts,
            reduced_decode=settings.j2k_reduced_decode,
            max_frame_pixels=settings.max_frame_pixels,
            lease_s=settings.job_lease_s,
        )
        in_process = workers
        db.events.register(InstanceStored, lambda event: in_process.notify() if event.triage_queued else None)
    metrics = Metrics(db).attach()  # before the gateway and workers commit anything
    storage = StorageGuard(settings.data_dir, settings.min_free_disk_mb)
    health: dict[str, Any] = {"dicom_gateway": "starting"} if "gateway" in roles else {}
    stop_requested = threading.Event()
    gateway = None
    recovery: StorageRecovery | None = None
    ingestor: Ingestor | None = None
    receivers: ReceiverPool | None = None
    # The outbox consumers that send to PACS and make the result objects run in the gateway's
    # process: a site runs one of it (it binds the DICOM port), so each destination has one sender.
    delivery = DeliveryRuntime(settings, db) if "gateway" in roles else None
    results = results_consumer(settings, db, card) if "gateway" in roles else None
    try:
        check_schema(db)
        recovery = StorageRecovery(settings, db, workers, storage, stop_requested)
        recovery.start()
        if results is not None:
            results.start()
        if delivery is not None:
            try:
                delivery.start()
            except DestinationError as exc:
                raise CliError(f"[[destinations]]: {exc}") from exc
        if "gateway" in roles:
            ingestor = gateway_setup.ingestor(settings, db, storage)
            gateway = DicomGateway(gateway_config(settings), db, ingestor, qr=query_retrieve(settings, db))
            try:
                gateway.start()
            except OSError as exc:
                reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise CliError(
                    f"cannot listen for DICOM on {settings.dicom_host}:{settings.dicom_port}"
                    f"{f' / TLS {settings.dicom_tls_port}' if settings.dicom_tls_port is not None else ''}: {reason} "
                    "(set dicom_port or --dicom-port, dicom_tls_port)"
                ) from exc
            health["dicom_gateway"] = "ok"
            if settings.gateway_processes > 1:  # more interpreters receiving on the same port(s)
                # A gateway process that triages leaves the receiving to its receivers: its interpreter
                # is busy enough with triage (issue 17's figures), theirs are free.
                triaging = workers is not None and settings.triage_workers > 0
                receivers = ReceiverPool(settings, db.events, health, serve_here=not triaging)
                receivers.start(
                    plain_port=gateway.port if settings.dicom_plain_enabled else None,
                    tls_port=gateway.tls_port,
                    storage_ready=lambda: storage.degraded is None,
                )
                gateway.set_handoff(receivers.handoff)
        if http_socket is None:  # no web role: run until SIGTERM / SIGINT
            _install_quiet_signal_handlers(stop_requested)
            log.info("running without the HTTP app", extra={"roles": settings.roles})
            stop_requested.wait()
            return 0
        app = create_app(db, card, health, settings, storage=storage, metrics=metrics, ingestor=ingestor)
        config = uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,  # backstop: never wait on a browser's open connection
        )
        server = uvicorn.Server(config)
        app.state.stopping = lambda: server.should_exit  # live-update streams end when shutdown starts
        _install_quiet_signal_handlers(stop_requested)
        port = http_socket.getsockname()[1]
        log.info("HTTP app listening", extra={"host": settings.http_host, "port": port})
        server.run(sockets=[http_socket])
        if not server.started:
            log.error("HTTP app could not start (is the port free?)", extra={"port": settings.http_port})
            return 1
        return 0
    finally:
        log.info("shutting down")
        if gateway is not None:
            health["dicom_gateway"] = "stopping"
        stop_requested.set()
        if receivers is not None:
            receivers.request_stop()  # they finish their associations while this process finishes its own
        if gateway is not None:
            gateway.stop(settings.shutdown_grace_s)
        if receivers is not None:
            receivers.join(settings.shutdown_grace_s)
        if recovery is not None:
            recovery.join()
        if delivery is not None:
            delivery.stop(settings.shutdown_grace_s)  # the object in flight finishes; the rest stays queued
        if workers is not None:
            workers.stop()
        if results is not None:
            results.stop()
        if runner is not None:
            runner.close()
        db.dispose()
        data_dir_lock.release()
        log.info("stopped")


def results_consumer(settings: Settings, db: Database, card: ModelCard) -> OutboxConsumer | None:
    """The ``results`` outbox consumer (AI SR + GSPS, marks GSPS, consult SR); None when
    ``results_enabled`` is off. Its cursor keeps its place, so turning it on later catches up."""
    if not settings.results_enabled:
        log.info("result objects off (results_enabled = false)")
        return None
    config = results_producer.ResultsConfig(settings.data_dir, card, settings.uid_root)
    # An image's AI SR + GSPS are made before the write transaction (``AiResultsAhead``: making
    # them took a median 174 ms, p90 487 ms, on the 2-core test machine, and SQLite has one write
    # lock that the gateway's commits need); one event per transaction, so the marks GSPS and
    # consult SR, still made inside it, never hold the lock for a whole batch.
    ahead = results_producer.AiResultsAhead(db, config)
    return OutboxConsumer(
        db,
        results_producer.CONSUMER,
        lambda session, stored: results_producer.handle(session, stored, config, ahead),
        batch=1,
        wants=results_producer.wants,  # every image's InstanceStored, for one, takes no write lock
        prepare=ahead.prepare,
    )


def _install_quiet_signal_handlers(flag: threading.Event) -> None:
    """uvicorn re-raises the signal it caught once it has stopped; with these
    handlers in place that re-raise only sets a flag, so our own shutdown
    (gateway, workers, database) still runs."""

    def _handler(signum: int, _frame: object) -> None:
        flag.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
