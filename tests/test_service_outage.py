"""Redis outages: a private redis-server is paused, killed and restarted under a live app.

/rank must keep answering within its deadline with default features (``degraded: true``, counted in
/metrics), never a 5xx, and recover by itself once Redis is back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli
from service.settings import Settings

pytestmark = pytest.mark.redis

REQUEST = {"user_id": 3, "candidates": list(range(10, 110)), "context": {"tab": 1, "hour": 12}}
BUDGET_S = 0.2  # a degraded answer must still be fast: deadline (30 ms) + scoring, far below this


def degraded_count(client: TestClient, reason: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "mtrank_degraded_requests_total" and s.labels.get("reason") == reason:
                return float(s.value)
    raise AssertionError("mtrank_degraded_requests_total not exposed")


def timed_rank(client: TestClient) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    r = client.post("/rank", json=REQUEST)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert len(body["items"]) == len(REQUEST["candidates"])
    return elapsed, body


def wait_recovered(client: TestClient, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        _, body = timed_rank(client)
        if not body["degraded"]:
            return body
        assert time.monotonic() < deadline, "did not recover from the Redis outage"
        time.sleep(0.05)


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
        redis_timeout_ms=30,
        redis_breaker_failures=3,
        redis_breaker_reset_s=0.3,
        reload_interval_s=30,
        warmup_batch=16,
        admin_token=None,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def scores(body: dict[str, Any]) -> dict[Any, float]:
    return {i["video_id"]: i["score"] for i in body["items"]}


def test_client_pause_degrades_within_deadline_and_recovers(client: TestClient, redis_server: Any) -> None:
    _, healthy = timed_rank(client)
    assert healthy["degraded"] is False
    timeouts0 = degraded_count(client, "timeout")
    redis_server.pause(2000)
    t_pause = time.monotonic()
    for _ in range(6):  # the first ones wait for the deadline, then the breaker answers at once
        elapsed, body = timed_rank(client)
        assert body["degraded"] is True
        assert elapsed < BUDGET_S, f"degraded answer took {elapsed * 1000:.0f} ms"
    assert time.monotonic() - t_pause < 1.9, "the test must run while Redis is still paused"
    assert degraded_count(client, "timeout") >= timeouts0 + 1
    assert degraded_count(client, "breaker_open") >= 1
    recovered = wait_recovered(client)
    assert scores(recovered) == pytest.approx(scores(healthy))


def test_killed_redis_degrades_without_errors_and_recovers_after_restart(
    client: TestClient, redis_server: Any
) -> None:
    _, healthy = timed_rank(client)
    c = redis_server.client()
    c.save()  # the restarted server reloads this snapshot
    c.close()
    redis_server.kill()
    connection0 = degraded_count(client, "connection")
    for _ in range(8):
        elapsed, body = timed_rank(client)
        assert body["degraded"] is True
        assert elapsed < BUDGET_S
    assert degraded_count(client, "connection") >= connection0 + 1
    assert client.get("/readyz").status_code == 200  # still ready: it serves, degraded
    redis_server.start()
    recovered = wait_recovered(client)
    assert scores(recovered) == pytest.approx(scores(healthy))


def test_degraded_scores_are_valid_rankings(client: TestClient, redis_server: Any) -> None:
    redis_server.kill()
    _, body = timed_rank(client)
    assert body["degraded"] is True
    s = [i["score"] for i in body["items"]]
    assert s == sorted(s, reverse=True) and all(0 <= x <= 1 for x in s)
    assert [i["rank"] for i in body["items"]] == list(range(1, len(s) + 1))
