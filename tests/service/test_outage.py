"""Redis outages: a private redis-server is frozen (SIGSTOP), killed and restarted under a live app.

/rank must keep answering with default features (``degraded: true``, counted in /metrics by
reason), never a 5xx, and recover by itself once Redis is back. The degraded scores are exactly the
model's scores of the default rows (every feature missing, the id columns hashed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from modelkit import default_row_heads, metric, model_details, served_default, served_score
from typer.testing import CliRunner

from model import Ranker, resolve_checkpoint
from service.app import create_app
from service.cli import app as cli
from service.metrics import DEGRADED_REASONS
from service.settings import Settings

pytestmark = pytest.mark.redis

# user 91 and a dozen of these videos are in the tiny model's id vocabularies (the 300-user log):
# their hashed ids select trained embedding rows, so degraded rows without the ids would score apart
REQUEST: dict[str, Any] = {
    "user_id": 91,
    "candidates": list(range(10, 110)),
    "context": {"tab": 1, "hour": 12},
}
BREAKER_FAILURES = 3


def degraded_count(client: TestClient, reason: str) -> float:
    return metric(client, "mtrank_degraded_requests_total", reason=reason)


def degraded_counts(client: TestClient) -> dict[str, float]:
    return {r: degraded_count(client, r) for r in DEGRADED_REASONS}


def rank_once(client: TestClient) -> dict[str, Any]:
    r = client.post("/rank", json=REQUEST)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert len(body["items"]) == len(REQUEST["candidates"])
    return body


def wait_recovered(client: TestClient, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = rank_once(client)
        if not body["degraded"]:
            return body
        assert time.monotonic() < deadline, "did not recover from the Redis outage"
        time.sleep(0.05)


def assert_default_features(body: dict[str, Any], artifacts: Path) -> None:
    """Degraded heads are the model's heads for the default rows with the ids hashed in."""
    ranker = Ranker.load(resolve_checkpoint(artifacts))
    vocab = {f.name: set(f.vocab or []) for f in ranker.schema.features}
    assert str(REQUEST["user_id"]) in vocab[ranker.schema.user_key]
    assert len({str(v) for v in REQUEST["candidates"]} & vocab[ranker.schema.video_key]) >= 5
    want = default_row_heads(ranker, REQUEST["user_id"], REQUEST["candidates"], REQUEST["context"])
    by_id = {i["video_id"]: i["heads"] for i in body["items"]}
    for k, v in enumerate(REQUEST["candidates"]):
        for h in ("engagement", "satisfaction"):
            assert by_id[v][h] == pytest.approx(want[h][k], abs=1e-6), (v, h)


@pytest.fixture
def client(trained_artifacts: Path, redis_server: Any) -> Iterator[TestClient]:
    result = CliRunner().invoke(
        cli, ["materialize", "--artifacts", str(trained_artifacts), "--redis-url", redis_server.url]
    )
    assert result.exit_code == 0, result.output
    settings = Settings(
        artifacts=trained_artifacts,
        feature_store="redis",
        redis_url=redis_server.url,
        redis_prefix="mtrank:",
        # generous: a healthy fetch must not miss it on a loaded machine; a frozen Redis always does
        redis_timeout_ms=250,
        redis_breaker_failures=BREAKER_FAILURES,
        redis_breaker_reset_s=1.0,
        reload_interval_s=30,
        warmup_batch=16,
        admin_token=None,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def scores(body: dict[str, Any]) -> dict[Any, float]:
    return {i["video_id"]: i["score"] for i in body["items"]}


@pytest.mark.slow
def test_frozen_redis_degrades_via_the_deadline_and_recovers(
    client: TestClient, redis_server: Any, trained_artifacts: Path
) -> None:
    healthy = rank_once(client)
    assert healthy["degraded"] is False
    before = degraded_counts(client)
    n = 6
    with redis_server.frozen():
        # Redis answers nothing until thawed: every answer here was produced by the fetch deadline
        # (the first BREAKER_FAILURES) or by the open circuit breaker, without Redis
        bodies = [rank_once(client) for _ in range(n)]
        assert model_details(client)["feature_store"]["breaker_open"] is True
    after = degraded_counts(client)
    assert all(b["degraded"] is True for b in bodies)
    assert after["timeout"] >= before["timeout"] + BREAKER_FAILURES
    assert after["breaker_open"] >= before["breaker_open"] + 1
    assert after["timeout"] + after["breaker_open"] == before["timeout"] + before["breaker_open"] + n
    assert (after["connection"], after["error"]) == (before["connection"], before["error"])
    for b in bodies:
        assert_default_features(b, trained_artifacts)
    recovered = wait_recovered(client)
    assert scores(recovered) == pytest.approx(scores(healthy))
    settled = degraded_counts(client)
    assert rank_once(client)["degraded"] is False
    assert degraded_counts(client) == settled  # healthy answers count no degraded reason


@pytest.mark.slow
def test_killed_redis_degrades_without_errors_and_recovers_after_restart(
    client: TestClient, redis_server: Any, trained_artifacts: Path
) -> None:
    healthy = rank_once(client)
    c = redis_server.client()
    c.save()  # the restarted server reloads this snapshot
    c.close()
    redis_server.kill()
    before = degraded_counts(client)
    n = 8
    bodies = [rank_once(client) for _ in range(n)]
    after = degraded_counts(client)
    assert all(b["degraded"] is True for b in bodies)
    assert after["connection"] >= before["connection"] + BREAKER_FAILURES
    assert after["connection"] + after["breaker_open"] == before["connection"] + before["breaker_open"] + n
    assert (after["timeout"], after["error"]) == (before["timeout"], before["error"])
    assert_default_features(bodies[0], trained_artifacts)
    assert_default_features(bodies[-1], trained_artifacts)
    assert client.get("/readyz").status_code == 200  # still ready: it serves, degraded
    redis_server.start()
    recovered = wait_recovered(client)
    assert scores(recovered) == pytest.approx(scores(healthy))


def test_degraded_scores_are_valid_rankings(
    client: TestClient, redis_server: Any, trained_artifacts: Path
) -> None:
    redis_server.kill()
    body = rank_once(client)
    assert body["degraded"] is True
    s = [i["score"] for i in body["items"]]
    assert s == sorted(s, reverse=True) and all(0 <= x <= 1 for x in s)
    assert [i["rank"] for i in body["items"]] == list(range(1, len(s) + 1))
    assert_default_features(body, trained_artifacts)
    method, weights = served_default(trained_artifacts)
    for i in body["items"]:  # the fitted default combination
        assert i["score"] == pytest.approx(served_score(i["heads"], method, weights), rel=1e-9)
