"""One typed settings object, read from the environment once at start-up."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.upstream.schemas import Dialect

DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)

PositiveSeconds = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """Raised with one line per bad variable, each naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, populate_by_name=True, extra="ignore", frozen=True
    )

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    data_dir: Path = Field(default=Path(".sunotrack"), validation_alias="SUNOTRACK_DATA_DIR")

    suno_base_url: str | None = Field(default=None, validation_alias="SUNO_BASE_URL")
    suno_api_key: SecretStr | None = Field(default=None, validation_alias="SUNO_API_KEY")
    suno_api_dialect: Dialect = Field(default=Dialect.FETCH, validation_alias="SUNO_API_DIALECT")
    upstream_timeout_s: PositiveSeconds = Field(default=15.0, validation_alias="SUNOTRACK_UPSTREAM_TIMEOUT_S")
    upstream_concurrency: int = Field(
        default=16, ge=1, le=1024, validation_alias="SUNOTRACK_UPSTREAM_CONCURRENCY"
    )
    poll_batch_size: int = Field(default=50, ge=1, le=500, validation_alias="SUNOTRACK_POLL_BATCH_SIZE")

    admin_token: SecretStr | None = Field(default=None, validation_alias="SUNOTRACK_ADMIN_TOKEN")
    callback_token: SecretStr | None = Field(default=None, validation_alias="SUNOTRACK_CALLBACK_TOKEN")

    poll_min_interval_s: PositiveSeconds = Field(
        default=3.0, validation_alias="SUNOTRACK_POLL_MIN_INTERVAL_S"
    )
    poll_max_interval_s: PositiveSeconds = Field(
        default=60.0, validation_alias="SUNOTRACK_POLL_MAX_INTERVAL_S"
    )
    poll_tick_s: PositiveSeconds = Field(default=0.5, validation_alias="SUNOTRACK_POLL_TICK_S")
    poll_claim_size: int = Field(default=4000, ge=1, le=100_000, validation_alias="SUNOTRACK_POLL_CLAIM_SIZE")
    task_deadline_s: PositiveSeconds = Field(default=3600.0, validation_alias="SUNOTRACK_TASK_DEADLINE_S")
    lease_s: PositiveSeconds = Field(default=30.0, validation_alias="SUNOTRACK_LEASE_S")
    not_found_grace_s: float = Field(default=600.0, ge=0, validation_alias="SUNOTRACK_NOT_FOUND_GRACE_S")

    webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(), validation_alias="SUNOTRACK_WEBHOOK_SECRET"
    )
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = Field(
        default=DEFAULT_RETRY_SCHEDULE, validation_alias="SUNOTRACK_WEBHOOK_RETRY_SCHEDULE"
    )
    webhook_timeout_s: PositiveSeconds = Field(default=15.0, validation_alias="SUNOTRACK_WEBHOOK_TIMEOUT_S")
    webhook_concurrency: int = Field(
        default=64, ge=1, le=4096, validation_alias="SUNOTRACK_WEBHOOK_CONCURRENCY"
    )
    webhook_sweep_s: PositiveSeconds = Field(default=1.0, validation_alias="SUNOTRACK_WEBHOOK_SWEEP_S")
    allow_private_hooks: bool = Field(default=False, validation_alias="SUNOTRACK_ALLOW_PRIVATE_HOOKS")
    # `ignore` for relays that call their clients' hooks themselves.
    relay_hooks: Literal["adopt", "ignore"] = Field(default="adopt", validation_alias="SUNOTRACK_RELAY_HOOKS")
    hook_breaker_failures: int = Field(default=20, ge=1, validation_alias="SUNOTRACK_HOOK_BREAKER_FAILURES")
    hook_breaker_pause_s: PositiveSeconds = Field(
        default=60.0, validation_alias="SUNOTRACK_HOOK_BREAKER_PAUSE_S"
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias="SUNOTRACK_LOG_LEVEL"
    )

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+asyncpg://" + value.removeprefix(prefix)
        raise ValueError("must start with postgresql:// or postgresql+asyncpg://")

    @field_validator("suno_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

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
        if isinstance(value, tuple | list) and any(float(delay) < 0 for delay in value):
            raise ValueError("delays must not be negative")
        return value

    @model_validator(mode="after")
    def _intervals_ordered(self) -> Settings:
        if self.poll_max_interval_s < self.poll_min_interval_s:
            raise ValueError("SUNOTRACK_POLL_MAX_INTERVAL_S must be >= SUNOTRACK_POLL_MIN_INTERVAL_S")
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Load from the environment; a bad value raises ConfigError naming the variable."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            lines = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "settings"
                lines.append(f"{where}: {error['msg']}")
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
