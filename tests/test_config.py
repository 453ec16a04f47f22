from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import DEFAULT_RETRY_SCHEDULE, ConfigError, Settings


def test_defaults_match_the_documented_contract() -> None:
    settings = Settings.from_env()

    assert settings.suno_api_dialect == "fetch"
    assert (settings.poll_min_interval_s, settings.poll_max_interval_s) == (3.0, 60.0)
    assert settings.task_deadline_s == 3600.0
    assert settings.webhook_retry_schedule == DEFAULT_RETRY_SCHEDULE
    assert settings.allow_private_hooks is False
    assert (settings.lease_s, settings.not_found_grace_s) == (30.0, 600.0)
    assert (settings.hook_breaker_failures, settings.hook_breaker_pause_s) == (20, 60.0)


def test_values_are_parsed_from_their_variables() -> None:
    settings = Settings.from_env(
        DATABASE_URL="postgresql://user:pw@db:5432/sunotrack",
        SUNOTRACK_WEBHOOK_RETRY_SCHEDULE="0.5, 2,10",
        SUNOTRACK_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw whsec_c2Vjb25k",
        SUNOTRACK_POLL_MIN_INTERVAL_S="0.2",
        SUNOTRACK_ALLOW_PRIVATE_HOOKS="true",
        SUNO_BASE_URL="https://relay.example/",
    )

    assert settings.database_url == "postgresql+asyncpg://user:pw@db:5432/sunotrack"
    assert settings.webhook_retry_schedule == (0.5, 2.0, 10.0)
    assert len(settings.webhook_secrets) == 2
    assert settings.poll_min_interval_s == 0.2
    assert settings.allow_private_hooks is True
    assert settings.suno_base_url == "https://relay.example"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://localhost/db"),
        ("SUNO_BASE_URL", "relay.example"),
        ("SUNO_API_DIALECT", "v2"),
        ("SUNOTRACK_POLL_MIN_INTERVAL_S", "0"),
        ("SUNOTRACK_POLL_MAX_INTERVAL_S", "fast"),
        ("SUNOTRACK_TASK_DEADLINE_S", "-1"),
        ("SUNOTRACK_WEBHOOK_RETRY_SCHEDULE", "5,soon"),
        ("SUNOTRACK_WEBHOOK_RETRY_SCHEDULE", "5,-1"),
        ("SUNOTRACK_WEBHOOK_SECRET", "not-a-whsec"),
        ("SUNOTRACK_WEBHOOK_SECRET", "whsec_%%%"),
        ("SUNOTRACK_ALLOW_PRIVATE_HOOKS", "maybe"),
        ("SUNOTRACK_LEASE_S", "abc"),
        ("DATABASE_URL", ""),
        ("DATABASE_URL", "postgresql://"),
        ("DATABASE_URL", "postgresql:///sunotrack"),
        ("DATABASE_URL", "postgresql://user:s3cret@db:5432/"),
        ("DATABASE_URL", "postgresql://user:s3cret@db:port/sunotrack"),
        ("DATABASE_URL", "postgresql://user:s3cret@[::1/sunotrack"),
        ("DATABASE_URL", "postgresql://user:s3cret@exa mple/sunotrack"),
        ("DATABASE_URL", "postgresql://user:s3cret@db/sunotrack?sslmode=require"),
        ("SUNO_BASE_URL", "http://"),
        ("SUNO_BASE_URL", "http://exa mple.com"),
        ("SUNO_BASE_URL", "https://relay.example:0"),
        ("SUNO_BASE_URL", "https://relay.example:99999"),
        ("SUNO_BASE_URL", "https://relay.example/?key=1"),
        ("SUNOTRACK_WEBHOOK_RETRY_SCHEDULE", "5,inf"),
        ("SUNOTRACK_WEBHOOK_RETRY_SCHEDULE", "nan"),
        ("SUNOTRACK_WEBHOOK_RETRY_SCHEDULE", "5,1e300"),
        ("SUNOTRACK_WEBHOOK_RETRY_SCHEDULE", ",".join(["1"] * 51)),
        ("SUNOTRACK_HOOK_BREAKER_FAILURES", "1e300"),
        ("SUNOTRACK_HOOK_BREAKER_FAILURES", "10000000"),
        ("SUNOTRACK_HOOK_HOST_CONCURRENCY", "0"),
        ("SUNOTRACK_HOOK_SLOW_S", "0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable) as refused:
        Settings.from_env(**{variable: value})

    assert "s3cret" not in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1


DURATIONS = [
    name
    for name, field in Settings.model_fields.items()
    if name.endswith("_s") and isinstance(field.validation_alias, str)
]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300"])
@pytest.mark.parametrize("field", DURATIONS)
def test_every_duration_refuses_infinite_and_absurd_values(field: str, value: str) -> None:
    variable = str(Settings.model_fields[field].validation_alias)

    with pytest.raises(ConfigError, match=f"^{variable}: ") as refused:
        Settings.from_env(**{variable: value})

    assert field not in str(refused.value)


def test_every_duration_has_an_upper_bound_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    limits = readme.split("### Limits", 1)[1].split("\n## ", 1)[0]

    for field in DURATIONS:
        variable = str(Settings.model_fields[field].validation_alias)
        bound = next(m.le for m in Settings.model_fields[field].metadata if getattr(m, "le", None))
        assert re.search(rf"`{variable}`[^|]*\|[^|]*\b{int(bound)}\b", limits), (variable, bound)


TOKEN_REFUSALS = [
    (variable, value)
    for variable in ("SUNOTRACK_ADMIN_TOKEN", "SUNOTRACK_CALLBACK_TOKEN")
    for value in ("", " ", "short", "fifteen-chars-x", "sixteen chars ok", "sixteen\tchars-ok")
] + [("SUNOTRACK_CALLBACK_TOKEN", "sixteen/chars/no"), ("SUNOTRACK_CALLBACK_TOKEN", "sixteen%2Fchars-no")]


@pytest.mark.parametrize(("variable", "value"), TOKEN_REFUSALS)
def test_an_empty_short_or_odd_token_is_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}: ") as refused:
        Settings.from_env(**{variable: value})

    assert value.strip() == "" or value not in str(refused.value)


