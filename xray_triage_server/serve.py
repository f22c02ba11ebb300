"""``xray-triage serve``: DICOM gateway, triage workers and HTTP app in one process.

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
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from consult_web.app import create_app
from dicom_gateway.qr import QueryRetrieveConfig, QueryRetrieveSCP
from dicom_gateway.scp import DicomGateway, GatewayConfig
from dicom_gateway.tls import TlsConfig, TlsConfigError, server_context
from dicom_sender.service import tls_context
from xray_triage.events import InstanceStored
from xray_triage.inference.card import ModelCard, load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.metrics import Metrics
from xray_triage.move_destinations import move_resolver
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.results import producer as results_producer
from xray_triage.settings import Settings
from xray_triage.store.db import Database
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.files import clean_incoming, quarantined_files, remove_file, stored_files
from xray_triage.store.ingest import Ingestor, TriagePolicy
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance, QuarantinedInstance
from xray_triage.triage.worker import TriageWorkers
from xray_triage_server.cli_error import CliError
from xray_triage_server.delivery import DeliveryRuntime, DestinationError, sender_config

log = logging.getLogger(__name__)


def reconcile_files(settings: Settings, db: Database) -> None:
    """Remove what a crash left between writing a file and committing its row.

    Such files were never acknowledged to the modality (it will resend them),
    so removing them loses nothing and keeps "no file without a row" true.
    """
    parts = clean_incoming(settings.data_dir)
    with db.read_session() as session:
        known = set(session.scalars(select(Instance.file_path))) | set(session.scalars(select(ResultObject.file_path)))
        kept_apart = set(session.scalars(select(QuarantinedInstance.file_path)))
    orphans = (stored_files(settings.data_dir) - known) | (quarantined_files(settings.data_dir) - kept_apart)
    for relpath in orphans:
        remove_file(settings.data_dir, Path(relpath))
    missing = len(known - stored_files(settings.data_dir)) if known else 0
    if parts or orphans:
        log.warning("removed unacknowledged leftovers of an interrupted run", extra={"partial": parts, "orphans": len(orphans)})
    if missing:
        log.error("instances whose DICOM file is missing from the data directory", extra={"count": missing})


def prepare_storage(settings: Settings, db: Database, workers: TriageWorkers) -> None:
    """The start-up storage work: schema, leftovers of a crash, interrupted jobs (then the workers).

    Raises SQLAlchemyError or OSError when it cannot be written (e.g. the disk is full).
    """
    db.create_schema()
    reconcile_files(settings, db)
    workers.start()  # re-queues interrupted jobs before any worker thread starts


class StorageRecovery:
    """Runs :func:`prepare_storage` at start-up and, while it fails, every ``storage_retry_s``.

    While it has not succeeded the storage guard is degraded: C-STORE answers 0xA700
    and ``/healthz`` says why, instead of the server exiting on a full disk.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        workers: TriageWorkers,
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


def gateway_config(settings: Settings) -> GatewayConfig:
    return GatewayConfig(
        ae_title=settings.ae_title,
        host=settings.dicom_host,
        port=settings.dicom_port,
        accept_unknown_stations=settings.accept_unknown_stations,
        max_associations=settings.max_associations,
        acse_timeout_s=settings.acse_timeout_s,
        dimse_timeout_s=settings.dimse_timeout_s,
        network_timeout_s=settings.network_timeout_s,
        max_pdu=settings.max_pdu,
        require_called_ae_title=settings.require_called_ae_title,
        association_request_timeout_s=settings.association_request_timeout_s,
        max_pending_connections=settings.max_pending_connections,
        max_pending_per_address=settings.max_pending_per_address,
        max_associations_per_station=settings.max_associations_per_station,
        max_associations_per_address=settings.max_associations_per_address,
        reserved_station_associations=settings.reserved_station_associations,
        max_dataset_bytes=settings.max_dataset_bytes,
        tls=tls_config(settings),
        plain_enabled=settings.dicom_plain_enabled,
    )


def tls_config(settings: Settings) -> TlsConfig | None:
    """The DICOM TLS listener's settings (None when ``dicom_tls_port`` is unset)."""
    if settings.dicom_tls_port is None or settings.dicom_tls_cert_file is None or settings.dicom_tls_key_file is None:
        return None
    return TlsConfig(
        port=settings.dicom_tls_port,
        cert_file=settings.dicom_tls_cert_file,
        key_file=settings.dicom_tls_key_file,
        ca_file=settings.dicom_tls_ca_file,
        require_client_cert=settings.dicom_tls_require_client_cert,
    )


