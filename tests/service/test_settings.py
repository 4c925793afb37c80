"""Settings from MTRANK_* env vars, and the `serve` / `materialize` commands' argument handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from service.cli import app as cli
from service.settings import Settings


def test_defaults() -> None:
    s = Settings(_env_prefix="MTRANK_UNUSED_")  # type: ignore[call-arg]
    assert s.feature_store == "embedded" and s.max_candidates == 2000 and s.redis_timeout_ms == 30
    assert s.weights is None and s.combine is None  # None: from the served model's heads
    assert s.admin_token is None and s.torch_threads == 1 and s.reload_interval_s == 2.0


def test_env_vars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MTRANK_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("MTRANK_FEATURE_STORE", "redis")
    monkeypatch.setenv("MTRANK_WEIGHTS", '{"engagement": 2, "satisfaction": 0.5}')
    monkeypatch.setenv("MTRANK_ADMIN_TOKEN", "t0ken")
    monkeypatch.setenv("MTRANK_DATA_DIR", "/data")
    s = Settings()
    assert s.artifacts == tmp_path and s.feature_store == "redis" and s.data_dir == Path("/data")
    assert s.weights == {"engagement": 2.0, "satisfaction": 0.5}
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "t0ken"
    assert "t0ken" not in repr(s)  # a secret


def test_empty_admin_token_disables_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRANK_ADMIN_TOKEN", "  ")
    assert Settings().admin_token is None


@pytest.mark.parametrize(
    "bad",
    [
        {"feature_store": "memcached"},
        {"combine": "max"},
        {"weights": {"engagement": -1.0}},
        {"weights": {"engagement": 11.0}},
        {"weights": {"engagement": 0.0}},
        {"weights": {}},
        {"weight_min": 5.0, "weight_max": 1.0},
        {"redis_timeout_ms": 0},
        {"max_candidates": 0},
        {"log_level": "LOUD"},
    ],
)
def test_invalid_settings_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)  # type: ignore[arg-type]


def test_serve_rejects_bad_options_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--artifacts", str(tmp_path), "--feature-store", "memcached"])
    assert result.exit_code == 2 and "invalid settings" in result.output and "feature_store" in result.output


def test_commands_are_registered() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "materialize", "train", "models"):
        assert command in result.output
    help_text = CliRunner().invoke(cli, ["serve", "--help"]).output
    for option in ("--host", "--port", "--artifacts", "--feature-store", "--redis-url"):
        assert option in help_text
