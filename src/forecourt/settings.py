"""Settings from ``FORECOURT_*`` environment variables and an optional TOML file.

The TOML file is ``forecourt.toml`` in the working directory or the path in
``FORECOURT_CONFIG``; environment variables win over the file. HQ settings live at the top
level of the file, edge settings under ``[edge]``. :func:`load_settings` turns any problem
(a missing or invalid value, an unreadable file) into one :class:`SettingsInvalid` that names
the setting, where its value came from and what to do.

``environment = "production"`` (``FORECOURT_ENVIRONMENT``, ``FORECOURT_EDGE_ENVIRONMENT``)
refuses, on top of that, the defaults and placeholders that are fine on a developer's machine
and with the simulators but must never reach a station or head office: a default controller
password, a placeholder in a database or broker URL, plain HTTP to a remote HQ, cheap password
hashing, long-lived access tokens (see docs/security.md, "Production settings").
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from forecourt.kernel.errors import ForecourtError

KNOWN_SERVICES = ("network", "sales", "devices", "identity", "audit", "payments")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "sqlite", "sqlite+aiosqlite")
BUS_SCHEMES = ("memory", "nats")
CONFIG_ENV = "FORECOURT_CONFIG"

Environment = Literal["development", "production"]
# Secrets that are someone's default or an example, never a real one; compared lowercased.
# A production deployment refuses them (and secrets that only repeat one of them).
PLACEHOLDER_SECRETS: frozenset[str] = frozenset(
    {
        "",
        "admin",
        "administrator",
        "password",
        "passwd",
        "pass",
        "passw0rd",
        "password1",
        "1234",
        "12345",
        "123456",
        "1234567",
        "12345678",
        "123456789",
        "0000",
        "qwerty",
        "letmein",
        "changeme",
        "change-me",
        "change_me",
        "changeit",
        "default",
        "secret",
        "pts",
        "root",
        "toor",
        "test",
        "guest",
        "user",
        "demo",
        "example",
        "postgres",
        "mosquitto",
        "nats",
        "forecourt",
    }
)
DEFAULT_CONTROLLER_PASSWORD = "admin"  # the PTS-2's factory login (and the simulator's)
MIN_CONTROLLER_PASSWORD_LENGTH = 8
# OWASP's minimum for argon2id (19 MiB, 2 passes); access tokens are short-lived.
PRODUCTION_ARGON2_MIN_TIME_COST = 2
PRODUCTION_ARGON2_MIN_MEMORY_KIB = 19_456
PRODUCTION_MAX_ACCESS_TOKEN_S = 3600.0


class SettingsInvalid(ForecourtError):
    """A setting is missing or unusable, or the settings file cannot be read.

    ``setting`` names it as an operator writes it (``FORECOURT_EDGE_CREDENTIAL``,
    ``--port``, ``forecourt.toml [edge] port``); ``message`` is one line with a hint.
    """

    code = "settings.invalid"

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(message, setting=setting)
        self.setting = setting


def _config_file() -> Path:
    named = os.environ.get(CONFIG_ENV)
    if named is not None and not Path(named).is_file():
        # An explicit file that is not there is a mistake, not a wish for the defaults.
        raise SettingsInvalid(
            f"{CONFIG_ENV} names {named}, which is not a readable file — fix the path or "
            f"unset {CONFIG_ENV} (then ./forecourt.toml is read, if present)",
            setting=CONFIG_ENV,
        )
    return Path(named or "forecourt.toml")


def _list_of_text(value: Any) -> Any:
    """A list from the environment: comma-separated (``network,sales``) or JSON
    (``["network", "sales"]``); TOML and Python give lists already."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_placeholder(secret: str) -> bool:
    """A default or example secret (:data:`PLACEHOLDER_SECRETS`), in any letter case."""
    return secret.strip().lower() in PLACEHOLDER_SECRETS