def query_retrieve(settings: Settings, db: Database) -> QueryRetrieveSCP | None:
    """The gateway's C-FIND / C-MOVE / C-GET handlers (None when ``query_retrieve`` is off)."""
    if not settings.query_retrieve:
        return None
    config = QueryRetrieveConfig(
        data_dir=settings.data_dir,
        all_stations_ae_titles=frozenset(ae.strip() for ae in settings.qr_all_stations_ae_titles),
        resolve_move_destination=move_resolver(db),
        tls_context=lambda: tls_context(sender_config(settings)),  # the delivery senders' client TLS
        max_matches=settings.qr_max_matches,
    )
    return QueryRetrieveSCP(config, db)


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

    http_socket = bind_http(settings.http_host, settings.http_port)  # first: a busy port starts nothing
    try:
        return _run(settings, http_socket)
    finally:
        http_socket.close()


def _run(settings: Settings, http_socket: socket.socket) -> int:
    import uvicorn

    tls = tls_config(settings)
    if tls is not None:
        try:
            server_context(tls)  # a bad certificate, key or CA file stops start-up with one line, before anything
        except TlsConfigError as exc:
            raise CliError(str(exc)) from exc
    card = load_card(settings.model_dir, variant=settings.model_variant)  # sha256 checked: a bad model stops start-up
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
    db = Database(settings.resolved_database_url)
    log.info(
        "starting",
        extra={"data_dir": str(settings.data_dir.resolve()), "database": db.engine.url.render_as_string(hide_password=True)},
    )
    workers = TriageWorkers(
        db,
        runner,
        settings.data_dir,
        count=settings.triage_workers,
        max_attempts=settings.max_job_attempts,
        reduced_decode=settings.j2k_reduced_decode,
        max_frame_pixels=settings.max_frame_pixels,
    )
    db.events.register(InstanceStored, lambda event: workers.notify() if event.triage_queued else None)
    metrics = Metrics(db).attach()  # before the gateway and workers commit anything
    storage = StorageGuard(settings.data_dir, settings.min_free_disk_mb)
    health: dict[str, Any] = {"dicom_gateway": "starting"}
    stop_requested = threading.Event()
    recovery = StorageRecovery(settings, db, workers, storage, stop_requested)
    recovery.start()
    ingestor = Ingestor(
        settings.data_dir,
        db,
        TriagePolicy(settings.triage_modalities, settings.triage_body_parts),
        default_character_set=settings.default_character_set,
        storage=storage,
    )
    gateway = DicomGateway(gateway_config(settings), db, ingestor, qr=query_retrieve(settings, db))
    delivery = DeliveryRuntime(settings, db)  # destinations: the queue's consumer and one sender per peer
    results = results_consumer(settings, db, card)
    try:
        if results is not None:
            results.start()
        try:
            delivery.start()
        except DestinationError as exc:
            raise CliError(f"[[destinations]]: {exc}") from exc
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
        health["dicom_gateway"] = "stopping"
        stop_requested.set()
        gateway.stop(settings.shutdown_grace_s)
        recovery.join()
        delivery.stop(settings.shutdown_grace_s)  # the object in flight finishes; the rest stays queued
        workers.stop()
        if results is not None:
            results.stop()
        runner.close()
        db.dispose()
        log.info("stopped")


def results_consumer(settings: Settings, db: Database, card: ModelCard) -> OutboxConsumer | None:
    """The ``results`` outbox consumer (AI SR + GSPS, marks GSPS, consult SR); None when
    ``results_enabled`` is off. Its cursor keeps its place, so turning it on later catches up."""
    if not settings.results_enabled:
        log.info("result objects off (results_enabled = false)")
        return None
    config = results_producer.ResultsConfig(settings.data_dir, card, settings.uid_root)
    # One event per transaction: making an image's SR + GSPS (read, build, write, fsync) took a
    # median 174 ms (p90 487 ms) on the 2-core test machine, and on SQLite the handler holds the one
    # write lock; a batch of 100 (catching up after an upgrade) would keep C-STORE commits waiting ~17 s.
    return OutboxConsumer(
        db,
        results_producer.CONSUMER,
        lambda session, stored: results_producer.handle(session, stored, config),
        batch=1,
    )


def _install_quiet_signal_handlers(flag: threading.Event) -> None:
    """uvicorn re-raises the signal it caught once it has stopped; with these
    handlers in place that re-raise only sets a flag, so our own shutdown
    (gateway, workers, database) still runs."""

    def _handler(signum: int, _frame: object) -> None:
        flag.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
