"""Inputs the model does not declare are refused (422 naming the key) unless strict_features is off;
values unseen in training stay valid and the response says so (unknown user / video, unseen context)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from modelkit import service_settings

from service.app import create_app

KNOWN_USER, KNOWN_VIDEOS = 0, [10, 11, 12]  # in the fixture's tables
UNKNOWN_USER, UNKNOWN_VIDEOS = 987_654_321, [99_999_991, "no-such-video"]


@pytest.fixture(scope="module")
def client(trained_artifacts: Path) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings(trained_artifacts)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def lenient(trained_artifacts: Path) -> Iterator[TestClient]:
    settings = service_settings(trained_artifacts, strict_features=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, **body: Any) -> tuple[int, dict[str, Any]]:
    body.setdefault("user_id", KNOWN_USER)
    body.setdefault("candidates", KNOWN_VIDEOS)
    r = client.post("/rank", json=body)
    return r.status_code, r.json()


def test_a_context_key_the_model_does_not_declare_is_a_422_naming_it(client: TestClient) -> None:
    code, out = post(client, context={"tab": 1, "hours": 20})  # a typo of "hour"
    assert code == 422
    err = out["error"]
    assert err["code"] == "validation_error"
    assert "context" in err["message"] and "'hours'" in err["message"] and "'hour'" in err["message"]
    assert [d["loc"] for d in err["details"]] == ["context.hours"]


def test_an_inline_feature_the_model_does_not_declare_is_a_422_naming_it(client: TestClient) -> None:
    cands = [10, {"video_id": 11, "features": {"video_duration": 1000, "duration_ms": 5}}]
    code, out = post(client, candidates=cands)
    assert code == 422
    assert "candidates[1].features" in out["error"]["message"] and "'duration_ms'" in out["error"]["message"]
    assert out["error"]["details"][0]["loc"] == "candidates[1].features.duration_ms"


def test_strict_features_off_ignores_undeclared_keys(client: TestClient, lenient: TestClient) -> None:
    plain_code, plain = post(lenient, context={"tab": 1, "hour": 20}, candidates=[10, 11])
    code, out = post(
        lenient,
        context={"tab": 1, "hour": 20, "hours": 7},
        candidates=[10, {"video_id": 11, "features": {"not_a_feature": 3}}],
    )
    assert plain_code == code == 200
    assert [(i["video_id"], i["score"]) for i in out["items"]] == [
        (i["video_id"], i["score"]) for i in plain["items"]
    ]
    # the same request is refused by the default (strict) service
    assert post(client, context={"tab": 1, "hour": 20, "hours": 7})[0] == 422


def test_unknown_user_and_videos_are_flagged(client: TestClient) -> None:
    code, out = post(client, user_id=UNKNOWN_USER, candidates=[*KNOWN_VIDEOS, *UNKNOWN_VIDEOS])
    assert code == 200, out
    assert out["unknown_user"] is True and out["degraded"] is False and out["degraded_reason"] is None
    flags = {i["video_id"]: i["unknown_video"] for i in out["items"]}
    assert flags == {**dict.fromkeys(KNOWN_VIDEOS, False), **dict.fromkeys(UNKNOWN_VIDEOS, True)}
    code, out = post(client, user_id=KNOWN_USER, candidates=KNOWN_VIDEOS)
    assert code == 200 and out["unknown_user"] is False
    assert all(i["unknown_video"] is False for i in out["items"])


def test_context_values_unseen_in_training_are_valid_and_named(client: TestClient) -> None:
    code, seen = post(client, context={"tab": 1, "hour": 20})
    assert code == 200 and seen["unseen_context"] == []
    code, out = post(client, context={"tab": 12345, "hour": 20})
    assert code == 200 and out["unseen_context"] == ["tab"]
    code, out = post(client, context={"tab": "nope", "hour": 99})
    assert code == 200 and sorted(out["unseen_context"]) == ["hour", "tab"]
    code, out = post(client, context={"tab": None})  # missing, not unseen
    assert code == 200 and out["unseen_context"] == []