def test_a_long_token_is_taken_and_an_unset_callback_token_keeps_the_route_off() -> None:
    settings = Settings.from_env(SUNOTRACK_ADMIN_TOKEN="a/b+c=" * 3, SUNOTRACK_CALLBACK_TOKEN="b-._~" * 4)

    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "a/b+c=" * 3
    assert Settings.from_env().callback_token is None


def test_max_interval_below_min_is_refused() -> None:
    with pytest.raises(ConfigError, match="SUNOTRACK_POLL_MAX_INTERVAL_S"):
        Settings.from_env(SUNOTRACK_POLL_MIN_INTERVAL_S="10", SUNOTRACK_POLL_MAX_INTERVAL_S="5")


def test_secrets_never_show_in_the_settings_repr() -> None:
    settings = Settings.from_env(
        SUNO_API_KEY="sk-relay-secret", SUNOTRACK_ADMIN_TOKEN="admin-secret-0123456789",
        SUNOTRACK_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )  # fmt: skip

    shown = repr(settings)
    assert "sk-relay-secret" not in shown
    assert "admin-secret" not in shown
    assert "MfKQ9r8" not in shown


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_serve_exits_with_a_message_on_bad_config_or_without_an_admin_token() -> None:
    bad = _run_cli("serve", env={"PATH": "/usr/bin:/bin", "SUNOTRACK_LEASE_S": "soon"})
    no_token = _run_cli("serve", env={"PATH": "/usr/bin:/bin"})

    assert bad.returncode == 2
    assert "SUNOTRACK_LEASE_S" in bad.stderr
    assert no_token.returncode == 2
    assert "SUNOTRACK_ADMIN_TOKEN" in no_token.stderr


