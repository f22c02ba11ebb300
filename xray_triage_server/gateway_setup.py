"""The DICOM gateway's parts as the settings describe them, for the gateway process and its receivers.

Shared by ``serve.py`` (the gateway role) and ``receiver.py`` (the receiver processes of
``gateway_processes`` > 1), which must listen with exactly the same configuration; kept apart
from ``serve.py`` so that a receiver process does not import the web app or the model runtime.
"""

from __future__ import annotations

from dicom_gateway.qr import QueryRetrieveConfig, QueryRetrieveSCP
from dicom_gateway.scp import GatewayConfig
from dicom_gateway.tls import TlsConfig
from dicom_sender.service import tls_context
from xray_triage.move_destinations import move_resolver
from xray_triage.settings import Settings
from xray_triage.store.db import Database
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.ingest import Ingestor, TriagePolicy
from xray_triage_server.delivery import sender_config


def ingestor(settings: Settings, db: Database, storage: StorageGuard) -> Ingestor:
    """The gateway's ingest path (validation, group commit, triage policy) as the settings say."""
    return Ingestor(
        settings.data_dir,
        db,
        TriagePolicy(settings.triage_modalities, settings.triage_body_parts),
        default_character_set=settings.default_character_set,
        storage=storage,
    )


def gateway_config(settings: Settings) -> GatewayConfig:
    """The gateway's settings; with ``gateway_processes`` > 1 every listener binds with SO_REUSEPORT."""
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
        reuse_port=settings.gateway_processes > 1,
    )


def tls_config(settings: Settings) -> TlsConfig | None:
    """The DICOM TLS listener's settings (None when ``dicom_tls_port`` is unset)."""
    if (
        settings.dicom_tls_port is None
        or settings.dicom_tls_cert_file is None
        or settings.dicom_tls_key_file is None
    ):
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
