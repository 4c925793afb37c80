"""The HTTP API against the embedded feature store and a tiny real checkpoint (no mocks)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from modelkit import default_row_heads, metric, model_details, served_default, served_score, service_settings

from model import Ranker, read_latest, resolve_checkpoint, write_latest
from model.checkpoint import models_dir
from service.app import create_app
from service.settings import Settings

USERS = [0, 1, 2, 3]  # in user_features_pure.csv
VIDEOS = list(range(10, 60))  # in video_features_basic_pure.csv
JSON = {"content-type": "application/json"}


def settings_for(artifacts: Path, **overrides: Any) -> Settings:
    limits: dict[str, Any] = {"max_candidates": 2000, "max_body_bytes": 256 * 1024}
    settings: Settings = service_settings(artifacts, **{**limits, **overrides})
    return settings


@pytest.fixture(scope="module")
def client(trained_artifacts: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(trained_artifacts)), raise_server_exceptions=False) as c:
        yield c


def rank(client: TestClient, **body: Any) -> dict[str, Any]:
    body.setdefault("user_id", USERS[0])
    body.setdefault("candidates", VIDEOS[:20])
    body.setdefault("context", {"tab": 1, "hour": 20})
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


# --------------------------------------------------------------------------------------------
# happy path


def test_rank_returns_every_candidate_sorted_with_heads(client: TestClient, trained_artifacts: Path) -> None:
    cands = VIDEOS[:30]
    method, weights = served_default(trained_artifacts)
    out = rank(client, candidates=cands)
    assert out["model_version"] == read_latest(trained_artifacts)
    assert out["degraded"] is False
    items = out["items"]
    assert [i["rank"] for i in items] == list(range(1, len(cands) + 1))
    assert sorted(i["video_id"] for i in items) == sorted(cands)
    assert all(type(i["video_id"]) is int for i in items)  # ids come back as sent
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    for i in items:
        assert set(i["heads"]) == {"engagement", "satisfaction"}
        assert all(0.0 <= v <= 1.0 for v in i["heads"].values())
        # by default the combination fitted after training (the checkpoint's manifest)
        assert i["score"] == pytest.approx(served_score(i["heads"], method, weights), rel=1e-6)
    assert len({round(s, 12) for s in scores}) > 1  # the model distinguishes the candidates


def test_rank_is_deterministic_and_independent_of_order(client: TestClient) -> None:
    a = rank(client, candidates=VIDEOS[:25])
    b = rank(client, candidates=list(reversed(VIDEOS[:25])))
    sa = {i["video_id"]: i["score"] for i in a["items"]}
    sb = {i["video_id"]: i["score"] for i in b["items"]}
    assert sa == pytest.approx(sb, rel=1e-6)


def test_top_k_returns_the_best_k(client: TestClient) -> None:
    full = rank(client, candidates=VIDEOS[:30])["items"]
    top = rank(client, candidates=VIDEOS[:30], top_k=5)["items"]
    assert [i["video_id"] for i in top] == [i["video_id"] for i in full[:5]]
    assert [i["rank"] for i in top] == [1, 2, 3, 4, 5]
    assert len(rank(client, candidates=VIDEOS[:30], top_k=30)["items"]) == 30


def assert_best_first(hand_scores: list[float]) -> None:
    """The items came best first by the hand-computed scores (up to rounding between equal ones)."""
    for k, (a, b) in enumerate(itertools.pairwise(hand_scores)):
        assert a >= b * (1 - 1e-9), (k, a, b)


def hand_product(heads: dict[str, float], we: float, ws: float) -> float:
    """prod_i s_i ** w_i, written out for the two heads (s ** 0 == 1: a zero weight drops its head)."""
    return float(heads["engagement"] ** we * heads["satisfaction"] ** ws)


@pytest.mark.parametrize(
    ("weights", "we", "ws"),
    [
        ({"engagement": 1.0, "satisfaction": 0.0}, 1.0, 0.0),  # engagement alone
        ({"engagement": 0.0, "satisfaction": 1.0}, 0.0, 1.0),  # satisfaction alone
        ({"satisfaction": 3.5}, 1.0, 3.5),  # engagement keeps its default weight 1
        ({"engagement": 2.5, "satisfaction": 0.5}, 2.5, 0.5),
    ],
)
def test_weight_override_scores_are_the_weighted_product_of_the_heads(
    client: TestClient, weights: dict[str, float], we: float, ws: float
) -> None:
    default = {i["video_id"]: i["heads"] for i in rank(client, candidates=VIDEOS[:40])["items"]}
    items = rank(client, candidates=VIDEOS[:40], weights=weights)["items"]
    for i in items:
        assert i["heads"] == pytest.approx(default[i["video_id"]], rel=1e-12)  # weights never change heads
        assert i["score"] == pytest.approx(hand_product(i["heads"], we, ws), rel=1e-9)
    if (we, ws) == (1.0, 3.5):
        for i in items:
            e, s = i["heads"]["engagement"], i["heads"]["satisfaction"]
            assert i["score"] == pytest.approx(e * s * s * s * math.sqrt(s), rel=1e-9)
    assert_best_first([hand_product(i["heads"], we, ws) for i in items])
    assert [i["rank"] for i in items] == list(range(1, len(items) + 1))


def test_weight_override_with_the_sum_combination(trained_artifacts: Path) -> None:
    s = settings_for(trained_artifacts, combine="sum")
    with TestClient(create_app(s)) as c:
        items = rank(c, candidates=VIDEOS[:40], weights={"engagement": 0.5, "satisfaction": 4.0})["items"]
    for i in items:
        e, sat = i["heads"]["engagement"], i["heads"]["satisfaction"]
        assert i["score"] == pytest.approx(0.5 * e + 4.0 * sat, rel=1e-9)
    assert_best_first([0.5 * i["heads"]["engagement"] + 4.0 * i["heads"]["satisfaction"] for i in items])


def test_weights_change_the_order(client: TestClient) -> None:
    eng, sat = {"engagement": 1, "satisfaction": 0}, {"engagement": 0, "satisfaction": 1}
    by_eng = [i["video_id"] for i in rank(client, candidates=VIDEOS, weights=eng)["items"]]
    by_sat = [i["video_id"] for i in rank(client, candidates=VIDEOS, weights=sat)["items"]]
    assert by_eng != by_sat


def test_sum_combination_from_settings(trained_artifacts: Path) -> None:
    s = settings_for(trained_artifacts, combine="sum", weights={"engagement": 2.0, "satisfaction": 1.0})
    with TestClient(create_app(s)) as c:
        items = rank(c)["items"]
    for i in items:
        assert i["score"] == pytest.approx(
            2 * i["heads"]["engagement"] + i["heads"]["satisfaction"], rel=1e-6
        )


def test_string_ids_unicode_ids_and_candidate_objects(client: TestClient) -> None:
    cands: list[Any] = [10, "11", {"video_id": 12}, {"id": "视频-🎬"}, {"video_id": "x" * 256}]
    items = rank(client, user_id="no-such-user-∆", candidates=cands)["items"]
    assert sorted(map(str, (i["video_id"] for i in items))) == sorted(
        ["10", "11", "12", "视频-🎬", "x" * 256]
    )
    # string "11" is the same video as int 11: same features, same score
    a = {str(i["video_id"]): i["score"] for i in items}
    b = {
        str(i["video_id"]): i["score"]
        for i in rank(client, user_id="no-such-user-∆", candidates=[10, 11, 12])["items"]
    }
    assert a["11"] == pytest.approx(b["11"]) and a["12"] == pytest.approx(b["12"])


def test_inline_features_override_the_store(client: TestClient) -> None:
    cands = VIDEOS[:6]
    base = {i["video_id"]: i["score"] for i in rank(client, candidates=cands)["items"]}
    featured = cands[3]  # not first: the inline row must land on its own candidate's position
    inline = {"video_id": featured, "features": {"video_duration": 10_000_000, "music_type": 99}}
    sent: list[Any] = [*cands[:3], inline, *cands[4:]]
    over = {i["video_id"]: i["score"] for i in rank(client, candidates=sent)["items"]}
    assert over[featured] != pytest.approx(base[featured], rel=1e-9)
    for v in cands:  # the others are untouched
        if v != featured:
            assert over[v] == pytest.approx(base[v], rel=1e-9), v
    # the same candidate with the same inline features alone: the same score
    (alone,) = rank(client, candidates=[inline])["items"]
    assert alone["score"] == pytest.approx(over[featured], rel=1e-9)
    # an empty features object changes nothing (unknown names: tests/service/test_strict_inputs.py)
    same = rank(client, candidates=[{"video_id": VIDEOS[1], "features": {}}, *VIDEOS[2:5]])
    assert {i["video_id"]: i["score"] for i in same["items"]}[VIDEOS[1]] == pytest.approx(base[VIDEOS[1]])


def test_unknown_user_and_videos_are_counted(client: TestClient, trained_artifacts: Path) -> None:
    users0 = metric(client, "mtrank_unknown_users_total")
    videos0 = metric(client, "mtrank_unknown_videos_total")
    scored0 = metric(client, "mtrank_candidates_scored_total")
    unknown: list[Any] = [99_999_991, 99_999_992, "nope"]
    context = {"tab": 1, "hour": 20}
    out = rank(client, user_id=987_654_321, candidates=[10, 11, *unknown], context=context)
    assert out["degraded"] is False and len(out["items"]) == 5
    assert metric(client, "mtrank_unknown_users_total") == users0 + 1
    assert metric(client, "mtrank_unknown_videos_total") == videos0 + 3
    assert metric(client, "mtrank_candidates_scored_total") == scored0 + 5
    # unknown videos get the default row; their ids are hashed into the id feature, but ids the model
    # never saw all encode to the same "unknown" embedding row: equal scores, the defaults' score
    by_id = {i["video_id"]: i for i in out["items"]}
    ranker = Ranker.load(resolve_checkpoint(trained_artifacts))
    want = default_row_heads(ranker, 987_654_321, unknown, context)
    for k, v in enumerate(unknown):
        assert by_id[v]["score"] == by_id[unknown[0]]["score"]
        for h in ("engagement", "satisfaction"):
            assert by_id[v]["heads"][h] == pytest.approx(want[h][k], abs=1e-6)


@pytest.mark.slow
def test_a_video_the_model_knows_but_the_store_lacks_keeps_its_id_embedding(
    trained_artifacts: Path, tmp_path: Path
) -> None:
    """A video in the model's vocabulary but missing from the store's table is an unknown video,
    yet its id column is still hashed (hash_ids): it scores with its own trained id embedding."""
    ranker = Ranker.load(resolve_checkpoint(trained_artifacts))
    data = ranker.config.data
    vocab = next(f.vocab for f in ranker.schema.features if f.name == ranker.schema.video_key)
    assert vocab is not None
    videos = pd.read_csv(data.path(data.videos or ""))
    in_table = set(videos[data.video_key].astype(str))
    known = int(next(v for v in vocab if v in in_table))
    tables = tmp_path / "tables"
    tables.mkdir()
    videos[videos[data.video_key] != known].to_csv(tables / (data.videos or ""), index=False)
    (tables / (data.users or "")).symlink_to(data.path(data.users or ""))

    user, context = 987_654_321, {"tab": 1, "hour": 20}  # an unknown user: its row is the default too
    cands: list[Any] = [known, 99_999_991]
    with TestClient(create_app(settings_for(trained_artifacts))) as full:
        in_store = {i["video_id"]: i for i in rank(full, user_id=user, candidates=cands)["items"]}
    with TestClient(create_app(settings_for(trained_artifacts, data_dir=tables))) as trimmed:
        videos0 = metric(trimmed, "mtrank_unknown_videos_total")
        out = rank(trimmed, user_id=user, candidates=cands, context=context)
        assert metric(trimmed, "mtrank_unknown_videos_total") == videos0 + 2
    by_id = {i["video_id"]: i for i in out["items"]}
    assert by_id[known]["score"] != pytest.approx(by_id[99_999_991]["score"], rel=1e-6, abs=0)
    assert by_id[known]["score"] != pytest.approx(in_store[known]["score"], rel=1e-6, abs=0)
    assert by_id[99_999_991]["score"] == pytest.approx(in_store[99_999_991]["score"], rel=1e-9)
    want = default_row_heads(ranker, user, cands, context)
    for k, v in enumerate(cands):
        for h in ("engagement", "satisfaction"):
            assert by_id[v]["heads"][h] == pytest.approx(want[h][k], abs=1e-6)


def test_max_candidates_are_accepted(client: TestClient) -> None:
    out = rank(client, candidates=list(range(2000)))
    assert len(out["items"]) == 2000


# --------------------------------------------------------------------------------------------
# validation: 4xx with a clear message, never a 500

BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("empty candidates", {"user_id": 1, "candidates": []}, 422, "candidates"),
    ("too many candidates", {"user_id": 1, "candidates": list(range(2001))}, 422, "at most 2000"),
    ("duplicate ids", {"user_id": 1, "candidates": [1, 2, 1]}, 422, "duplicate video ids '1'"),
    ("int and str duplicate", {"user_id": 1, "candidates": [7, "7"]}, 422, "duplicate"),
    ("duplicate objects", {"user_id": 1, "candidates": [{"video_id": 3}, 3]}, 422, "duplicate"),
    ("float id", {"user_id": 1, "candidates": [1.5]}, 422, "candidates[0]: must be a video id"),
    ("bool id", {"user_id": 1, "candidates": [True]}, 422, "candidates[0]: must be a video id"),
    ("null id", {"user_id": 1, "candidates": [None]}, 422, "candidates[0]: must be a video id"),
    ("list id", {"user_id": 1, "candidates": [[1]]}, 422, "candidates[0]: must be a video id"),
    ("empty string id", {"user_id": 1, "candidates": [""]}, 422, "candidates[0]: must be a video id"),
    ("object without id", {"user_id": 1, "candidates": [{"features": {}}]}, 422, "candidates[0].video_id"),
    ("object extra key", {"user_id": 1, "candidates": [{"video_id": 1, "x": 1}]}, 422, "candidates[0].x"),
    ("huge int id", {"user_id": 1, "candidates": [2**70]}, 422, "candidates[0]"),
    ("too long string id", {"user_id": 1, "candidates": ["x" * 257]}, 422, "candidates[0]"),
    ("candidates not a list", {"user_id": 1, "candidates": 5}, 422, "candidates"),
    ("missing user", {"candidates": [1]}, 422, "user_id: Field required"),
    ("bad user type", {"user_id": 1.25, "candidates": [1]}, 422, "user_id: must be an integer id"),
    ("extra field", {"user_id": 1, "candidates": [1], "foo": 1}, 422, "foo: Extra inputs"),
    ("top_k zero", {"user_id": 1, "candidates": [1, 2], "top_k": 0}, 422, "top_k"),
    (
        "top_k too large",
        {"user_id": 1, "candidates": [1, 2], "top_k": 3},
        422,
        "top_k: must be between 1 and",
    ),
    ("top_k string", {"user_id": 1, "candidates": [1, 2], "top_k": "1"}, 422, "top_k"),
    ("top_k huge, not echoed", {"user_id": 1, "candidates": [1, 2], "top_k": 10**300}, 422, "candidates (2)"),
    (
        "unknown weight",
        {"user_id": 1, "candidates": [1], "weights": {"clicks": 1}},
        422,
        "unknown head(s) ['clicks']",
    ),
    (
        "negative weight",
        {"user_id": 1, "candidates": [1], "weights": {"engagement": -1}},
        422,
        "between 0 and 10",
    ),
    (
        "too large weight",
        {"user_id": 1, "candidates": [1], "weights": {"engagement": 11}},
        422,
        "between 0 and 10",
    ),
    (
        "all weights zero",
        {"user_id": 1, "candidates": [1], "weights": {"engagement": 0, "satisfaction": 0}},
        422,
        "> 0",
    ),
    (
        "weight not a number",
        {"user_id": 1, "candidates": [1], "weights": {"engagement": "1"}},
        422,
        "weights.engagement",
    ),
    ("nested context", {"user_id": 1, "candidates": [1], "context": {"tab": {"a": 1}}}, 422, "context.tab"),
    ("context not an object", {"user_id": 1, "candidates": [1], "context": [1]}, 422, "context"),
    (
        "bad inline numeric",
        {"user_id": 1, "candidates": [1, {"video_id": 2, "features": {"video_duration": "long"}}]},
        422,
        "candidates[1].features: video feature 'video_duration' must be a number",
    ),
    ("body is a list", [1, 2], 422, "request body must be a JSON object"),
    ("body is a string", "hello", 422, "request body must be a JSON object"),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_invalid_requests_get_a_clear_4xx(
    client: TestClient, name: str, body: Any, status: int, message: str
) -> None:
    r = client.post("/rank", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    assert message in err["message"], err["message"]
    assert "0" * 50 not in r.text  # a client's huge number is never echoed back


RAW_BAD: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("NaN list", b"[NaN]", JSON, 422, "request body must be a JSON object"),
    ("NaN candidate", b'{"user_id": 1, "candidates": [NaN]}', JSON, 422, "candidates[0]: must be a video id"),
    ("NaN weight", b'{"user_id": 1, "candidates": [1], "weights": {"engagement": NaN}}', JSON, 422, "finite"),
    (
        "Infinity weight",
        b'{"user_id": 1, "candidates": [1], "weights": {"engagement": Infinity}}',
        JSON,
        422,
        "finite",
    ),
    (
        "NaN context",
        b'{"user_id": 1, "candidates": [1], "context": {"hour": NaN}}',
        JSON,
        422,
        "context.hour",
    ),
    (
        "huge number weight",
        b'{"user_id": 1, "candidates": [1], "weights": {"engagement": 1e999}}',
        JSON,
        422,
        "weights",
    ),
    (
        "5000-digit id",
        b'{"user_id": 1, "candidates": [' + b"9" * 5000 + b"]}",
        JSON,
        422,
        "number out of range",
    ),
    ("lone surrogate id", b'{"user_id": "\\ud800", "candidates": [1]}', JSON, 422, "JSON"),
    ("not JSON", b"hello", JSON, 422, "request body is not valid JSON"),
    ("truncated JSON", b'{"user_id": 1, "candidates": [1', JSON, 422, "request body is not valid JSON"),
    ("empty body", b"", JSON, 422, "not valid JSON"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, JSON, 422, "recursion limit"),
    (
        "deep nesting (small)",
        b'{"user_id": 1, "candidates": [1], "context": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        JSON,
        422,
        "",
    ),
    ("invalid utf-8", b'{"user_id": "\xff\xfe", "candidates": [1]}', JSON, 422, ""),
    (
        "text/plain",
        b'{"user_id": 1, "candidates": [1]}',
        {"content-type": "text/plain"},
        415,
        "application/json",
    ),
    ("form", b"user_id=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "not supported"),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "message"), RAW_BAD, ids=[b[0] for b in RAW_BAD]
)
def test_malformed_bodies_never_500(
    client: TestClient, name: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    r = client.post("/rank", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_missing_content_type_is_read_as_json(client: TestClient) -> None:
    r = client.post("/rank", content=json.dumps({"user_id": 1, "candidates": [10, 11]}).encode())
    assert r.status_code == 200, r.text


def test_oversize_body_is_413_with_and_without_content_length(client: TestClient) -> None:
    big = json.dumps({"user_id": 1, "candidates": list(range(60_000))}).encode()
    assert len(big) > 256 * 1024
    r = client.post("/rank", content=big, headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = client.post("/rank", content=chunks(), headers=JSON)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    r = client.get("/rank")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_failed_requests_are_counted(client: TestClient) -> None:
    before = metric(client, "mtrank_rank_requests_total", outcome="invalid")
    client.post("/rank", json={"user_id": 1, "candidates": []})
    assert metric(client, "mtrank_rank_requests_total", outcome="invalid") == before + 1
    assert metric(client, "mtrank_rank_requests_total", outcome="error") == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
rank_like = st.fixed_dictionaries(
    {},
    optional={
        "user_id": json_values,
        "candidates": st.lists(json_values, max_size=6) | json_values,
        "context": json_values,
        "top_k": json_values,
        "weights": st.dictionaries(st.sampled_from(["engagement", "satisfaction", "x"]), json_values)
        | json_values,
    },
)


@pytest.mark.slow
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=rank_like | json_values)
def test_fuzzed_bodies_never_500(client: TestClient, body: Any) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    r = client.post("/rank", content=raw, headers=JSON)
    assert r.status_code in (200, 413, 422), (r.status_code, raw[:300], r.text[:300])
    if r.status_code == 200:
        items = r.json()["items"]
        assert all(math.isfinite(i["score"]) for i in items)


# --------------------------------------------------------------------------------------------
# ops endpoints


def test_health_model_and_docs(client: TestClient, trained_artifacts: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    version = read_latest(trained_artifacts)
    assert client.get("/readyz").json() == {"status": "ready", "model_version": version}
    public = client.get("/model").json()  # the details are GET /admin/model
    assert public["version"] == version and public["status"] == "ready" and "config" not in public
    assert (
        public["scoring"]["weights_from"] == "fitted"
        and "ndcg@10" in public["scoring"]["fitted"]["validation"]
    )
    info = model_details(client)  # GET /admin/model
    assert info["version"] == version and info["arch"] == "mmoe"
    assert [t["name"] for t in info["tasks"]] == ["engagement", "satisfaction"]
    assert "test/engagement/auc" in info["metrics"]
    assert info["config"]["model"]["arch"] == "mmoe"
    assert info["loaded_at"] and info["source"] == "startup" and info["last_reload_error"] is None
    method, weights = served_default(trained_artifacts)
    scoring = info["scoring"]
    assert {k: scoring[k] for k in ("combine", "weights", "weights_from", "weight_bounds")} == {
        "combine": method,
        "weights": weights,
        "weights_from": "fitted",
        "weight_bounds": [0.0, 10.0],
    }
    fitted = scoring["fitted"]
    assert fitted["method"] == method and fitted["weights"] == weights
    assert fitted["validation"]["ndcg@10"] >= fitted["validation"]["default_ndcg@10"]
    assert fitted["objective"]["group_by"] == ["user_id", "date", "tab"]
    store = info["feature_store"]
    assert store["kind"] == "embedded" and store["tables"]["user"]["rows"] > 20_000
    spec = client.get("/openapi.json").json()
    body_ref = spec["paths"]["/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref == "#/components/schemas/RankRequest"
    assert {"RankRequest", "Candidate", "RankResponse"} <= set(spec["components"]["schemas"])
    assert "/admin/reload" not in spec["paths"]  # disabled without a token
    assert client.get("/docs").status_code == 200


def test_metrics_expose_latency_histograms(client: TestClient) -> None:
    rank(client)
    text = client.get("/metrics").text
    for name in ("mtrank_request_seconds", "mtrank_feature_fetch_seconds", "mtrank_model_forward_seconds"):
        assert f'{name}_bucket{{le="0.0005"}}' in text and f'{name}_bucket{{le="0.02"}}' in text
        assert metric(client, f"{name}_count") >= 1
    assert metric(client, "mtrank_model_info", arch="mmoe") == 1
    assert metric(client, "mtrank_model_reload_total", result="ok") == 1
    assert metric(client, "mtrank_model_reload_total", result="error") == 0


def test_admin_endpoints_are_404_without_a_token(client: TestClient) -> None:
    for path in ("/admin/reload", "/admin/rollback"):
        r = client.post(path, json={"version": "x"}, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 404, r.text


def test_not_ready_until_a_model_appears(trained_artifacts: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "empty"
    s = settings_for(artifacts, reload_interval_s=0.1)
    with TestClient(create_app(s)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = c.post("/rank", json={"user_id": 1, "candidates": [1]})
        assert r.status_code == 503 and "no model loaded" in r.json()["error"]["message"]
        assert c.get("/model").json()["version"] is None
        # a model arrives: the watcher loads it without a restart
        version = read_latest(trained_artifacts)
        shutil.copytree(models_dir(trained_artifacts) / version, models_dir(artifacts) / version)
        write_latest(artifacts, version)
        deadline = time.monotonic() + 15
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model not picked up"
            time.sleep(0.05)
        assert rank(c)["model_version"] == version


def test_create_app_builds_nothing_until_started(trained_artifacts: Path) -> None:
    app = create_app(settings_for(trained_artifacts))
    assert getattr(app.state, "holder", None) is None  # the lifespan loads the model
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
    assert app.state.holder is None  # closed on shutdown
