"""Settings from ``FORECOURT_*`` environment variables and an optional TOML file.

The TOML file is ``forecourt.toml`` in the working directory or the path in
``FORECOURT_CONFIG``; environment variables win over the file. HQ settings live at the top
level of the file, edge settings under ``[edge]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

KNOWN_SERVICES = ("network", "sales")


def _config_file() -> Path:
    return Path(os.environ.get("FORECOURT_CONFIG", "forecourt.toml"))


class _TomlSettings(BaseSettings):
    toml_table: ClassVar[str | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003 - not used: env + TOML only
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file()
        if path.is_file():
            header = (cls.toml_table,) if cls.toml_table else None
            sources.append(
                TomlConfigSettingsSource(settings_cls, toml_file=path, toml_table_header=header)
            )
        return tuple(sources)


class Settings(_TomlSettings):
    """Head office (HQ) settings."""

    model_config = SettingsConfigDict(env_prefix="FORECOURT_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///var/forecourt-hq.db"
    bus_url: str = "memory://"
    host: str = "127.0.0.1"
    port: int = 8400
    services: list[str] = Field(default_factory=lambda: list(KNOWN_SERVICES))
    log_level: str = "INFO"
    log_json: bool = True
    relay: bool = True  # run the outbox relay in this process (off in HTTP-only workers)
    relay_batch_size: int = 500
    relay_idle_seconds: float = 0.05
    relay_vacuum_every: int = 20_000  # PostgreSQL: vacuum the outbox after this many rows
    relay_lanes: int = 2  # PostgreSQL: claim–publish–delete loops side by side
    nats_stream: str = "FORECOURT"
    nats_subject_prefix: str | None = None  # e.g. per environment sharing one NATS server
    workers: int = 1  # HTTP worker processes (PostgreSQL only when more than one)
    ingest_concurrency: int = 2  # uploads processed at once per process (first come first served)

    @field_validator("services", mode="before")
    @classmethod
    def _split_services(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        unknown = sorted(set(value) - set(KNOWN_SERVICES))
        if unknown:
            raise ValueError(f"unknown services {unknown}; known: {', '.join(KNOWN_SERVICES)}")
        return value


class EdgeSettings(_TomlSettings):
    """Edge node settings (one process per station)."""

    model_config = SettingsConfigDict(env_prefix="FORECOURT_EDGE_", extra="ignore")
    toml_table: ClassVar[str | None] = "edge"

    station: str
    hq_url: str = "http://127.0.0.1:8400"
    credential: SecretStr
    journal_path: Path = Path("var/edge.db")
    controller_url: str = "http://127.0.0.1:8500"
    controller_user: str = "admin"
    controller_password: SecretStr = SecretStr("admin")
    controller_volume_decimals: int = 2
    controller_amount_decimals: int = 2
    controller_price_decimals: int = 2
    controller_auth: Literal["auto", "basic", "digest"] = "auto"  # the device offers either
    host: str = "127.0.0.1"
    port: int = 8401
    poll_interval_s: float = 0.1
    snapshot_refresh_s: float = 30.0
    sync_batch_size: int = 200
    sync_backoff_initial_s: float = 0.2
    sync_backoff_max_s: float = 30.0
    outbox_budget_bytes: int = 512 * 1024 * 1024
    outbox_alarm_ratios: list[float] = Field(default_factory=lambda: [0.5, 0.8])
    # Journal on disk (main file + WAL) alarms at outbox_alarm_ratios of this; None: the
    # outbox budget. Free space below min_free_disk_bytes alarms and runs retention early.
    journal_budget_bytes: int | None = Field(default=None, ge=0)
    min_free_disk_bytes: int = Field(default=1024**3, ge=0)
    # Settled sales HQ has answered leave the journal for the archive after retention_days
    # (on journaled_at); None as archive_dir: "<journal_path>.archive/".
    retention_days: int = Field(default=90, ge=1)
    archive_dir: Path | None = None
    retention_interval_s: float = Field(default=3600.0, gt=0)
    retention_batch_rows: int = Field(default=10_000, ge=1)
    auto_settle: bool = True
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("credential")
    @classmethod
    def _no_default_secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16 or value.get_secret_value() in {"changeme"}:
            raise ValueError("the station credential must be a real secret (16+ characters)")
        return value
