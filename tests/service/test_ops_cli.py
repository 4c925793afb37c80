"""Operations polish: `mtrank --version`, `mtrank serve` without a model (exit 1, or --wait), /docs and
/redoc served offline, checkpoints that find their data whatever the working directory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from fastapi.testclient import TestClient
from modelkit import DATA_DIR, FIXTURE_LOG, ROOT, service_settings, tiny_config
from typer.testing import CliRunner

from model import read_latest, resolve_checkpoint
from model.checkpoint import read_manifest
from model.train import train
from service.app import create_app
from service.cli import app as cli


def test_version_option() -> None:
    out = CliRunner().invoke(cli, ["--version"])
    assert out.exit_code == 0 and out.stdout.strip() == f"mtrank {version('mtrank')}"


def test_serve_without_a_model_exits_non_zero_at_once(tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["serve", "--artifacts", str(tmp_path / "empty")])
    assert out.exit_code == 1
    assert "no LATEST" in out.output and "mtrank train" in out.output and "--wait" in out.output


@pytest.mark.slow
def test_serve_wait_starts_unready_and_serves_the_first_model(tmp_path: Path, train_tiny: Any) -> None:
    artifacts, port = tmp_path / "artifacts", free_port()
    log = (tmp_path / "serve.log").open("wb")
    cmd = [sys.executable, "-m", "service.cli", "serve", "--wait", "--port", str(port)]
    env = {**os.environ, "MTRANK_ARTIFACTS": str(artifacts), "MTRANK_RELOAD_INTERVAL_S": "0.2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mtrank serve --wait never came up"
            time.sleep(0.1)
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        v = train_tiny(artifacts)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the first model was never served"
            time.sleep(0.1)
        assert httpx.get(url + "/readyz", timeout=5).json()["model_version"] == v
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_no_asset_from_another_host(trained_artifacts: Path, page: str) -> None:
    with TestClient(create_app(service_settings(trained_artifacts))) as client:
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
        assert "cdn." not in html.text and "fonts.googleapis" not in html.text
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, asset
        assert client.get("/openapi.json").json()["info"]["title"] == "mtrank"


@pytest.mark.slow
def test_a_checkpoint_trained_with_a_relative_data_dir_loads_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for name in (FIXTURE_LOG, "user_features_pure.csv", "video_features_basic_pure.csv"):
        (work / "data" / name).symlink_to(DATA_DIR / name)
    monkeypatch.delenv("MTRANK_DATA_DIR", raising=False)
    monkeypatch.chdir(work)
    cfg = tiny_config(epochs=1)
    cfg.data.data_dir = "data"  # relative to the training run's working directory
    cfg.promotion.enabled = False
    train(cfg, artifacts=tmp_path / "artifacts")
    manifest = read_manifest(resolve_checkpoint(tmp_path / "artifacts"))
    assert manifest["config"]["data"]["data_dir"] == str(work / "data")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the service runs from another directory: the tables are still found
    with TestClient(create_app(service_settings(tmp_path / "artifacts"))) as client:
        assert client.get("/readyz").json()["model_version"] == read_latest(tmp_path / "artifacts")
        r = client.post("/rank", json={"user_id": 0, "candidates": [10, 11], "context": {"tab": 1}})
        assert r.status_code == 200 and r.json()["unknown_user"] is False


@pytest.mark.parametrize(("command", "names"), [("train", "[promotion]"), ("replay", "[objective]")])
def test_help_texts_keep_the_config_tables_they_name(command: str, names: str) -> None:
    """Help is plain text: a config table in brackets is not swallowed as a style tag."""
    out = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert names in out.output
