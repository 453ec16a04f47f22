"""No Docker engine runs here: check the compose file and Dockerfile against the settings they feed."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent


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