def _repeats_placeholder(secret: str) -> bool:
    """A placeholder, one character repeated (``aaaa…``) or a placeholder repeated
    (``changemechangeme``, ``1234123412341234``): a secret nobody generated."""
    text = secret.strip().lower()
    if text in PLACEHOLDER_SECRETS:
        return True
    for period in range(1, len(text) // 2 + 1):
        if len(text) % period == 0 and text[:period] * (len(text) // period) == text:
            return period == 1 or text[:period] in PLACEHOLDER_SECRETS
    return False


def _weak_password(password: str) -> str | None:
    """Why a device password is not one (``is empty``, ...), None when it may be one."""
    if not password:
        return "is empty"
    if is_placeholder(password):
        return "is a default or placeholder password"
    if len(password) < MIN_CONTROLLER_PASSWORD_LENGTH:
        return f"is shorter than {MIN_CONTROLLER_PASSWORD_LENGTH} characters"
    return None


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _url_passwords(url: str) -> Iterator[str]:
    """The passwords a URL carries (``user:PASSWORD@``, ``?password=``); several
    comma-separated URLs (a NATS cluster) each."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    for one in (part.strip() for part in url.split(",")):
        if not one:
            continue
        try:
            parsed = make_url(one)
        except (ArgumentError, ValueError):
            try:
                password = urlsplit(one).password
            except ValueError:
                continue
            if password is not None:
                yield password
            continue
        if parsed.password is not None:
            yield str(parsed.password)
        query = parsed.query.get("password")
        yield from (query,) if isinstance(query, str) else query or ()


@dataclass(frozen=True)
class Refusal:
    """One setting a production deployment does not accept: ``env`` names it,
    ``problem`` says what is wrong (without the secret), ``hint`` what to do."""

    field: str
    env: str
    problem: str
    hint: str


class ProductionRefused(ValueError):
    """Raised by the settings' production check; one line naming the first refused setting
    by its environment variable (and how many more there are)."""

    def __init__(self, refusals: Iterable[Refusal]) -> None:
        self.refusals = tuple(refusals)
        super().__init__(self.line())

    def line(self, where: str | None = None) -> str:
        """The message, naming the first setting as ``where`` (default: its variable)."""
        first, rest = self.refusals[0], self.refusals[1:]
        more = f" (and {len(rest)} more: {', '.join(r.env for r in rest)})" if rest else ""
        return f"{where or first.env} {first.problem}{more} — {first.hint}"


def _environment_name(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


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

    # hide_input_in_errors: a check across the settings sees them all (secrets, URLs with
    # passwords); the one-line message says what is wrong without them.
    model_config = SettingsConfigDict(
        env_prefix="FORECOURT_", extra="ignore", hide_input_in_errors=True
    )

    # production: refuse default and placeholder secrets and weak settings (docs/security.md)
    environment: Environment = "development"
    database_url: str = "sqlite+aiosqlite:///var/forecourt-hq.db"
    bus_url: str = "memory://"
    host: str = "127.0.0.1"
    port: int = Field(default=8400, ge=0, le=65535)
    # NoDecode: the environment gives "network,sales" (what --services takes), not JSON.
    services: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(KNOWN_SERVICES))
    log_level: str = "INFO"
    log_json: bool = True
    relay: bool = True  # run the outbox relay in this process (off in HTTP-only workers)
    relay_batch_size: int = 500
    relay_idle_seconds: float = 0.05
    relay_vacuum_every: int = 20_000  # PostgreSQL: vacuum the outbox after this many rows
    relay_lanes: int = 2  # PostgreSQL: claim–publish–delete loops side by side
    nats_stream: str = "FORECOURT"
    nats_subject_prefix: str | None = None  # e.g. per environment sharing one NATS server
    workers: int = Field(default=1, ge=1, le=64)  # HTTP processes (PostgreSQL when more than 1)
    ingest_concurrency: int = 2  # uploads processed at once per process (first come first served)
    # Request limits: a larger body is refused (413) as it streams in (a 5 000-sale v2 batch
    # is about 3.1 MiB, 16 MiB with every text at its maximum length); JSON nested deeper is
    # refused (422) before a recursive parser sees it (a valid batch nests 4 deep).
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    max_json_depth: int = Field(default=32, ge=8, le=200)
    # Consumers this process hosts: names, "default" (every consumer registered as default)
    # or "none" (an HTTP-only worker; ``forecourt worker`` hosts them instead).
    consumers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["default"])
    consumer_ack_wait_s: float = Field(default=30.0, gt=0)  # unsettled → delivered again
    inbox_retention_days: float = Field(default=14.0, gt=0)  # > the stream's max age
    dead_letter_retention_days: float = Field(default=90.0, gt=0)
    consumer_pending_alarm: int = Field(default=100_000, ge=1)
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)  # forecourt worker
    # The JetStream stream (created, or updated to these, on connect). discard: new — a full
    # stream refuses new events (the relay backs off and alarms) rather than dropping old ones.
    nats_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    nats_max_bytes: int = Field(default=1024**3, ge=-1)
    nats_max_msgs: int = Field(default=-1, ge=-1)
    nats_replicas: int = Field(default=1, ge=1, le=5)  # 3 on a three-node cluster
    nats_duplicate_window_s: float = Field(default=120.0, gt=0)
    # Device telemetry (the devices context): the MQTT broker HQ subscribes to
    # (mqtt://host:1883, mqtts://host:8883, unix:///path/to/socket; None: no subscriber),
    # its login, the topic prefix, when a silent station is stale, history kept per pump/tank.
    devices_mqtt_url: str | None = Field(default=None, pattern=r"^(mqtts?://[^/]+/?|unix:///.+)$")
    devices_mqtt_username: str | None = None
    devices_mqtt_password: SecretStr | None = None
    devices_mqtt_client_id: str = Field(default="forecourt-hq-devices", min_length=1, max_length=64)
    devices_telemetry_prefix: str = Field(default="forecourt/v1", pattern=r"^[^#+\x00]+[^/]$")
    devices_stale_after_s: float = Field(default=120.0, gt=0)
    devices_history_limit: int = Field(default=500, ge=1, le=100_000)
    # Station credentials (docs/security.md): issued ones expire after this many days (None:
    # never); a rotation keeps the old ones valid for the grace period; failed credentials
    # per source and minute before 429; credentials found valid kept in a bounded cache.
    station_credential_valid_days: int | None = Field(default=None, ge=1, le=3650)
    station_credential_grace_s: float = Field(default=86_400.0, ge=0, le=30 * 86_400)
    station_auth_failures_per_minute: int = Field(default=30, ge=1, le=100_000)
    station_credential_cache_size: int = Field(default=10_000, ge=1, le=10_000_000)
    station_credential_cache_s: float = Field(default=300.0, ge=0, le=86_400)
    # Staff identity (docs/security.md). Access tokens (signed, by key id) live this long;
    # a refresh token this long, each use rotating it (a reused one revokes its family);
    # passwords are hashed with argon2id at these costs; an account locks for
    # identity_lockout_s after identity_lockout_failures failed sign-ins in a row; failed
    # sign-ins or tokens per source and minute before 429.
    identity_issuer: str = Field(default="forecourt", min_length=1, max_length=200)
    identity_audience: str = Field(default="forecourt", min_length=1, max_length=200)
    identity_access_token_s: float = Field(default=300.0, ge=10, le=86_400)
    identity_refresh_token_s: float = Field(default=12 * 3600.0, ge=60, le=90 * 86_400)
    identity_argon2_time_cost: int = Field(default=3, ge=1, le=20)
    identity_argon2_memory_kib: int = Field(default=65_536, ge=8, le=4 * 1024 * 1024)
    identity_lockout_failures: int = Field(default=5, ge=1, le=1000)
    identity_lockout_s: float = Field(default=900.0, ge=1, le=86_400)
    identity_failures_per_minute: int = Field(default=30, ge=1, le=100_000)
    identity_min_password_length: int = Field(default=12, ge=8, le=256)
    # The audit trail (docs/security.md): waiting records are chained this often where the
    # relay runs; a signed checkpoint of the chain's head every so many records or seconds.
    audit_chain_interval_s: float = Field(default=0.5, gt=0, le=60)
    audit_checkpoint_every: int = Field(default=10_000, ge=1)
    audit_checkpoint_interval_s: float = Field(default=60.0, gt=0)
    # An Ed25519 private key (PEM) the checkpoints are signed with, kept out of the database
    # (only its public key is stored); None: a key made and kept in the database.
    audit_signing_key_file: Path | None = None
    # /metrics: a scraper's credential (metrics:read, a service account) unless open (only
    # on a bind address nobody else reaches).
    metrics_open: bool = False
    # Payments (the payments context): WeChat Pay (API v3, a direct merchant) when
    # payments_wechat_mchid is set, Alipay when payments_alipay_app_id is set; keys are read
    # from PEM files kept out of the database. A code payment whose payer must still confirm
    # is polled for payments_confirm_wait_s before the counter is answered 202 (pending);
    # the recovery worker then polls until payments_pending_deadline_s after it started
    # and reverses it; an unanswered charge is queried with backoff (from
    # payments_recheck_s up to payments_recheck_max_s) and reversed after
    # payments_unknown_deadline_s.
    payments_wechat_mchid: str | None = Field(default=None, min_length=1, max_length=32)
    payments_wechat_appid: str | None = Field(default=None, min_length=1, max_length=32)
    payments_wechat_base_url: str = "https://api.mch.weixin.qq.com"
    payments_wechat_merchant_serial_no: str | None = Field(default=None, max_length=64)
    payments_wechat_merchant_key_file: Path | None = None
    payments_wechat_apiv3_key: SecretStr | None = None
    payments_wechat_platform_certificate_file: Path | None = None
    payments_wechat_platform_public_key_id: str | None = Field(default=None, max_length=64)
    payments_wechat_platform_public_key_file: Path | None = None
    payments_wechat_notify_url: str | None = None
    payments_wechat_timeout_s: float = Field(default=10.0, gt=0, le=60)
    payments_alipay_app_id: str | None = Field(default=None, min_length=1, max_length=32)
    payments_alipay_gateway_url: str = "https://openapi.alipay.com/gateway.do"
    payments_alipay_app_key_file: Path | None = None
    payments_alipay_public_key_file: Path | None = None
    payments_alipay_seller_id: str | None = Field(default=None, max_length=32)
    payments_alipay_notify_url: str | None = None
    payments_alipay_timeout_s: float = Field(default=10.0, gt=0, le=60)
    payments_confirm_wait_s: float = Field(default=5.0, ge=0, le=60)
    payments_poll_interval_s: float = Field(default=1.0, gt=0, le=30)
    payments_pending_deadline_s: float = Field(default=120.0, gt=0, le=3600)
    payments_unknown_deadline_s: float = Field(default=300.0, gt=0, le=86_400)
    payments_recheck_s: float = Field(default=2.0, gt=0, le=600)
    payments_recheck_max_s: float = Field(default=60.0, gt=0, le=3600)
    payments_recovery_interval_s: float = Field(default=1.0, gt=0, le=600)
    # A provider's "no such trade" is believed only this long after the order was made (a
    # charge that timed out may still land): longer than the providers' time-outs.
    payments_not_found_grace_s: float = Field(default=60.0, ge=0, le=3600)

    @field_validator("consumers", mode="before")
    @classmethod
    def _split_consumers(cls, value: Any) -> Any:
        value = _list_of_text(value)
        if isinstance(value, list) and not value:
            return ["none"]
        return value

    @field_validator("services", mode="before")
    @classmethod
    def _split_services(cls, value: Any) -> Any:
        value = _list_of_text(value)
        if not isinstance(value, list):
            return value  # pydantic says what is wrong with it
        if not value:
            raise ValueError(f"name at least one service of: {', '.join(KNOWN_SERVICES)}")
        unknown = sorted(set(value) - set(KNOWN_SERVICES))
        if unknown:
            raise ValueError(
                f"unknown service {', '.join(unknown)}; known: {', '.join(KNOWN_SERVICES)}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if _scheme(value) not in DATABASE_SCHEMES:
            raise ValueError(
                "not a database URL Forecourt can use "
                "(postgresql://user@host/db or sqlite:///path/file.db)"
            )
        return value

    @field_validator("bus_url")
    @classmethod
    def _known_bus(cls, value: str) -> str:
        if _scheme(value) not in BUS_SCHEMES:
            raise ValueError("not a bus URL (memory:// or nats://host:4222)")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return _log_level(value)

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, value: Any) -> Any:
        return _environment_name(value)

    @model_validator(mode="after")
    def _production_ready(self) -> Settings:
        if self.environment == "production":
            refusals = list(self.production_refusals())
            if refusals:
                raise ProductionRefused(refusals)
        return self

    def production_refusals(self) -> Iterator[Refusal]:
        """What ``environment = "production"`` refuses in these settings (any environment)."""
        production = "refused in production (FORECOURT_ENVIRONMENT=production)"
        for field, what in (("database_url", "database"), ("bus_url", "bus")):
            if any(is_placeholder(p) for p in _url_passwords(getattr(self, field))):
                yield Refusal(
                    field,
                    _env_name(type(self), field),
                    f"holds a default or placeholder {what} password, {production}",
                    f"give the {what} user a generated password and put that in the URL",
                )
        if self.devices_mqtt_password is not None and is_placeholder(
            self.devices_mqtt_password.get_secret_value()
        ):
            yield Refusal(
                "devices_mqtt_password",
                "FORECOURT_DEVICES_MQTT_PASSWORD",
                f"is a default or placeholder password, {production}",
                "give HQ's broker login a generated password (on the broker and here)",
            )
        if self.identity_argon2_time_cost < PRODUCTION_ARGON2_MIN_TIME_COST:
            yield Refusal(
                "identity_argon2_time_cost",
                "FORECOURT_IDENTITY_ARGON2_TIME_COST",
                f"is {self.identity_argon2_time_cost}, below argon2id's minimum of "
                f"{PRODUCTION_ARGON2_MIN_TIME_COST} passes, {production}",
                f"set it to {PRODUCTION_ARGON2_MIN_TIME_COST} or more (default 3), or unset it",
            )
        if self.identity_argon2_memory_kib < PRODUCTION_ARGON2_MIN_MEMORY_KIB:
            yield Refusal(
                "identity_argon2_memory_kib",
                "FORECOURT_IDENTITY_ARGON2_MEMORY_KIB",
                f"is {self.identity_argon2_memory_kib}, below argon2id's minimum of "
                f"{PRODUCTION_ARGON2_MIN_MEMORY_KIB} KiB, {production}",
                f"set it to {PRODUCTION_ARGON2_MIN_MEMORY_KIB} or more (default 65536), "
                "or unset it",
            )
        if self.identity_access_token_s > PRODUCTION_MAX_ACCESS_TOKEN_S:
            yield Refusal(
                "identity_access_token_s",
                "FORECOURT_IDENTITY_ACCESS_TOKEN_S",
                f"is {self.identity_access_token_s:g} s, longer than an access token may "
                f"live ({PRODUCTION_MAX_ACCESS_TOKEN_S:g} s), {production}",
                "keep access tokens short (default 300) and sessions long with "
                "FORECOURT_IDENTITY_REFRESH_TOKEN_S",
            )


class DeviceLine(BaseModel):
    """One device line of a station (``[[edge.devices]]``): which driver, where, for what.

    ``pumps`` maps a station fuelling-point number to the protocol's address for it (a list
    means the same numbers on both sides); ``tanks`` likewise for a gauge. ``options`` are the
    driver's own settings (see docs/devices.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
    protocol: str = Field(min_length=1, max_length=40)
    transport: str = Field(min_length=1, max_length=400)
    pumps: dict[int, int] = Field(default_factory=dict)
    tanks: dict[int, int] = Field(default_factory=dict)
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("pumps", "tanks", mode="before")
    @classmethod
    def _list_is_identity(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {n: n for n in value}
        return value

    @field_validator("pumps", "tanks")
    @classmethod
    def _positive(cls, value: dict[int, int]) -> dict[int, int]:
        if any(k < 1 or v < 0 for k, v in value.items()):
            raise ValueError("station numbers start at 1 and addresses are not negative")
        if len(set(value.values())) != len(value):
            raise ValueError("two station numbers map to one device address")
        return value


class EdgeSettings(_TomlSettings):
    """Edge node settings (one process per station)."""

    model_config = SettingsConfigDict(
        env_prefix="FORECOURT_EDGE_", extra="ignore", hide_input_in_errors=True
    )
    toml_table: ClassVar[str | None] = "edge"

    station: str
    # production: refuse default and placeholder secrets, plain HTTP to HQ (docs/security.md)
    environment: Environment = "development"
    hq_url: str = "http://127.0.0.1:8400"
    credential: SecretStr
    journal_path: Path = Path("var/edge.db")
    controller_url: str = "http://127.0.0.1:8500"
    controller_user: str = "admin"
    controller_password: SecretStr = SecretStr(DEFAULT_CONTROLLER_PASSWORD)
    controller_volume_decimals: int = 2
    controller_amount_decimals: int = 2
    controller_price_decimals: int = 2
    controller_auth: Literal["auto", "basic", "digest"] = "auto"  # the device offers either
    host: str = "127.0.0.1"
    port: int = Field(default=8401, ge=0, le=65535)
    poll_interval_s: float = 0.1
    snapshot_refresh_s: float = 30.0
    sync_batch_size: int = 200
    sync_backoff_initial_s: float = 0.2
    sync_backoff_max_s: float = 30.0
    outbox_budget_bytes: int = 512 * 1024 * 1024
    outbox_alarm_ratios: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.5, 0.8]
    )
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
    # Each nozzle's meter is read against the journal this often (and after each sale);
    # prices in force are checked for the pumps that hold their own this often.
    totalizer_check_interval_s: float = Field(default=300.0, gt=0)
    price_check_interval_s: float = Field(default=1.0, gt=0)
    auto_settle: bool = True
    # Pump commands through the edge API (docs/pump-commands.md). terminal_tokens: terminal
    # name -> its secret (Authorization: Bearer <secret>); FORECOURT_EDGE_TERMINAL_TOKENS as
    # JSON ({"till1": "..."}) or till1=SECRET,till2=SECRET. None configured: every command is
    # refused. A preset above a maximum (lowered by the device's own, where it reports one)
    # is refused.
    terminal_tokens: Annotated[dict[str, SecretStr], NoDecode] = Field(default_factory=dict)
    # Read-only credentials, the same way (name -> secret): the station's status, pumps,
    # tanks, journal figures and /metrics, never a command (a scraper, a back-office screen).
    reader_tokens: Annotated[dict[str, SecretStr], NoDecode] = Field(default_factory=dict)
    max_preset_volume_ml: int = Field(default=500_000, ge=1)
    max_preset_amount_minor: int = Field(default=1_000_000, ge=1)
    # Counter payments (POS API, docs/payments.md): a cashier's staff access token is checked
    # here offline against HQ's public keys, fetched from HQ's /v1/auth/keys and kept in the
    # journal's database (a restart without HQ still checks them); staff_keys_file: a JWK Set
    # trusted as well (keys provisioned without HQ). The token's issuer and audience are HQ's;
    # pos_charge_roles: the roles whose holders may take payments (over their grant's scope).
    staff_keys_file: Path | None = None
    staff_keys_refresh_s: float = Field(default=300.0, gt=0)
    staff_token_issuer: str = "forecourt"
    staff_token_audience: str = "forecourt"
    pos_charge_roles: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cashier", "station_manager", "hq_admin"]
    )
    # A call to HQ for a payment gives up after pos_hq_timeout_s (the cashier is told at once:
    # cash still works); an order HQ reports pending is polled up to pos_payment_wait_s.
    pos_hq_timeout_s: float = Field(default=3.0, gt=0, le=60)
    pos_payment_wait_s: float = Field(default=10.0, ge=0, le=120)
    # Cash recorded at the counter goes to HQ in batches, backing off from initial to max.
    pos_cash_batch_size: int = Field(default=100, ge=1, le=500)
    pos_upload_backoff_initial_s: float = Field(default=0.5, gt=0)
    pos_upload_backoff_max_s: float = Field(default=60.0, gt=0)

    @field_validator("pos_charge_roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        return _list_of_text(value)

    @field_validator("terminal_tokens", "reader_tokens", mode="before")
    @classmethod
    def _terminal_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [item.partition("=") for item in text.split(",") if item.strip()]
            if any(not sep or not name.strip() for name, sep, _ in pairs):
                raise ValueError("give terminals as name=secret,name=secret or a JSON object")
            return {name.strip(): secret.strip() for name, _, secret in pairs}
        return value

    @field_validator("terminal_tokens", "reader_tokens")
    @classmethod
    def _real_terminal_secrets(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name):
                raise ValueError(f"terminal name {name!r}: letters, digits, _ . - (1-40)")
            if len(secret.get_secret_value()) < 16:
                raise ValueError(f"terminal {name!r}: its secret must be 16+ characters")
        return value

    log_level: str = "INFO"
    log_json: bool = True
    # The station's devices ([[edge.devices]] in the file; JSON in FORECOURT_EDGE_DEVICES).
    # None: one jsonPTS controller at controller_url with the controller_* settings.
    devices: list[DeviceLine] | None = None
    gauge_interval_s: float = Field(default=60.0, gt=0)  # tank gauges read this often
    # Device telemetry to HQ over MQTT (docs/telemetry.md). mqtt_url None: no telemetry;
    # mqtt://host:1883, mqtts://host:8883 (TLS) or unix:///path/to.sock.
    mqtt_url: str | None = None
    mqtt_username: str | None = Field(default=None, min_length=1, max_length=64)  # None: station
    mqtt_password: SecretStr | None = None  # None: the station credential
    mqtt_ca_file: Path | None = None  # mqtts: the CA of the broker's certificate (None: system)
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)  # the last will fires ~1.5x after
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)  # backoff cap (and refusal)
    telemetry_prefix: str = "forecourt/v1"
    telemetry_pump_deadband_ml: int = Field(default=1000, ge=0)  # fuelling progress: this much
    telemetry_pump_interval_s: float = Field(default=1.0, gt=0, le=3600)  # ... or this often
    telemetry_tank_volume_deadband_ml: int = Field(default=10_000, ge=0)
    telemetry_tank_temperature_deadband_mdegc: int = Field(default=500, ge=0)
    telemetry_tank_water_deadband_um: int = Field(default=1000, ge=0)
    telemetry_tank_heartbeat_s: float = Field(default=300.0, gt=0, le=86_400)
    telemetry_alarm_buffer: int = Field(default=1000, ge=1, le=100_000)  # then oldest dropped

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_address(cls, value: str | None) -> str | None:
        from forecourt.infra.mqtt import BrokerAddress

        if value is None or not value.strip():
            return None  # an empty FORECOURT_EDGE_MQTT_URL turns telemetry off too
        try:
            BrokerAddress.parse(value)
        except ForecourtError as exc:
            raise ValueError(exc.message.removeprefix("mqtt_url: ")) from None
        return value.strip()

    @field_validator("telemetry_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        levels = value.split("/")
        if not value or len(value) > 200 or any(not level for level in levels):
            raise ValueError("a topic prefix is 1-200 characters of non-empty levels (a/b)")
        if any(c in value for c in "+#\0"):
            raise ValueError("a topic prefix has no MQTT wildcard (+, #) or NUL")
        return value

    @field_validator("devices")
    @classmethod
    def _one_device_per_pump(cls, value: list[DeviceLine] | None) -> list[DeviceLine] | None:
        if value is None:
            return value
        names: set[str] = set()
        pumps: dict[int, str] = {}
        tanks: dict[int, str] = {}
        for line in value:
            if line.name in names:
                raise ValueError(f"two devices are named {line.name!r}")
            names.add(line.name)
            for number, owners, what in ((line.pumps, pumps, "pump"), (line.tanks, tanks, "tank")):
                for station_number in number:
                    if station_number in owners:
                        raise ValueError(
                            f"{what} {station_number} is on both {owners[station_number]!r} "
                            f"and {line.name!r}"
                        )
                    owners[station_number] = line.name
        return value

    @field_validator("credential")
    @classmethod
    def _no_default_secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16 or value.get_secret_value() in {"changeme"}:
            raise ValueError("the station credential must be a real secret (16+ characters)")
        return value

    @field_validator("outbox_alarm_ratios", mode="before")
    @classmethod
    def _split_ratios(cls, value: Any) -> Any:
        return _list_of_text(value)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return _log_level(value)

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, value: Any) -> Any:
        return _environment_name(value)

    @model_validator(mode="after")
    def _production_ready(self) -> EdgeSettings:
        if self.environment == "production":
            refusals = list(self.production_refusals())
            if refusals:
                raise ProductionRefused(refusals)
        return self

    @property
    def default_controller_password(self) -> bool:
        """The controller login is the factory one (fine with the simulator only)."""
        return self.controller_password.get_secret_value() == DEFAULT_CONTROLLER_PASSWORD

    def production_refusals(self) -> Iterator[Refusal]:
        """What ``environment = "production"`` refuses in these settings (any environment)."""
        production = "refused in production (FORECOURT_EDGE_ENVIRONMENT=production)"
        weak = _weak_password(self.controller_password.get_secret_value())
        if weak and self.devices is None:  # devices: the controller_* settings are not used
            yield Refusal(
                "controller_password",
                "FORECOURT_EDGE_CONTROLLER_PASSWORD",
                f"{weak}, {production}",
                "give the forecourt controller a password of its own (on the device and "
                "here), never its factory admin/admin",
            )
        for line in self.devices or ():
            given = line.options.get("password")
            weak = _weak_password(given) if isinstance(given, str) else None
            if weak:
                yield Refusal(
                    "devices",
                    "FORECOURT_EDGE_DEVICES",
                    f"device {line.name!r}: its password option {weak}, {production}",
                    "give the device a password of its own (on the device and in options)",
                )
        if self.mqtt_password is not None and is_placeholder(self.mqtt_password.get_secret_value()):
            yield Refusal(
                "mqtt_password",
                "FORECOURT_EDGE_MQTT_PASSWORD",
                f"is a default or placeholder password, {production}",
                "give the station's broker login a generated password, or unset it to log in "
                "with the station credential",
            )
        url = urlsplit(self.hq_url.strip())
        if url.scheme == "http" and not _is_loopback(url.hostname or ""):
            yield Refusal(
                "hq_url",
                "FORECOURT_EDGE_HQ_URL",
                f"is plain http:// to {url.hostname or 'a remote host'}, which would carry "
                f"the station credential in clear, {production}",
                "use HQ's https:// address",
            )
        broker = urlsplit((self.mqtt_url or "").strip())
        if broker.scheme == "mqtt" and not _is_loopback(broker.hostname or ""):
            yield Refusal(
                "mqtt_url",
                "FORECOURT_EDGE_MQTT_URL",
                f"is plain mqtt:// to {broker.hostname or 'a remote host'}, which would carry "
                f"the broker login (by default the station credential) in clear, {production}",
                "use the broker's mqtts:// address (FORECOURT_EDGE_MQTT_CA_FILE for its CA)",
            )
        for field in ("terminal_tokens", "reader_tokens"):
            tokens: dict[str, SecretStr] = getattr(self, field)
            for name, secret in tokens.items():
                if _repeats_placeholder(secret.get_secret_value()):
                    yield Refusal(
                        field,
                        _env_name(type(self), field),
                        f"terminal {name!r}: its secret is a placeholder or one repeated "
                        f"pattern, {production}",
                        "generate one, e.g. with: python3 -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))'",
                    )


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"not a log level ({', '.join(LOG_LEVELS)})")
    return value.upper()