def test_a_public_url_needs_the_callback_token() -> None:
    with pytest.raises(ConfigError, match="SUNOTRACK_PUBLIC_URL needs SUNOTRACK_CALLBACK_TOKEN"):
        Settings.from_env(SUNOTRACK_PUBLIC_URL="https://track.example")
    with pytest.raises(ConfigError, match="SUNOTRACK_PUBLIC_URL: must be an http"):
        Settings.from_env(
            SUNOTRACK_PUBLIC_URL="track.example", SUNOTRACK_CALLBACK_TOKEN="cb-token-0123456789"
        )
    settings = Settings.from_env(
        SUNOTRACK_PUBLIC_URL="https://track.example/", SUNOTRACK_CALLBACK_TOKEN="cb-token-0123456789"
    )
    assert settings.public_url == "https://track.example"


def test_named_relays_are_read_from_their_own_variables() -> None:
    settings = Settings.from_env(
        SUNO_BASE_URL="https://relay.example", SUNO_API_KEY="sk-default",
        SUNOTRACK_UPSTREAM_CONCURRENCY="7", SUNOTRACK_RELAYS="eu, us_2",
        SUNOTRACK_RELAY_EU_BASE_URL="https://eu.relay.example/", SUNOTRACK_RELAY_EU_API_KEY="sk-eu",
        SUNOTRACK_RELAY_US_2_BASE_URL="http://us.relay.example", SUNOTRACK_RELAY_US_2_DIALECT="v1",
        SUNOTRACK_RELAY_US_2_CONCURRENCY="3",
    )  # fmt: skip

    relays = settings.relays
    assert list(relays) == ["default", "eu", "us_2"]
    assert [(r.base_url, r.dialect, r.concurrency) for r in relays.values()] == [
        ("https://relay.example", "fetch", 7),
        ("https://eu.relay.example", "fetch", 7),
        ("http://us.relay.example", "v1", 3),
    ]
    keys = [r.api_key.get_secret_value() if r.api_key else None for r in relays.values()]
    assert keys == ["sk-default", "sk-eu", None]
    assert "sk-eu" not in repr(settings)
    assert list(Settings.from_env().relays) == ["default"]


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"SUNOTRACK_RELAYS": "eu"}, "SUNOTRACK_RELAY_EU_BASE_URL"),
        (
            {"SUNOTRACK_RELAYS": "eu", "SUNOTRACK_RELAY_EU_BASE_URL": "eu.example"},
            "SUNOTRACK_RELAY_EU_BASE_URL",
        ),
        ({"SUNOTRACK_RELAYS": "Eu"}, "SUNOTRACK_RELAYS"),
        ({"SUNOTRACK_RELAYS": "default"}, "SUNOTRACK_RELAYS"),
        (
            {"SUNOTRACK_RELAYS": "eu,eu", "SUNOTRACK_RELAY_EU_BASE_URL": "https://e.example"},
            "SUNOTRACK_RELAYS",
        ),
        (
            {"SUNOTRACK_RELAYS": "eu", "SUNOTRACK_RELAY_EU_BASE_URL": "https://e.example",
             "SUNOTRACK_RELAY_EU_DIALECT": "v2"},
            "SUNOTRACK_RELAY_EU_DIALECT",
        ),
        (
            {"SUNOTRACK_RELAYS": "eu", "SUNOTRACK_RELAY_EU_BASE_URL": "https://e.example",
             "SUNOTRACK_RELAY_EU_CONCURRENCY": "0"},
            "SUNOTRACK_RELAY_EU_CONCURRENCY",
        ),
        ({"SUNOTRACK_RELAY_US_BASE_URL": "https://us.example"}, "SUNOTRACK_RELAY_US_BASE_URL"),
    ],
)  # fmt: skip
def test_a_bad_relay_is_refused_naming_the_variable(variables: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(**variables)
