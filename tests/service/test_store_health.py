"""A wiped or evicted Redis is noticed (real Redis, own key prefix; a private redis-server for the empty
restart): degraded responses with a reason, /readyz 503, Prometheus gauges and an error log line; and it
recovers once the features are materialised again. A traffic unknown-rate far above the materialised
data's marks responses degraded too."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisServer, delete_keys
from fastapi.testclient import TestClient
from modelkit import metric, model_details, service_settings, wait_for
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli

pytestmark = pytest.mark.redis

BODY: dict[str, Any] = {"user_id": 3, "candidates": list(range(10, 40)), "context": {"tab": 2, "hour": 9}}


def materialize(artifacts: Path, url: str, prefix: str) -> None:
    args = ["materialize", "--artifacts", str(artifacts), "--redis-url", url, "--prefix", prefix]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output


@contextmanager
def served(artifacts: Path, url: str, prefix: str, **overrides: Any) -> Iterator[TestClient]:
    settings = service_settings(
        artifacts,
        feature_store="redis",
        redis_url=url,
        redis_prefix=prefix,
        redis_timeout_ms=1000.0,
        reload_interval_s=0.1,  # the watcher round also checks the store's health
        **overrides,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def rank(client: TestClient, body: dict[str, Any] = BODY) -> dict[str, Any]:
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_materialize_records_the_health_sample_and_the_expected_unknown_rate(
    trained_artifacts: Path, redis_url: str, redis_prefix: str
) -> None:
    materialize(trained_artifacts, redis_url, redis_prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        meta = json.loads(client.get(redis_prefix + "meta") or b"{}")
        for group, tag in (("user", "u"), ("video", "v")):
            sample = meta["sample"][group]
            assert len(sample) == min(100, meta["counts"][group + "s"]) and len(set(sample)) == len(sample)
            assert client.exists(*[f"{redis_prefix}{tag}:{i}" for i in sample]) == len(sample)
        # the fixture log's users and videos all have rows in the KuaiRand tables
        assert meta["expected_unknown"] == {"user": 0.0, "video": 0.0}
    finally:
        client.close()


@pytest.mark.slow
def test_a_wiped_prefix_is_degraded_and_not_ready_until_materialised_again(
    trained_artifacts: Path, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    materialize(trained_artifacts, redis_url, redis_prefix)
    with served(trained_artifacts, redis_url, redis_prefix) as client:
        assert client.get("/readyz").status_code == 200
        out = rank(client)
        assert out["degraded"] is False and out["unknown_user"] is False
        assert metric(client, "mtrank_feature_store_problem", problem="meta_missing") == 0

        with caplog.at_level(logging.ERROR, logger="service"):
            assert delete_keys(redis_url, redis_prefix) > 0  # what FLUSHALL does to this prefix
            wait_for(lambda: client.get("/readyz").status_code == 503, what="/readyz to fail")
        ready = client.get("/readyz").json()["error"]["message"]
        assert "meta_missing" in ready and redis_prefix not in ready  # what to do: /admin/model
        assert "mtrank materialize" in model_details(client)["feature_store"]["health"]["detail"]
        assert any("meta_missing" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        before = metric(client, "mtrank_degraded_requests_total", reason="meta_missing")
        out = rank(client)
        assert out["degraded"] is True and out["degraded_reason"] == "meta_missing"
        assert out["unknown_user"] is True and all(i["unknown_video"] for i in out["items"])
        assert metric(client, "mtrank_degraded_requests_total", reason="meta_missing") == before + 1
        assert metric(client, "mtrank_feature_store_problem", problem="meta_missing") == 1

        materialize(trained_artifacts, redis_url, redis_prefix)
        wait_for(lambda: client.get("/readyz").status_code == 200, what="/readyz to recover")
        out = rank(client)
        assert out["degraded"] is False and out["degraded_reason"] is None
        assert metric(client, "mtrank_feature_store_problem", problem="meta_missing") == 0


@pytest.mark.slow
def test_most_keys_evicted_is_degraded_and_not_ready(
    trained_artifacts: Path, redis_url: str, redis_prefix: str
) -> None:
    materialize(trained_artifacts, redis_url, redis_prefix)
    with served(trained_artifacts, redis_url, redis_prefix) as client:
        assert client.get("/readyz").status_code == 200
        r = redis.Redis.from_url(redis_url)
        try:  # an LRU eviction of 60% of the entity keys; the meta key survives
            keys = [k for k in r.scan_iter(match=f"{redis_prefix}[uv]:*", count=1000)]
            gone = random.Random(0).sample(keys, int(0.6 * len(keys)))
            for i in range(0, len(gone), 1000):
                r.unlink(*gone[i : i + 1000])
        finally:
            r.close()
        wait_for(lambda: client.get("/readyz").status_code == 503, what="/readyz to fail")
        assert "evicted" in client.get("/readyz").json()["error"]["message"]
        out = rank(client)
        assert out["degraded"] is True and out["degraded_reason"] == "evicted"
        assert metric(client, "mtrank_feature_store_problem", problem="evicted") == 1
        assert 0.2 < metric(client, "mtrank_feature_store_sampled_keys_present_ratio") < 0.6
        assert model_details(client)["feature_store"]["health"]["problem"] == "evicted"


@pytest.mark.slow
def test_an_empty_restart_of_redis_is_noticed(trained_artifacts: Path, redis_server: RedisServer) -> None:
    prefix = "mtrank:"
    materialize(trained_artifacts, redis_server.url, prefix)
    with served(trained_artifacts, redis_server.url, prefix) as client:
        assert client.get("/readyz").status_code == 200
        redis_server.kill()
        redis_server.start()  # no persistence: it comes back empty
        wait_for(lambda: client.get("/readyz").status_code == 503, what="/readyz to fail")
        out = rank(client)
        assert out["degraded"] is True and out["degraded_reason"] == "meta_missing"


@pytest.mark.slow
def test_an_unknown_rate_far_above_the_expected_marks_responses_degraded(
    trained_artifacts: Path, redis_url: str, redis_prefix: str
) -> None:
    materialize(trained_artifacts, redis_url, redis_prefix)
    unknown = {"user_id": 10**12, "candidates": [10**12 + i for i in range(20)], "context": {}}
    with served(trained_artifacts, redis_url, redis_prefix, unknown_rate_window=4) as client:
        outs = [rank(client, unknown) for _ in range(5)]
        assert [o["degraded"] for o in outs] == [False] * 3 + [True] * 2  # judged when a window is full
        assert outs[-1]["degraded_reason"] == "unknown_rate"
        wait_for(lambda: metric(client, "mtrank_unknown_rate", group="video") == 1.0, what="the gauge")
        assert client.get("/readyz").status_code == 200  # traffic-based: degraded, still ready
        outs = [rank(client) for _ in range(5)]  # known users and videos again
        assert outs[-1]["degraded"] is False and outs[-1]["degraded_reason"] is None
