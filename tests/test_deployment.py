"""No Docker engine runs here: check the compose file and Dockerfile against the settings they feed."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
# `${NAME:-default}` (a default), `${NAME:?message}` (required) or `${NAME}`, as compose interpolates.
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::(?P<kind>[-?])(?P<rest>[^}]*))?\}")


def compose_environment() -> dict[str, str | None]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    environment: dict[str, str | None] = compose["services"]["sunotrack"]["environment"]
    return environment


def readme_configuration() -> dict[str, str]:
    """The README's configuration table: each variable and its default column."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| ([^|]*?) \|", section, flags=re.MULTILINE))


def field_named(variable: str) -> str:
    return next(name for name, field in Settings.model_fields.items() if field.validation_alias == variable)


def test_compose_runs_postgres_16_with_a_healthcheck_and_the_service_after_it() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    postgres, service = compose["services"]["postgres"], compose["services"]["sunotrack"]

    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["build"] == "."
    assert service["command"][:2] == ["sunotrack", "serve"]


def test_compose_only_sets_variables_the_service_reads() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    known = {
        field.validation_alias
        for field in Settings.model_fields.values()
        if isinstance(field.validation_alias, str)
    }

    variables = set(compose["services"]["sunotrack"]["environment"])
    assert variables <= known, variables - known
    assert {"DATABASE_URL", "SUNO_BASE_URL", "SUNO_API_KEY", "SUNOTRACK_ADMIN_TOKEN"} <= variables


def test_compose_passes_exactly_the_variables_of_the_readme_table() -> None:
    assert sorted(compose_environment()) == sorted(readme_configuration())


def test_compose_defaults_are_the_readme_and_service_defaults() -> None:
    """A default written in the compose file means what it says in the README and in Settings."""
    documented = readme_configuration()
    defaults = {}
    for variable, value in compose_environment().items():
        match = INTERPOLATION.fullmatch(value or "")
        if value is not None and variable != "DATABASE_URL":
            assert match is not None, (variable, value)
            assert match["name"] == variable
            if match["kind"] == "-":
                defaults[variable] = match["rest"]

    assert len(defaults) > 20
    for variable, default in defaults.items():
        assert documented[variable] == f"`{default}`", variable
        field = field_named(variable)
        assert getattr(Settings.from_env(**{variable: default}), field) == getattr(Settings.from_env(), field)


def test_compose_leaves_optional_variables_unset_and_reads_an_env_file() -> None:
    """An empty SUNOTRACK_CALLBACK_TOKEN would stop the service: optional values are passed on only
    when set (a key without a value), never defaulted to empty; the admin token is required."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["sunotrack"]
    environment = compose_environment()

    assert {name for name, value in environment.items() if value is None} == {
        "SUNO_BASE_URL", "SUNO_API_KEY", "SUNOTRACK_RELAYS", "SUNOTRACK_CALLBACK_TOKEN",
        "SUNOTRACK_PUBLIC_URL",
    }  # fmt: skip
    assert not [value for value in environment.values() if value and re.search(r":-\}", value)]
    assert (environment["SUNOTRACK_ADMIN_TOKEN"] or "").startswith("${SUNOTRACK_ADMIN_TOKEN:?")
    assert compose["env_file"] == [{"path": ".env", "required": False}]


def test_every_variable_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    names = [
        field.validation_alias
        for field in Settings.model_fields.values()
        if isinstance(field.validation_alias, str)
    ]

    assert [name for name in names if f"`{name}`" not in readme] == []


def test_dockerfile_installs_from_the_lock_and_serves() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert "uv sync --frozen" in dockerfile
    assert 'CMD ["sunotrack", "serve"' in dockerfile
