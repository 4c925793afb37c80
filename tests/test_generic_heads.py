"""Nothing assumes the KuaiRand task names: a model with heads y1, y2 (the synthetic MMoE benchmark)
trains, is listed, reported and served with default settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from modelkit import ROOT, service_settings
from typer.testing import CliRunner

from model import read_latest
from model.config import load_config
from model.synth import make_mmoe_benchmark
from model.train import train
from service.app import create_app
from service.cli import app as cli

DIM = 100  # the config declares x0..x99


@pytest.fixture(scope="module")
def synth_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One y1/y2 regression MMoE trained for one epoch on 1000 synthetic rows."""
    root = tmp_path_factory.mktemp("synth")
    make_mmoe_benchmark(root / "data", 0.5, n_rows=1000, dim=DIM, seed=0)
    cfg = load_config(ROOT / "configs" / "synth_mmoe_benchmark.toml")
    cfg.data.data_dir = str(root / "data")
    cfg.train.epochs = 1
    result = train(cfg, artifacts=root / "artifacts")
    assert result.checkpoint is not None
    return root / "artifacts"


@pytest.fixture(scope="module")
def client(synth_artifacts: Path) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings(synth_artifacts)), raise_server_exceptions=False) as c:
        yield c


def test_a_y1_y2_model_serves_with_default_settings(client: TestClient, synth_artifacts: Path) -> None:
    assert client.get("/readyz").status_code == 200
    context = {f"x{i}": 0.01 * i for i in range(DIM)}
    r = client.post("/rank", json={"user_id": 1, "candidates": [3, 1, 2], "context": context})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == read_latest(synth_artifacts)
    assert body["degraded"] is False
    assert [i["rank"] for i in body["items"]] == [1, 2, 3]
    for item in body["items"]:
        assert set(item["heads"]) == {"y1", "y2"}
        assert all(isinstance(v, float) for v in item["heads"].values())
    # the defaults come from the model: 1 per head, and a sum (regression heads can be <= 0)
    scoring = client.get("/model").json()["scoring"]
    assert scoring["weights"] == {"y1": 1.0, "y2": 1.0} and scoring["combine"] == "sum"
    for item in body["items"]:
        assert item["score"] == pytest.approx(item["heads"]["y1"] + item["heads"]["y2"], rel=1e-9)


def test_request_weights_name_the_models_heads(client: TestClient) -> None:
    ok = client.post("/rank", json={"user_id": 1, "candidates": [1, 2], "weights": {"y2": 0.0, "y1": 2.0}})
    assert ok.status_code == 200, ok.text
    bad = client.post("/rank", json={"user_id": 1, "candidates": [1, 2], "weights": {"engagement": 1.0}})
    assert bad.status_code == 422
    assert "engagement" in bad.json()["error"]["message"] and "y1" in bad.json()["error"]["message"]


def test_models_and_report_list_the_models_own_heads(synth_artifacts: Path, tmp_path: Path) -> None:
    out = CliRunner().invoke(cli, ["models", "--artifacts", str(synth_artifacts), "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)
    assert row["heads"] == ["y1", "y2"]
    assert set(row["test_metrics"]) == {"y1/rmse", "y2/rmse"}
    assert all(isinstance(v, float) for v in row["test_metrics"].values())
    rep = CliRunner().invoke(cli, ["report", "--artifacts", str(synth_artifacts), "--out", str(tmp_path)])
    assert rep.exit_code == 0, rep.output
    page = (tmp_path / "report.html").read_text()
    assert "y1 RMSE" in page and "y2 RMSE" in page and "engagement" not in page
