"""One typed settings object for the whole server.

Sources, highest priority first:
1. values given in code (CLI flags such as ``--dicom-port``),
2. environment variables ``XRAY_TRIAGE_<NAME>`` (e.g. ``XRAY_TRIAGE_DATA_DIR``),
3. the TOML file from ``--config FILE`` or ``XRAY_TRIAGE_CONFIG`` (top-level keys),
4. the defaults below: SQLite and local files under the data directory, the
   model shipped in the package (``xray_triage/models/default``, package data),
   CPU unless a GPU build sees a GPU.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "XRAY_TRIAGE_CONFIG"


def shipped_model_dir() -> Path:
    """The demo model's directory inside the installed package (ONNX files + cards).

    Package data (``[tool.setuptools.package-data]``) found through
    :mod:`importlib.resources`, so it is the same for an editable install,
    ``pip install .``, a wheel or the Docker image, whatever the working directory.
    ONNX Runtime opens the model by path, so the package must be installed as files
    (as pip does), not imported from a zip archive (then the card is reported missing).
    """
    return Path(str(files("xray_triage") / "models" / "default"))


DEFAULT_MODEL_DIR = shipped_model_dir()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ROLES = ("gateway", "worker", "web")  # of a `serve` process; all three by default


class DestinationSettings(BaseModel):
    """One ``[[destinations]]`` table of the TOML file: a DICOM peer (PACS) we C-STORE to.

    ``send``: what it gets, any of ``images`` (every stored instance, as received),
    ``ai-results`` (the AI's SR and GSPS) and ``consult-results`` (the specialist's GSPS and SR).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64)
    ae_title: str = Field(..., min_length=1, max_length=16)
    host: str
    port: int = Field(..., ge=1, le=65535)
    send: list[str] = Field(["images"], min_length=1)
    tls: bool = False
    rate_limit_bytes_per_s: int | None = Field(None, gt=0, description="None: unlimited")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XRAY_TRIAGE_", extra="forbid", validate_default=True)

    # Storage
    data_dir: Path = Field(Path("xray-triage-data"), description="DICOM files, database, logs")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    min_free_disk_mb: float = Field(
        512.0,
        ge=0,
        description="C-STORE answers 0xA700 and /healthz says degraded while the data directory's disk "
        "has less than this free (after the incoming file)",
    )
    storage_retry_s: float = Field(
        30.0, gt=0, description="when start-up storage work failed (e.g. disk full): how often to retry it"
    )

    # DICOM gateway
    default_character_set: str = Field(
        "ISO_IR 100",
        description="decodes header text (names) that declares no Specific Character Set (0008,0005) and is "
        "not valid UTF-8 (valid UTF-8 is read as UTF-8): a DICOM term ('ISO_IR 100' Latin-1, 'ISO_IR 192' "
        "UTF-8) or a Python codec name ('cp1258' Windows Vietnamese). Stored files keep their bytes",
    )
    ae_title: str = Field("XRAY_TRIAGE", max_length=16)
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=0, le=65535)
    accept_unknown_stations: bool = False
    max_associations: int = Field(32, ge=1, description="concurrent associations, all stations together")
    max_associations_per_station: int = Field(
        8, ge=1, description="concurrent associations of one calling AE title"
    )
    max_associations_per_address: int = Field(
        16, ge=1, description="concurrent associations from one IP address"
    )
    reserved_station_associations: int = Field(
        8,
        ge=0,
        description="slots only registered stations may use (unknown ones get max_associations minus this)",
    )
    require_called_ae_title: bool = Field(
        True,
        description="reject associations whose Called AE Title is not ae_title (A-ASSOCIATE-RJ, reason 7)",
    )
    association_request_timeout_s: float = Field(
        5.0, gt=0, description="a connection must send a complete A-ASSOCIATE-RQ within this, or it is closed"
    )
    max_pending_connections: int = Field(
        64, ge=1, description="connections waiting for their A-ASSOCIATE-RQ; beyond it the oldest is closed"
    )
    max_pending_per_address: int = Field(16, ge=1, description="... of them from one IP address")
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = Field(
        60.0,
        gt=0,
        description="read timeout on every accepted socket, and the idle time after which pynetdicom aborts "
        "an association that has not completed a PDU; the connection is then cut even if the peer still trickles bytes",
    )
    max_pdu: int = Field(0, ge=0, description="0 = unlimited")
    max_dataset_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="largest data set one C-STORE may carry; counted while it arrives, a larger one "
        "aborts the association (A-ABORT) and nothing is stored",
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="how long in-flight associations may finish")

    # HTTP
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)

    # Web view (consult_web)
    session_hours: float = Field(12.0, gt=0, description="how long a browser login lasts")
    cookie_secure: Literal["auto", "always", "never"] = Field(
        "auto", description="Secure flag on the session cookie: auto = when the request came over HTTPS"
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        description="failed logins of one user name from one network (an IPv4 address or an IPv6 "
        "/login_ipv6_prefix) before a lock-out; 4x that locks a network over all names, and starts a "
        "user name's back-off on every network where that user never logged in",
    )
    login_lockout_s: float = Field(900.0, gt=0, description="window and lock-out time for failed logins")
    login_backoff_s: float = Field(
        1.0,
        gt=0,
        description="first wait of a user name's back-off; doubles with each further failure, at most login_lockout_s",
    )
    login_ipv6_prefix: int = Field(
        64, ge=32, le=128, description="IPv6 addresses count as one network per this prefix"
    )
    max_request_bytes: int = Field(1_000_000, ge=1024, description="largest request body the web app accepts")
    default_language: Literal["vi", "en"] = "vi"
    default_timezone: str = "Asia/Ho_Chi_Minh"
    render_cache_images: int = Field(4, ge=0, description="decoded images kept in memory for the viewer")
    live_poll_s: float = Field(
        1.0,
        gt=0,
        description="how often the live-update poller reads new outbox events (one poll for all streams; a commit in this process wakes it after a quarter of this)",
    )
    live_max_streams_per_session: int = Field(
        6, ge=1, description="open live-update streams (/events) one browser login may hold; more answer 429"
    )
    live_max_streams_per_user: int = Field(
        12, ge=1, description="open live-update streams one user may hold over all logins; more answer 429"
    )
    worklist_page_size: int = Field(
        50, ge=1, le=500, description="worklist rows per page (and the JSON API's default limit)"
    )

    # OHIF viewer (README "OHIF viewer")
    ohif_dist_dir: Path | None = Field(
        None,
        description="the dist/ folder of npm's @ohif/app: served at /ohif/ (logged-in users, same origin as "
        "/dicomweb) with an app-config.js pointing at /dicomweb; unset = not served",
    )
    ohif_url: str | None = Field(
        None,
        description="where a site serves OHIF itself (e.g. '/ohif' behind nginx, or 'https://viewer.example.org'): "
        "the study page links to <ohif_url>/viewer?StudyInstanceUIDs=<uid>; unset = /ohif when ohif_dist_dir is set",
    )

    # Model and triage
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="directory (or .toml card) of the model")
    providers: list[str] | None = Field(
        None, description="ONNX Runtime providers; default CUDA if present, else CPU"
    )
    intra_op_threads: int | None = Field(None, ge=1)
    model_variant: Literal["fp32", "int8", "fp16"] = Field(
        "fp32",
        description="which card in model_dir: model.toml (fp32), model.int8.toml (CPU) or model.fp16.toml (GPU)",
    )
    batch_max_size: int = Field(
        1,
        ge=1,
        description="micro-batching: up to this many concurrent images per model call; 1 = no batching "
        "(the CPU default). Batches only fill with triage_workers >= batch_max_size",
    )
    batch_max_wait_ms: float = Field(
        5.0, ge=0, description="micro-batching: how long the first image of a batch waits for others"
    )
    triage_workers: int = Field(1, ge=0, description="0 = store only; jobs wait in the queue")
    triage_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="scheduling niceness of the triage worker threads (Linux, per thread): the gateway "
        "acknowledges images first while triage catches up; 0 = same priority as the gateway",
    )
    j2k_reduced_decode: bool = Field(
        True,
        description="decode JPEG 2000 images for the model only down to the resolution it needs "
        "(twice its input size; a 2800 px detector image ~10x faster). The viewer's first view always does so",
    )
    max_frame_megapixels: float = Field(
        64.0,
        gt=0,
        description="largest image (Rows x Columns, in millions of pixels) the worker and the viewer decode; "
        "a larger one (or a compressed stream declaring one) is stored but never decoded: triage fails with "
        "that reason and the viewer says so. 64 = 8000 x 8000",
    )
    triage_modalities: list[str] = Field(["CR", "DX"])
    triage_body_parts: list[str] = Field(["CHEST"])
    max_job_attempts: int = Field(3, ge=1)

    # DICOM TLS (PS3.15 B.1) and operators' metrics
    dicom_tls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="port of the DICOM TLS listener (often 2762); unset = no TLS listener",
    )
    dicom_plain_enabled: bool = Field(
        True, description="false = no plain (unencrypted) listener on dicom_port: TLS only"
    )
    dicom_tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain) of the TLS listener"
    )
    dicom_tls_key_file: Path | None = Field(None, description="PEM private key of dicom_tls_cert_file")
    dicom_tls_ca_file: Path | None = Field(
        None,
        description="PEM CA certificate(s) that sign the stations' client certificates; unset = none asked for",
    )
    dicom_tls_require_client_cert: bool = Field(
        True,
        description="with dicom_tls_ca_file: a peer without a client certificate of that CA fails the TLS handshake "
        "(false: a certificate is asked for but optional)",
    )
    metrics_enabled: bool = Field(
        True, description="serve Prometheus metrics at /metrics (admin login or token)"
    )

    # Delivery to PACS destinations (dicom_sender/; destinations also via `xray-triage destinations add`)
    destinations: list[DestinationSettings] = Field([], description="[[destinations]] tables: PACS peers")
    delivery_retry_initial_s: float = Field(
        5.0, gt=0, description="first wait after a failed send to a destination; doubles per failure in a row"
    )
    delivery_retry_max_s: float = Field(
        300.0, gt=0, description="longest wait between retries (never gives up)"
    )
    delivery_batch_size: int = Field(50, ge=1, le=500, description="objects sent per association")
    delivery_poll_s: float = Field(
        2.0,
        gt=0,
        description="how often senders look for new destinations and queue rows written by other processes",
    )
    delivery_timeout_s: float = Field(30.0, gt=0, description="ACSE, DIMSE and network timeout of the sender")
    destination_failing_degraded_s: float = Field(
        900.0,
        ge=0,
        description="/healthz says degraded when a destination has been failing for longer than this",
    )
    delivery_tls_ca_file: Path | None = Field(
        None,
        description="CA bundle that TLS destinations' certificates are checked against (default: the system's)",
    )
    delivery_tls_cert_file: Path | None = Field(
        None, description="our client certificate for TLS destinations (PEM)"
    )
    delivery_tls_key_file: Path | None = Field(
        None, description="its private key (PEM); default: in the certificate file"
    )

    # Query/retrieve (C-FIND / C-MOVE / C-GET on the DICOM port) and FHIR
    query_retrieve: bool = Field(
        True,
        description="offer Study Root C-FIND, C-MOVE and C-GET on the DICOM port (a station sees only its own studies)",
    )
    qr_all_stations_ae_titles: list[str] = Field(
        [],
        description="calling AE titles (registered as stations too, e.g. the hospital PACS) whose C-FIND, "
        "C-MOVE and C-GET see every station's studies",
    )
    qr_max_matches: int = Field(
        5000,
        ge=1,
        description="C-FIND: a query with more matches is refused with 0xA700 (Out of resources); narrow it",
    )
    fhir_max_count: int = Field(
        100, ge=1, le=1000, description="most entries in one FHIR search Bundle (_count is capped to it)"
    )

    # DICOMweb (/dicomweb: QIDO-RS, WADO-RS, STOW-RS)
    dicomweb_max_results: int = Field(
        1000,
        ge=1,
        description="most results one QIDO-RS search returns (a larger limit is capped; page with offset)",
    )
    dicomweb_max_stow_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="largest STOW-RS request body (all instances together)"
    )
    dicomweb_stow_ae: str = Field(
        "DICOMWEB", max_length=16, description="station AE title STOW-RS uploads by admins are filed under"
    )

    # Results as DICOM (xray_triage/results/): AI SR + GSPS, specialist GSPS, consult SR
    results_enabled: bool = Field(
        True,
        description="make the DICOM result objects (AI SR and GSPS, marks GSPS, consult SR) and file them",
    )
    uid_root: str = Field(
        "",
        max_length=40,
        pattern=r"^([0-9]+(\.[0-9]+)*)?$",
        description="UID root (digits and dots, at most 40 characters) under which the server makes the UIDs "
        "of its objects; empty: pydicom's root 1.2.826.0.1.3680043.8.498",
    )

    # Process roles and several processes on one database (README "Several processes")
    roles: str = Field(
        "gateway,worker,web",
        description="what this `serve` process runs, comma-separated: gateway (DICOM), worker (triage), "
        "web (HTTP). Several processes share database_url and data_dir (shared storage)",
    )
    gateway_processes: int = Field(
        1,
        ge=1,
        description="processes receiving DICOM on the same port(s) (SO_REUSEPORT; Linux spreads incoming "
        "associations over them): the gateway process starts gateway_processes - 1 receiver processes. "
        "For a central server that many stations send to at once, or an edge flushing a backlog; "
        "recommended: the number of CPU cores. Association limits (max_associations...) count per process",
    )
    job_lease_s: float = Field(
        60.0,
        gt=0,
        description="a claimed triage job is held this long and renewed every third of it while its worker "
        "lives; a job whose lease ran out (its worker died) is taken over by another worker",
    )
    leftover_grace_s: float = Field(
        3600.0,
        ge=0,
        description="start-up clean-up removes unreferenced files (and .part files) only when older than this, "
        "so files another process is writing or about to commit are never deleted",
    )

    # Logging
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    log_format: str = Field("text", pattern="^(text|json)$")

    @field_validator("log_level")
    @classmethod
    def _log_level_ok(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; use one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("ae_title")
    @classmethod
    def _ae_title_ok(cls, value: str) -> str:
        value = value.strip()
        if not value or "\\" in value or not value.isascii():
            raise ValueError("AE title must be 1-16 ASCII characters without backslash")
        return value

    @field_validator("ohif_url")
    @classmethod
    def _ohif_url_ok(cls, value: str | None) -> str | None:
        # it becomes a link's href on every study page: a path on this site or an http(s) address only
        if value is None or value.strip() == "":
            return None
        value = value.strip()
        if not (
            value.startswith(("http://", "https://"))
            or (value.startswith("/") and not value.startswith("//"))
        ):
            raise ValueError("ohif_url must be a path on this site ('/ohif') or an http(s):// address")
        return value

    @field_validator("default_character_set")
    @classmethod
    def _character_set_ok(cls, value: str) -> str:
        from xray_triage.store.charset import python_codec

        python_codec(value)  # ValueError says what is accepted
        return value.strip()

    @field_validator("roles")
    @classmethod
    def _roles_ok(cls, value: str) -> str:
        roles = [r.strip().lower() for r in value.split(",") if r.strip()]
        unknown = [r for r in roles if r not in ROLES]
        if not roles or unknown:
            raise ValueError(f"roles must be a comma-separated subset of {','.join(ROLES)} (got {value!r})")
        return ",".join(r for r in ROLES if r in roles)

    @property
    def role_set(self) -> frozenset[str]:
        """The roles of this process: a subset of ``ROLES``."""
        return frozenset(self.roles.split(","))

    @model_validator(mode="after")
    def _slots_ok(self) -> Settings:
        if self.reserved_station_associations >= self.max_associations:
            raise ValueError("reserved_station_associations must be smaller than max_associations")
        return self

    @model_validator(mode="after")
    def _tls_ok(self) -> Settings:
        if self.dicom_tls_port is not None and (
            self.dicom_tls_cert_file is None or self.dicom_tls_key_file is None
        ):
            raise ValueError("dicom_tls_port needs dicom_tls_cert_file and dicom_tls_key_file")
        if not self.dicom_plain_enabled and self.dicom_tls_port is None:
            raise ValueError(
                "dicom_plain_enabled = false needs dicom_tls_port (the gateway would not listen at all)"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'xray-triage.db').resolve()}"

    @property
    def ohif_link_base(self) -> str | None:
        """OHIF's address for the study page's link: ``ohif_url``, else ``/ohif`` when served here."""
        if self.ohif_url:
            return self.ohif_url.rstrip("/")
        return "/ohif" if self.ohif_dist_dir is not None else None

    @property
    def max_frame_pixels(self) -> int:
        """``max_frame_megapixels`` in pixels."""
        return int(self.max_frame_megapixels * 1_000_000)

    @property
    def dicom_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is the class's model_config["toml_file"]; load_settings sets it.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


class SettingsError(ValueError):
    """Configuration is missing or invalid; the message names the file and key."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a TOML file (optional), the environment and CLI overrides."""
    import tomllib

    from pydantic import ValidationError

    config_file = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    settings_cls = Settings
    if config_file is not None:
        if not Path(config_file).is_file():
            raise SettingsError(f"{config_file}: configuration file not found")
        settings_cls = type(
            "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}}
        )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return settings_cls(**overrides)
    except tomllib.TOMLDecodeError as exc:  # one line naming the file and the place, not a traceback
        raise SettingsError(f"{config_file}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        where = str(config_file) if config_file else "environment"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid settings ({where}): {problems}") from exc
