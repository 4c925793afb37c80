"""The Redis feature store on a real local Redis Cluster (3 primaries, 1 replica each, started here
in a temporary folder): keys in hash-tag buckets, scores equal to the embedded store's, and a
primary's failover answered with degraded responses at worst, never an error, then healed."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from modelkit import ROOT, model_details, service_settings
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli
from service.store.redis_store import CLUSTER_BUCKETS, entity_key, meta_key

sys.path.insert(0, str(ROOT))
from scripts.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.redis

PREFIX = "mtrank-cluster-test:"
REQUEST: dict[str, Any] = {
    "user_id": 3,
    "candidates": [*range(10, 90), 99_999_999, {"video_id": 91, "features": {"video_duration": 5000}}],
    "context": {"tab": 2, "hour": 9},
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    c = LocalRedisCluster(tmp_path / "cluster", masters=3, replicas=1)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def materialized_cluster(cluster: LocalRedisCluster, trained_artifacts: Path) -> LocalRedisCluster:
    args = [
        "materialize",
        "--artifacts",
        str(trained_artifacts),
        "--redis-url",
        cluster.url,
        "--prefix",
        PREFIX,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    # every replica holds the writes before any test kills its primary (replication is async)
    assert "3/3 replicas in sync" in result.output, result.output
    return cluster


def cluster_settings(artifacts: Path, cluster: LocalRedisCluster, **overrides: Any) -> Any:
    base = {
        "feature_store": "redis",
        "redis_url": cluster.url,
        "redis_prefix": PREFIX,
        "redis_timeout_ms": 1000.0,
    }
    return service_settings(artifacts, **{**base, **overrides})


@pytest.mark.slow
def test_materialize_writes_bucketed_keys_and_the_cluster_scores_like_the_embedded_store(
    materialized_cluster: LocalRedisCluster, trained_artifacts: Path
) -> None:
    c = redis.RedisCluster.from_url(materialized_cluster.url)
    try:
        assert c.get(entity_key(PREFIX, "video", "10", CLUSTER_BUCKETS)) is not None
        assert c.get(entity_key(PREFIX, "video", "10")) is None  # no plain key: the bucketed layout
        slots = {c.keyslot(entity_key(PREFIX, "video", str(v), CLUSTER_BUCKETS)) for v in range(10, 500)}
        assert len(slots) <= CLUSTER_BUCKETS  # a request touches at most that many slots
        assert b'"key_buckets": 16' in c.get(meta_key(PREFIX))
    finally:
        c.close()
    with (
        TestClient(create_app(service_settings(trained_artifacts))) as a,
        TestClient(create_app(cluster_settings(trained_artifacts, materialized_cluster))) as b,
    ):
        ja, jb = a.post("/rank", json=REQUEST).json(), b.post("/rank", json=REQUEST).json()
        assert ja["degraded"] is jb["degraded"] is False
        assert [i["video_id"] for i in ja["items"]] == [i["video_id"] for i in jb["items"]]
        for x, y in zip(ja["items"], jb["items"], strict=True):
            assert x["score"] == pytest.approx(y["score"], rel=1e-12, abs=0)
            assert x["unknown_video"] is y["unknown_video"]
        store = model_details(b)["feature_store"]
        assert store["cluster"] is True and store["key_buckets"] == CLUSTER_BUCKETS
        assert b.get("/readyz").status_code == 200


@pytest.mark.slow
def test_a_primary_failover_degrades_requests_at_worst_and_heals(
    materialized_cluster: LocalRedisCluster, trained_artifacts: Path
) -> None:
    cluster = materialized_cluster
    s = cluster_settings(trained_artifacts, cluster, redis_breaker_reset_s=0.2, reload_interval_s=0.5)
    with TestClient(create_app(s)) as client:
        assert client.post("/rank", json=REQUEST).json()["degraded"] is False
        victim = cluster.primary_of(entity_key(PREFIX, "user", "3", CLUSTER_BUCKETS))
        cluster.kill(victim)
        outcomes = []
        deadline = time.monotonic() + 60
        while True:  # every request answered while the cluster fails over; healed afterwards
            r = client.post("/rank", json=REQUEST)
            assert r.status_code == 200, r.text
            body = r.json()
            outcomes.append(body["degraded_reason"])
            if (
                not body["degraded"]
                and len(outcomes) > 1
                and cluster.primaries()
                and victim not in cluster.primaries()
            ):
                break
            assert time.monotonic() < deadline, f"not healed after the failover: {outcomes[-5:]}"
            time.sleep(0.1)
        assert victim not in cluster.primaries()
        assert set(outcomes) - {None} <= {"timeout", "connection", "breaker_open", "error"}
        for _ in range(5):
            assert client.post("/rank", json=REQUEST).json()["degraded"] is False