# --- loading, and saying what is wrong ------------------------------------------------------

SettingsT = TypeVar("SettingsT", bound=_TomlSettings)

_SETTINGS_CLASSES: dict[str, type[_TomlSettings]] = {
    "Settings": Settings,
    "EdgeSettings": EdgeSettings,
}


def load_settings(
    cls: type[SettingsT], *, options: Mapping[str, str] | None = None, **overrides: Any
) -> SettingsT:
    """``cls(**overrides)`` (overrides win over the environment and the file), any problem
    raised as one :class:`SettingsInvalid`.

    ``options`` maps a field to the command-line option that set it (``{"port": "--port"}``),
    so that the message names what the operator typed.
    """
    try:
        return cls(**overrides)
    except SettingsInvalid:
        raise
    except (ValidationError, SettingsError, tomllib.TOMLDecodeError, OSError) as exc:
        raise settings_problem(exc, cls, overrides, options) from exc


def settings_problem(
    exc: BaseException,
    cls: type[_TomlSettings] | None = None,
    overrides: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
) -> SettingsInvalid:
    """Describe a failure to build settings in one line (see :func:`load_settings`)."""
    if isinstance(exc, SettingsInvalid):
        return exc
    if isinstance(exc, tomllib.TOMLDecodeError | OSError):
        path = os.environ.get(CONFIG_ENV) or "forecourt.toml"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return SettingsInvalid(
            f"cannot read the settings file {path}: {reason} — fix it, or point "
            f"{CONFIG_ENV} at another file",
            setting=path,
        )
    if isinstance(exc, ValidationError):
        cls = cls or _SETTINGS_CLASSES.get(exc.title)
    if cls is None:
        return SettingsInvalid(f"invalid settings: {exc}", setting="settings")
    overrides = overrides or {}
    if isinstance(exc, SettingsError):
        # Raised when the environment holds text that cannot be decoded for a field.
        found = re.search(r'field "([^"]+)"', str(exc))
        field = found.group(1) if found else "?"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        where = _where(cls, field, overrides, options)
        return SettingsInvalid(f"setting {field} ({where}) cannot be read{cause}", setting=where)
    if not isinstance(exc, ValidationError):
        return SettingsInvalid(f"invalid settings: {exc}", setting="settings")
    errors = exc.errors()
    first = errors[0]
    refused = (first.get("ctx") or {}).get("error")
    if not first["loc"] and isinstance(refused, ProductionRefused):
        # A check across the settings (no field in loc): it names the setting itself.
        field = refused.refusals[0].field
        where = _where(cls, field, overrides, options)
        if where == field:  # given in code, not by the operator: name its variable
            where = _env_name(cls, field)
        return SettingsInvalid(refused.line(where), setting=where)
    field = ".".join(str(part) for part in first["loc"]) or "?"
    where = _where(cls, str(first["loc"][0]) if first["loc"] else field, overrides, options)
    if first["type"] == "missing":
        problem = "is not set"
    else:
        reason = str(first["msg"]).removeprefix("Value error, ")
        shown = "" if _is_secret(cls, field) else _shown(first.get("input"))
        problem = f"is invalid{shown}: {reason}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    hint = _hint(cls, field, overrides)
    return SettingsInvalid(
        f"setting {field} ({where}) {problem}{more}" + (f" — {hint}" if hint else ""),
        setting=where,
    )


