"""One typed settings object, read from the environment once at start-up."""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from yarl import URL

from service.upstream.schemas import Dialect
from service.vocabulary import DEFAULT_RELAY, RelayHooks

DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
# Upper bounds (README, "Limits"): far above any sensible setting, low enough that the values stay
# meaningful as timestamps, Postgres intervals and millisecond timeouts.
RETRY_DELAY_MAX_S = 7 * DAY
RETRY_SCHEDULE_MAX_LENGTH = 50
TOKEN_MIN_LENGTH = 16

# `all` serves the API and runs the jobs; `api` only answers HTTP; `worker` only polls and delivers.
Role = Literal["all", "api", "worker"]
ROLES: tuple[Role, ...] = get_args(Role)

PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]

# The callback token is a path segment: only characters that need no escaping there.
_TOKEN_CHARACTERS = {
    "SUNOTRACK_ADMIN_TOKEN": (re.compile(r"[!-~]+"), "printable ASCII without spaces"),
    "SUNOTRACK_CALLBACK_TOKEN": (re.compile(r"[A-Za-z0-9._~-]+"), "letters, digits and . _ ~ -"),
}
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
# Query parameters the asyncpg driver takes from a URL as text; libpq's others (sslmode...) it refuses.
_DATABASE_URL_PARAMETERS = {
    "host", "port", "ssl", "target_session_attrs", "prepared_statement_cache_size", "passfile",
}  # fmt: skip

# Relay names become parts of variable names (SUNOTRACK_RELAY_<NAME>_BASE_URL) and of callback paths.
RELAY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_RELAY_VARIABLE = re.compile(r"SUNOTRACK_RELAY_(.+)_(BASE_URL|API_KEY|DIALECT|CONCURRENCY)")
MAX_CONCURRENCY = 1024


class ConfigError(Exception):
    """A start-up problem the user must fix: printed as is (one line per problem, each naming the
    variable or option), and the process exits with status 2. Never carries a secret."""


def http_url(value: str) -> str:
    """A relay's base URL, checked; without its trailing slash."""
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    try:
        url = URL(value)
        port = url.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if not url.raw_host or not _valid_host(url.raw_host):
        raise ValueError("must name a valid host, e.g. https://relay.example")
    if not port:
        raise ValueError("has port 0")
    if url.query_string or url.fragment:
        raise ValueError("must not have a query or a fragment")
    return value.rstrip("/")


class RelayConfig(BaseModel, frozen=True):
    """One relay: `default` from SUNO_*, the others from SUNOTRACK_RELAY_<NAME>_*."""

    name: str
    base_url: str | None  # None: SUNO_BASE_URL is unset, nothing is polled on `default`
    api_key: SecretStr | None
    dialect: Dialect
    # Requests in flight to this relay, per process (None: SUNOTRACK_UPSTREAM_CONCURRENCY).
    concurrency: int | None


def _named_relays(raw: str, env: Mapping[str, str]) -> list[RelayConfig]:
    """The relays SUNOTRACK_RELAYS names, each from its own variables; every problem names its variable."""
    names = [name.strip() for name in raw.split(",") if name.strip()]
    problems: list[str] = []
    for name in names:
        if not RELAY_NAME.fullmatch(name):
            problems.append(f"SUNOTRACK_RELAYS: {name!r} is not a relay name (a-z, then a-z, 0-9, _)")
        elif name == DEFAULT_RELAY:
            problems.append("SUNOTRACK_RELAYS: 'default' is the relay SUNO_BASE_URL configures")
    if len(set(names)) != len(names):
        problems.append("SUNOTRACK_RELAYS: a relay is named twice")
    for variable in env:
        match = _RELAY_VARIABLE.fullmatch(variable)
        if match and match[1].lower() not in names:
            problems.append(f"{variable}: relay {match[1].lower()!r} is not in SUNOTRACK_RELAYS")
    relays = [] if problems else [_named_relay(name, env, problems) for name in names]
    if problems:
        raise ValueError("; ".join(problems))
    return relays


