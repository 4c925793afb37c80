"""The service's default combination: the one fitted after training, unless settings or a request
say otherwise; /model shows it with its validation NDCG."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from modelkit import served_default, served_score, service_settings

from model import resolve_checkpoint
from model.checkpoint import seal_manifest
from service.app import create_app

VIDEOS = list(range(10, 40))


def ranked(client: TestClient, **extra: Any) -> list[dict[str, Any]]:
    r = client.post("/rank", json={"user_id": 1, "candidates": VIDEOS, "context": {"tab": 1}, **extra})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def test_the_fitted_combination_is_served_by_default(trained_artifacts: Path) -> None:
    method, weights = served_default(trained_artifacts)
    with TestClient(create_app(service_settings(trained_artifacts))) as c:
        scoring = c.get("/model").json()["scoring"]
        items = ranked(c)
    assert (scoring["combine"], scoring["weights"], scoring["weights_from"]) == (method, weights, "fitted")
    assert set(scoring["fitted"]["validation"]) >= {"ndcg@10", "default_ndcg@10", "heads_ndcg@10", "lists"}
    for i in items:
        assert i["score"] == pytest.approx(served_score(i["heads"], method, weights), rel=1e-9)


def test_request_weights_override_the_fitted_ones(trained_artifacts: Path) -> None:
    method, weights = served_default(trained_artifacts)
    with TestClient(create_app(service_settings(trained_artifacts))) as c:
        items = ranked(c, weights={"satisfaction": 2.0})
    want = {**weights, "satisfaction": 2.0}
    for i in items:
        assert i["score"] == pytest.approx(served_score(i["heads"], method, want), rel=1e-9)


def test_settings_weights_replace_the_fitted_combination(trained_artifacts: Path) -> None:
    settings = service_settings(trained_artifacts, weights={"engagement": 2.0, "satisfaction": 0.5})
    with TestClient(create_app(settings)) as c:
        scoring = c.get("/model").json()["scoring"]
        items = ranked(c)
    assert scoring["weights_from"] == "settings" and scoring["combine"] == "product"  # binary heads
    assert scoring["fitted"] is not None  # still shown
    for i in items:
        assert i["score"] == pytest.approx(served_score(i["heads"], "product", scoring["weights"]), rel=1e-9)


@pytest.mark.slow
def test_another_combine_setting_drops_the_fitted_weights(trained_artifacts: Path) -> None:
    method, weights = served_default(trained_artifacts)
    other = "sum" if method == "product" else "product"
    with TestClient(create_app(service_settings(trained_artifacts, combine=other))) as c:
        scoring = c.get("/model").json()["scoring"]
    assert scoring["combine"] == other and scoring["weights_from"] == "default"
    assert scoring["weights"] == {"engagement": 1.0, "satisfaction": 1.0}
    with TestClient(create_app(service_settings(trained_artifacts, combine=method))) as c:
        assert c.get("/model").json()["scoring"]["weights"] == weights  # the fitted method: its weights


def test_a_model_without_a_fitted_combination_weighs_every_head_1(
    trained_artifacts: Path, tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(trained_artifacts, artifacts)
    path = resolve_checkpoint(artifacts) / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["ranking"]  # a checkpoint trained before combinations were fitted
    path.write_text(json.dumps(seal_manifest(manifest)))  # a fresh digest
    with TestClient(create_app(service_settings(artifacts))) as c:
        scoring = c.get("/model").json()["scoring"]
        items = ranked(c)
    assert scoring["fitted"] is None and scoring["weights_from"] == "default"
    assert (scoring["combine"], scoring["weights"]) == ("product", {"engagement": 1.0, "satisfaction": 1.0})
    for i in items:
        assert i["score"] == pytest.approx(i["heads"]["engagement"] * i["heads"]["satisfaction"], rel=1e-9)