def _env_name(cls: type[_TomlSettings], field: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def _where(
    cls: type[_TomlSettings],
    field: str,
    overrides: Mapping[str, Any],
    options: Mapping[str, str] | None,
) -> str:
    """Where the value came from, in the order the settings sources are read."""
    if field in overrides:
        return (options or {}).get(field, field)
    env = _env_name(cls, field)
    if any(name.upper() == env for name in os.environ):
        return env
    path = os.environ.get(CONFIG_ENV) or "forecourt.toml"
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return env
    table = document.get(cls.toml_table, {}) if cls.toml_table else document
    if isinstance(table, dict) and field in table:
        return f"{path} [{cls.toml_table}] {field}" if cls.toml_table else f"{path}: {field}"
    return env


def _is_secret(cls: type[_TomlSettings], field: str) -> bool:
    info = cls.model_fields.get(field)
    return info is not None and info.annotation is SecretStr


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^@/\s]*@")


def _shown(value: Any) -> str:
    """A refused value as the message shows it: short ones only, a URL's password masked."""
    if isinstance(value, str):
        value = _URL_PASSWORD.sub(r"\g<head>***@", value)
    if isinstance(value, str | int | float | bool) and len(str(value)) <= 80:
        return f" ({value!r})"
    return ""


def _hint(cls: type[_TomlSettings], field: str, overrides: Mapping[str, Any]) -> str:
    if cls is EdgeSettings and field == "credential":
        station = overrides.get("station") or os.environ.get("FORECOURT_EDGE_STATION") or "CODE"
        return (
            f"issue one on HQ with: forecourt credential {station}, then "
            "export FORECOURT_EDGE_CREDENTIAL=<the credential it prints>"
        )
    if cls is EdgeSettings and field == "station":
        return "pass --station CODE (or set FORECOURT_EDGE_STATION)"
    return ""