def _named_relay(name: str, env: Mapping[str, str], problems: list[str]) -> RelayConfig:
    """One relay from its SUNOTRACK_RELAY_<NAME>_* variables; what is wrong goes into `problems`."""
    prefix = f"SUNOTRACK_RELAY_{name.upper()}_"
    base_url, key, dialect, concurrency = (
        env.get(prefix + suffix) for suffix in ("BASE_URL", "API_KEY", "DIALECT", "CONCURRENCY")
    )
    if not base_url:
        problems.append(f"{prefix}BASE_URL: must be set for each relay SUNOTRACK_RELAYS names")
    else:
        try:
            base_url = http_url(base_url)
        except ValueError as exc:
            problems.append(f"{prefix}BASE_URL: {exc}")
    if dialect is not None and dialect not in set(Dialect):
        problems.append(f"{prefix}DIALECT: must be one of {', '.join(Dialect)}")
        dialect = None
    if concurrency is not None and not (
        concurrency.isascii() and concurrency.isdigit() and 1 <= int(concurrency) <= MAX_CONCURRENCY
    ):
        problems.append(f"{prefix}CONCURRENCY: must be an integer from 1 to {MAX_CONCURRENCY}")
        concurrency = None
    return RelayConfig(
        name=name,
        base_url=base_url,
        api_key=SecretStr(key) if key else None,
        dialect=Dialect(dialect or Dialect.FETCH),
        concurrency=None if concurrency is None else int(concurrency),
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, populate_by_name=True, extra="ignore", frozen=True
    )

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    db_pool_size: int = Field(default=20, ge=1, le=10_000, validation_alias="SUNOTRACK_DB_POOL_SIZE")
    db_transaction_pooler: bool = Field(default=False, validation_alias="SUNOTRACK_DB_TRANSACTION_POOLER")
    data_dir: Path = Field(default=Path(".sunotrack"), validation_alias="SUNOTRACK_DATA_DIR")

    suno_base_url: str | None = Field(default=None, validation_alias="SUNO_BASE_URL")
    suno_api_key: SecretStr | None = Field(default=None, validation_alias="SUNO_API_KEY")
    suno_api_dialect: Dialect = Field(default=Dialect.FETCH, validation_alias="SUNO_API_DIALECT")
    upstream_timeout_s: PositiveSeconds = Field(
        default=15.0, le=10 * MINUTE, validation_alias="SUNOTRACK_UPSTREAM_TIMEOUT_S"
    )
    upstream_concurrency: int = Field(
        default=16, ge=1, le=MAX_CONCURRENCY, validation_alias="SUNOTRACK_UPSTREAM_CONCURRENCY"
    )
    # The relays besides `default`, each with its own SUNOTRACK_RELAY_<NAME>_* variables.
    named_relays: Annotated[tuple[RelayConfig, ...], NoDecode] = Field(
        default=(), validation_alias="SUNOTRACK_RELAYS"
    )
    poll_batch_size: int = Field(default=50, ge=1, le=500, validation_alias="SUNOTRACK_POLL_BATCH_SIZE")

    admin_token: SecretStr | None = Field(default=None, validation_alias="SUNOTRACK_ADMIN_TOKEN")
    callback_token: SecretStr | None = Field(default=None, validation_alias="SUNOTRACK_CALLBACK_TOKEN")
    # Registrations per second of a client created without --rate; bursts may reach twice that.
    client_rate: float = Field(default=100.0, gt=0, le=1e6, validation_alias="SUNOTRACK_CLIENT_RATE")
    # How long a process keeps a client's token, once looked up, for calls that take nothing from its
    # bucket: a token revoked or rotated elsewhere still reads there for at most this long.
    token_cache_s: float = Field(
        default=2.0, ge=0, le=60, allow_inf_nan=False, validation_alias="SUNOTRACK_TOKEN_CACHE_S"
    )
    # Where the relay reaches us: the relay front then asks it to call back instead of the client.
    public_url: str | None = Field(default=None, validation_alias="SUNOTRACK_PUBLIC_URL")

    poll_min_interval_s: PositiveSeconds = Field(
        default=3.0, le=DAY, validation_alias="SUNOTRACK_POLL_MIN_INTERVAL_S"
    )
    poll_max_interval_s: PositiveSeconds = Field(
        default=60.0, le=DAY, validation_alias="SUNOTRACK_POLL_MAX_INTERVAL_S"
    )
    poll_tick_s: PositiveSeconds = Field(default=0.5, le=MINUTE, validation_alias="SUNOTRACK_POLL_TICK_S")
    poll_claim_size: int = Field(default=4000, ge=1, le=100_000, validation_alias="SUNOTRACK_POLL_CLAIM_SIZE")
    task_deadline_s: PositiveSeconds = Field(
        default=3600.0, le=30 * DAY, validation_alias="SUNOTRACK_TASK_DEADLINE_S"
    )
    lease_s: PositiveSeconds = Field(default=30.0, le=HOUR, validation_alias="SUNOTRACK_LEASE_S")
    not_found_grace_s: float = Field(
        default=600.0, ge=0, le=DAY, allow_inf_nan=False, validation_alias="SUNOTRACK_NOT_FOUND_GRACE_S"
    )

    webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(), validation_alias="SUNOTRACK_WEBHOOK_SECRET"
    )
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        default=DEFAULT_RETRY_SCHEDULE, validation_alias="SUNOTRACK_WEBHOOK_RETRY_SCHEDULE"
    )
    webhook_timeout_s: PositiveSeconds = Field(
        default=15.0, le=10 * MINUTE, validation_alias="SUNOTRACK_WEBHOOK_TIMEOUT_S"
    )
    webhook_concurrency: int = Field(
        default=64, ge=1, le=4096, validation_alias="SUNOTRACK_WEBHOOK_CONCURRENCY"
    )
    webhook_sweep_s: PositiveSeconds = Field(
        default=1.0, le=HOUR, validation_alias="SUNOTRACK_WEBHOOK_SWEEP_S"
    )
    feed_tick_s: PositiveSeconds = Field(default=0.2, le=MINUTE, validation_alias="SUNOTRACK_FEED_TICK_S")
    allow_private_hooks: bool = Field(default=False, validation_alias="SUNOTRACK_ALLOW_PRIVATE_HOOKS")
    # The default of clients that set none (`sunotrack clients create --relay-hooks`).
    relay_hooks: RelayHooks = Field(default=RelayHooks.ADOPT, validation_alias="SUNOTRACK_RELAY_HOOKS")
    hook_breaker_failures: int = Field(
        default=20, ge=1, le=1_000_000, validation_alias="SUNOTRACK_HOOK_BREAKER_FAILURES"
    )
    hook_breaker_pause_s: PositiveSeconds = Field(
        default=60.0, le=DAY, validation_alias="SUNOTRACK_HOOK_BREAKER_PAUSE_S"
    )
    hook_host_concurrency: int = Field(
        default=8, ge=1, le=4096, validation_alias="SUNOTRACK_HOOK_HOST_CONCURRENCY"
    )
    hook_slow_s: PositiveSeconds = Field(
        default=5.0, le=10 * MINUTE, validation_alias="SUNOTRACK_HOOK_SLOW_S"
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias="SUNOTRACK_LOG_LEVEL"
    )

    @field_validator("admin_token", "callback_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # A set-but-empty token is what a failed `export X=$(...)` leaves: refuse it, never treat it as off.
        if value is None:
            return None
        token = value.get_secret_value()
        if len(token) < TOKEN_MIN_LENGTH:
            state = "is set but empty" if not token else f"has {len(token)} characters"
            raise ValueError(f"{state}: use at least {TOKEN_MIN_LENGTH} random characters (or unset it)")
        pattern, allowed = _TOKEN_CHARACTERS[_alias(info)]
        if not pattern.fullmatch(token):
            raise ValueError(f"may only hold {allowed}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _read_named_relays(cls, data: object) -> object:
        """SUNOTRACK_RELAYS names relays whose variables are not fields: read them here, from the
        keywords given (tests) over the environment."""
        if not isinstance(data, dict):
            return data
        given = {str(key).upper(): key for key in data}
        raw = data.pop(given.get("SUNOTRACK_RELAYS", "SUNOTRACK_RELAYS"), None)
        if isinstance(raw, tuple | list):  # already parsed
            return {**data, "SUNOTRACK_RELAYS": tuple(raw)}
        env = {key.upper(): value for key, value in os.environ.items()}
        env.update({upper: str(data[key]) for upper, key in given.items() if isinstance(data.get(key), str)})
        return {**data, "SUNOTRACK_RELAYS": tuple(_named_relays(str(raw or ""), env))}

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value:
            raise ValueError("is set but empty: unset it to use the embedded PostgreSQL")
        for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
            if value.startswith(prefix):
                value = "postgresql+asyncpg://" + value.removeprefix(prefix)
                break
        else:
            raise ValueError("must start with postgresql:// or postgresql+asyncpg://")
        # Messages from here on never quote the URL: it may hold a password.
        try:
            url = make_url(value)
        except ValueError:
            raise ValueError("is not a valid URL (check the port and any [IPv6] brackets)") from None
        if not (url.host or url.query.get("host")):
            raise ValueError("names no host (for a unix socket: ?host=/path/to/socket/directory)")
        if url.host and not _valid_host(url.host):
            raise ValueError("has an invalid host name")
        if not url.database:
            raise ValueError("names no database (postgresql://user:password@host:5432/DATABASE)")
        unknown = sorted(set(url.query) - _DATABASE_URL_PARAMETERS)
        if unknown:
            hint = " (asyncpg takes ssl=require instead of sslmode)" if "sslmode" in unknown else ""
            raise ValueError(f"has query parameters the driver does not take: {', '.join(unknown)}{hint}")
        return value

    @field_validator("suno_base_url", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return http_url(value)

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split()
        if isinstance(value, list | tuple):
            for secret in value:
                raw = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)
                if not raw.startswith("whsec_"):
                    raise ValueError("each secret must start with whsec_")
                try:
                    if not base64.b64decode(raw.removeprefix("whsec_"), validate=True):
                        raise ValueError("secret is empty")
                except binascii.Error as exc:
                    raise ValueError("the part after whsec_ must be base64") from exc
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",") if part.strip()]
            try:
                value = tuple(float(part) for part in parts)
            except ValueError as exc:
                raise ValueError("must be comma separated seconds, e.g. 5,300,1800") from exc
        if isinstance(value, tuple | list):
            if len(value) > RETRY_SCHEDULE_MAX_LENGTH:
                raise ValueError(f"at most {RETRY_SCHEDULE_MAX_LENGTH} delays")
            for delay in value:
                if not 0 <= float(delay) <= RETRY_DELAY_MAX_S:  # also false for nan
                    raise ValueError(f"each delay must be from 0 to {RETRY_DELAY_MAX_S:.0f} seconds")
        return value

    @model_validator(mode="after")
    def _intervals_ordered(self) -> Settings:
        if self.poll_max_interval_s < self.poll_min_interval_s:
            raise ValueError("SUNOTRACK_POLL_MAX_INTERVAL_S must be >= SUNOTRACK_POLL_MIN_INTERVAL_S")
        if self.public_url is not None and self.callback_token is None:
            raise ValueError(
                "SUNOTRACK_PUBLIC_URL needs SUNOTRACK_CALLBACK_TOKEN (the callback route's secret)"
            )
        return self

    @functools.cached_property
    def relays(self) -> dict[str, RelayConfig]:
        """Every relay by name, `default` first (configured or not)."""
        default = RelayConfig(
            name=DEFAULT_RELAY,
            base_url=self.suno_base_url,
            api_key=self.suno_api_key,
            dialect=self.suno_api_dialect,
            concurrency=self.upstream_concurrency,
        )
        named = (
            relay
            if relay.concurrency
            else relay.model_copy(update={"concurrency": self.upstream_concurrency})
            for relay in self.named_relays
        )
        return {relay.name: relay for relay in (default, *named)}

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Load from the environment; a bad value raises ConfigError naming the variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            lines = []
            for error in exc.errors(include_input=False, include_url=False):
                message = error["msg"].removeprefix("Value error, ")
                where = [str(part) for part in error["loc"]]
                if len(where) > 1:  # an item of a list, e.g. a delay of the retry schedule
                    where = [f"{where[0]} (item {int(where[1]) + 1})" if where[1].isdigit() else where[0]]
                lines.append(f"{where[0]}: {message}" if where else message)
            raise ConfigError("\n".join(lines)) from None


def _alias(info: ValidationInfo) -> str:
    field = Settings.model_fields[info.field_name or ""]
    return str(field.validation_alias)


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address: what a typo such as `exa mple.com` is not."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return _HOST_NAME.fullmatch(host) is not None
    return True
