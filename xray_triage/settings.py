"""One typed settings object for the whole server.

Sources, highest priority first:
1. values given in code (CLI flags such as ``--dicom-port``),
2. environment variables ``XRAY_TRIAGE_<NAME>`` (e.g. ``XRAY_TRIAGE_DATA_DIR``),
3. the TOML file from ``--config FILE`` or ``XRAY_TRIAGE_CONFIG`` (top-level keys),
4. the defaults below: SQLite and local files under the data directory, the
   model shipped in ``models/default``, CPU unless a GPU build sees a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = PROJECT_ROOT / "models" / "default"
CONFIG_ENV = "XRAY_TRIAGE_CONFIG"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XRAY_TRIAGE_", extra="forbid", validate_default=True)

    # Storage
    data_dir: Path = Field(Path("xray-triage-data"), description="DICOM files, database, logs")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")

    # DICOM gateway
    ae_title: str = Field("XRAY_TRIAGE", max_length=16)
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=0, le=65535)
    accept_unknown_stations: bool = False
    max_associations: int = Field(32, ge=1)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu: int = Field(0, ge=0, description="0 = unlimited")
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
        1.0, gt=0, description="first wait of a user name's back-off; doubles with each further failure, at most login_lockout_s"
    )
    login_ipv6_prefix: int = Field(64, ge=32, le=128, description="IPv6 addresses count as one network per this prefix")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="largest request body the web app accepts")
    default_language: Literal["vi", "en"] = "vi"
    default_timezone: str = "Asia/Ho_Chi_Minh"
    render_cache_images: int = Field(4, ge=0, description="decoded images kept in memory for the viewer")
    live_poll_s: float = Field(1.0, gt=0, description="how often the live-update poller looks for changes (one poll for all streams)")
    live_max_streams_per_session: int = Field(
        6, ge=1, description="open live-update streams (/events) one browser login may hold; more answer 429"
    )
    live_max_streams_per_user: int = Field(
        12, ge=1, description="open live-update streams one user may hold over all logins; more answer 429"
    )
    worklist_page_size: int = Field(50, ge=1, le=500, description="worklist rows per page (and the JSON API's default limit)")

    # Model and triage
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="directory (or .toml card) of the model")
    providers: list[str] | None = Field(None, description="ONNX Runtime providers; default CUDA if present, else CPU")
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
    j2k_reduced_decode: bool = Field(
        True,
        description="decode JPEG 2000 images for the model only down to the resolution it needs "
        "(twice its input size; a 2800 px detector image ~10x faster). The viewer's first view always does so",
    )
    triage_modalities: list[str] = Field(["CR", "DX"])
    triage_body_parts: list[str] = Field(["CHEST"])
    max_job_attempts: int = Field(3, ge=1)

    # Logging
    log_level: str = "INFO"
    log_format: str = Field("text", pattern="^(text|json)$")

    @field_validator("ae_title")
    @classmethod
    def _ae_title_ok(cls, value: str) -> str:
        value = value.strip()
        if not value or "\\" in value or not value.isascii():
            raise ValueError("AE title must be 1-16 ASCII characters without backslash")
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'xray-triage.db').resolve()}"

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
    from pydantic import ValidationError

    config_file = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    settings_cls = Settings
    if config_file is not None:
        if not Path(config_file).is_file():
            raise SettingsError(f"{config_file}: configuration file not found")
        settings_cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        where = str(config_file) if config_file else "environment"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid settings ({where}): {problems}") from exc
