"""The Redis feature store against a real Redis: materialize, parity with the embedded store, pointers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from modelkit import model_details, service_settings
from typer.testing import CliRunner

from model import load_checkpoint, read_latest, resolve_checkpoint, write_latest
from model.checkpoint import LATEST, models_dir
from model.config import Config, FeatureDecl
from service.app import create_app
from service.cli import app as cli
from service.settings import Settings
from service.store.base import StoreLayout
from service.store.redis_store import row_dtype
from service.store.tables import load_entity_rows

pytestmark = pytest.mark.redis

REQUEST: dict[str, Any] = {
    "user_id": 3,
    "candidates": [
        *range(10, 70),
        99_999_999,  # unknown video
        "unknown-video",
        {"video_id": 71, "features": {"video_duration": 5000, "tag": 7}},
    ],
    "context": {"tab": 2, "hour": 9},
}


def materialize(artifacts: Path, url: str, prefix: str, *extra: str) -> Any:
    args = ["materialize", "--artifacts", str(artifacts), "--redis-url", url, "--prefix", prefix, *extra]
    return CliRunner().invoke(cli, args)


def redis_settings(artifacts: Path, url: str, prefix: str, **overrides: Any) -> Settings:
    redis: dict[str, Any] = {
        "feature_store": "redis",
        "redis_url": url,
        "redis_prefix": prefix,
        "redis_timeout_ms": 500.0,  # a loaded CI box must not turn parity tests into degraded ones
    }
    settings: Settings = service_settings(artifacts, **{**redis, **overrides})
    return settings


@pytest.fixture
def materialized(trained_artifacts: Path, redis_url: str, redis_prefix: str) -> str:
    result = materialize(trained_artifacts, redis_url, redis_prefix)
    assert result.exit_code == 0, result.output
    return redis_prefix


def test_materialize_writes_one_packed_key_per_entity(
    trained_artifacts: Path, redis_url: str, materialized: str
) -> None:
    prefix = materialized
    ckpt = load_checkpoint(resolve_checkpoint(trained_artifacts))
    layout = StoreLayout.of_schema(ckpt.schema)
    r = redis.Redis.from_url(redis_url)
    try:
        meta = json.loads(r.get(prefix + "meta") or b"{}")
        assert meta["format"] == 1 and meta["model_version"] == ckpt.version
        assert StoreLayout.from_dict(meta["layout"]) == layout
        assert meta["layout"]["user"]["cats"] == ckpt.schema.columns("user")[0]  # the model's columns
        users = load_entity_rows(ckpt.config.data, "user", layout.user)
        videos = load_entity_rows(ckpt.config.data, "video", layout.video)
        assert meta["counts"] == {"users": len(users.ids), "videos": len(videos.ids)}
        n_keys = sum(1 for _ in r.scan_iter(match=prefix + "*", count=5000))
        assert n_keys == len(users.ids) + len(videos.ids) + 1  # one key per entity + meta
        assert r.type(f"{prefix}u:{users.ids[0]}") == b"string"  # packed value, not a hash of fields
        # a value is the canonical row: int64 categoricals then float32 numerics, little-endian
        for ent, tag, gl in ((users, "u", layout.user), (videos, "v", layout.video)):
            for i in (0, len(ent.ids) // 2, len(ent.ids) - 1):
                raw = r.get(f"{prefix}{tag}:{ent.ids[i]}")
                assert raw is not None and len(raw) == 8 * len(gl.cats) + 4 * len(gl.nums)
                rec = np.frombuffer(raw, dtype=row_dtype(gl))
                assert (rec["c"][0] == ent.rows.cats[i]).all()
                np.testing.assert_array_equal(rec["n"][0], ent.rows.nums[i])
    finally:
        r.close()


@pytest.mark.slow
def test_embedded_and_redis_stores_score_identically(
    trained_artifacts: Path, redis_url: str, materialized: str
) -> None:
    embedded = service_settings(trained_artifacts)
    with (
        TestClient(create_app(embedded)) as a,
        TestClient(create_app(redis_settings(trained_artifacts, redis_url, materialized))) as b,
    ):
        ra, rb = a.post("/rank", json=REQUEST), b.post("/rank", json=REQUEST)
        assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
        ja, jb = ra.json(), rb.json()
        assert ja["degraded"] is jb["degraded"] is False
        assert [i["video_id"] for i in ja["items"]] == [i["video_id"] for i in jb["items"]]
        for x, y in zip(ja["items"], jb["items"], strict=True):
            assert x["score"] == pytest.approx(y["score"], rel=1e-12, abs=0)
            assert x["heads"] == pytest.approx(y["heads"], rel=1e-12, abs=0)
        # unknown entities are counted the same way by both stores
        for c in (a, b):
            text = c.get("/metrics").text
            assert "mtrank_unknown_videos_total 2.0" in text
        info = model_details(b)["feature_store"]
        assert info["kind"] == "redis" and info["prefix"] == materialized
        assert info["meta"]["model_version"] == read_latest(trained_artifacts)


def test_rows_in_another_layout_are_a_degraded_request_not_a_silent_default(
    trained_artifacts: Path, redis_url: str, materialized: str
) -> None:
    """A video row re-materialised in another layout (its length differs) while the model still reads
    the old one: served with defaults, and the request says so (degraded, reason layout_mismatch)."""
    with TestClient(create_app(redis_settings(trained_artifacts, redis_url, materialized))) as c:
        ok = c.post("/rank", json=REQUEST)
        assert ok.status_code == 200 and ok.json()["degraded"] is False
        r = redis.Redis.from_url(redis_url)
        key = f"{materialized}v:10"
        good = r.get(key)
        assert good is not None
        r.set(key, good + b"\x00" * 4)  # one more float32 column
        try:
            out = c.post("/rank", json=REQUEST)
        finally:
            r.set(key, good)
        assert out.status_code == 200 and out.json()["degraded"] is True
        text = c.get("/metrics").text
        assert 'mtrank_degraded_requests_total{reason="layout_mismatch"} 1.0' in text
        assert "mtrank_unknown_videos_total 4.0" in text  # the 2 unknown videos twice; video 10 is not one
        after = c.post("/rank", json=REQUEST)
        assert after.json()["degraded"] is False and after.json()["items"] == ok.json()["items"]


def test_redis_store_needs_materialized_features(
    trained_artifacts: Path, redis_url: str, redis_prefix: str
) -> None:
    s = redis_settings(trained_artifacts, redis_url, redis_prefix)
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["message"] == "no model loaded yet"
        assert "run `mtrank materialize`" in model_details(c)["last_reload_error"]["error"]  # /admin/model


def test_materialize_refuses_another_layout_unless_replace(
    trained_artifacts: Path, redis_url: str, materialized: str
) -> None:
    r = redis.Redis.from_url(redis_url)
    meta = json.loads(r.get(materialized + "meta") or b"{}")
    meta["layout"]["video"]["nums"] = ["something_else"]
    r.set(materialized + "meta", json.dumps(meta))
    r.close()
    result = materialize(trained_artifacts, redis_url, materialized)
    assert result.exit_code == 2 and "another column layout" in result.output
    result = materialize(trained_artifacts, redis_url, materialized, "--replace")
    assert result.exit_code == 0, result.output


def test_materialize_reports_errors_clearly(
    tmp_path: Path, trained_artifacts: Path, redis_prefix: str
) -> None:
    result = materialize(tmp_path, "redis://127.0.0.1:6379/15", redis_prefix)
    assert result.exit_code == 2 and "LATEST" in result.output
    result = materialize(trained_artifacts, "redis://127.0.0.1:1/0", redis_prefix)
    assert result.exit_code == 2 and "error" in result.output.lower()


def _with_extra_video_feature(cfg: Config) -> None:
    cfg.data.features.append(FeatureDecl(name="visible_status", group="video", kind="numeric"))


@pytest.mark.slow
def test_model_needing_a_column_redis_lacks_is_rejected(
    artifacts_copy: Path, redis_url: str, redis_prefix: str, train_tiny: Any
) -> None:
    assert materialize(artifacts_copy, redis_url, redis_prefix).exit_code == 0
    old = read_latest(artifacts_copy)
    s = redis_settings(artifacts_copy, redis_url, redis_prefix, reload_interval_s=0.1)
    with TestClient(create_app(s)) as c:
        new = train_tiny(artifacts_copy, seed=3, configure=_with_extra_video_feature)
        deadline = time.monotonic() + 20
        while (err := model_details(c)["last_reload_error"]) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert err["version"] == new
        assert "lacks feature columns the model needs: video.visible_status (numeric)" in err["error"]
        out = c.post("/rank", json=REQUEST)
        assert out.status_code == 200 and out.json()["model_version"] == old


@pytest.mark.slow
def test_embedded_store_grows_for_a_model_with_a_new_column(artifacts_copy: Path, train_tiny: Any) -> None:
    s = service_settings(artifacts_copy, reload_interval_s=0.1)
    with TestClient(create_app(s)) as c:
        old = c.get("/model").json()["version"]
        new = train_tiny(artifacts_copy, seed=4, configure=_with_extra_video_feature)
        deadline = time.monotonic() + 20
        while c.get("/model").json()["version"] != new:
            assert time.monotonic() < deadline, model_details(c)["last_reload_error"]
            time.sleep(0.05)
        assert new != old
        assert c.post("/rank", json=REQUEST).json()["model_version"] == new
        cols = model_details(c)["feature_store"]["tables"]["video"]["columns"]["nums"]
        assert cols[-1] == "visible_status"


@pytest.fixture
def two_versions(artifacts_copy: Path, train_tiny: Any) -> Iterator[tuple[Path, str, str]]:
    v0 = read_latest(artifacts_copy)
    v1 = train_tiny(artifacts_copy, seed=1)
    yield artifacts_copy, v0, v1


@pytest.mark.slow
def test_replicas_follow_model_current_via_pubsub(
    two_versions: tuple[Path, str, str], redis_url: str, redis_prefix: str
) -> None:
    artifacts, v0, v1 = two_versions
    assert materialize(artifacts, redis_url, redis_prefix).exit_code == 0
    leader = redis_settings(artifacts, redis_url, redis_prefix, admin_token="s3cret")
    # a long poll interval: only the pub/sub message can make the replica look again in time
    follower = redis_settings(artifacts, redis_url, redis_prefix, reload_interval_s=60.0)
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(leader)) as a, TestClient(create_app(follower)) as b:
        assert a.get("/model").json()["version"] == b.get("/model").json()["version"] == v1
        channel = redis_prefix + "model:events"
        probe = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while dict(probe.pubsub_numsub(channel)).get(channel.encode(), 0) < 2:  # both apps listen
            assert time.monotonic() < deadline, "the apps did not subscribe to the model channel"
            time.sleep(0.05)
        r = a.post("/admin/rollback", json={"version": v0}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "version": v0,
            "previous": v1,
            "changed": True,
            "latest_updated": True,
            "announced": True,
        }
        assert read_latest(artifacts) == v0
        assert json.loads(probe.get(redis_prefix + "model:current")) == {"version": v0, "latest": v0}
        deadline = time.monotonic() + 10
        while b.get("/model").json()["version"] != v0:
            assert time.monotonic() < deadline, "the replica did not follow model:current"
            time.sleep(0.05)
        assert model_details(b)["source"] == "redis"
        # and forward again with /admin/reload (LATEST -> v1)
        write_latest(artifacts, v1)
        r = a.post("/admin/reload", headers=auth)
        assert r.status_code == 200 and r.json()["version"] == v1 and r.json()["announced"] is True
        deadline = time.monotonic() + 10
        while b.get("/model").json()["version"] != v1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert json.loads(probe.get(redis_prefix + "model:current")) == {"version": v1, "latest": v1}
        probe.close()


def set_pointer(url: str, prefix: str, version: str, latest: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.set(prefix + "model:current", json.dumps({"version": version, "latest": latest}))
    finally:
        client.close()


@pytest.mark.slow
def test_every_replica_serves_model_current_across_restarts_until_latest_moves(
    two_versions: tuple[Path, str, str], redis_url: str, redis_prefix: str, train_tiny: Any
) -> None:
    """One source of truth: model:current (what an admin rollback of read-only artifacts records:
    v0 chosen while LATEST named v1) is served by every replica, a new or restarted one too, until
    a training run moves LATEST; then LATEST wins everywhere and model:current follows it."""
    artifacts, v0, v1 = two_versions
    assert materialize(artifacts, redis_url, redis_prefix).exit_code == 0
    set_pointer(redis_url, redis_prefix, v0, latest=v1)
    s = redis_settings(artifacts, redis_url, redis_prefix, reload_interval_s=0.1)

    def versions(*clients: TestClient) -> list[str]:
        return [c.post("/rank", json=REQUEST).json()["model_version"] for c in clients]

    with TestClient(create_app(s)) as a:
        with TestClient(create_app(s)) as b:
            assert versions(a, b) == [v0, v0]
            assert model_details(a)["source"] == "startup"
        with TestClient(create_app(s)) as b:  # replica b restarted: still the fleet's version
            assert versions(a, b) == [v0, v0] and read_latest(artifacts) == v1
        v2 = train_tiny(artifacts, seed=5)  # a training run promotes v2: a newer decision
        with TestClient(create_app(s)) as b:
            deadline = time.monotonic() + 20
            while versions(a, b) != [v2, v2]:
                assert time.monotonic() < deadline, versions(a, b)
                time.sleep(0.1)
    client = redis.Redis.from_url(redis_url)
    assert json.loads(client.get(redis_prefix + "model:current")) == {"version": v2, "latest": v2}
    client.close()
    with TestClient(create_app(s)) as b:  # and a restart after that serves v2 as well
        assert versions(b) == [v2]


@pytest.mark.slow
def test_an_unreadable_latest_does_not_stop_the_redis_pointer(
    two_versions: tuple[Path, str, str], redis_url: str, redis_prefix: str
) -> None:
    artifacts, v0, v1 = two_versions
    assert materialize(artifacts, redis_url, redis_prefix).exit_code == 0
    # a long poll interval and no pub/sub message: the test runs the watcher round itself
    s = redis_settings(artifacts, redis_url, redis_prefix, reload_interval_s=60.0)
    with TestClient(create_app(s)) as c:
        assert c.get("/model").json()["version"] == v1
        latest = models_dir(artifacts) / LATEST
        latest.with_name(".LATEST.test.tmp").write_bytes(b"\xff\xfe")  # not UTF-8
        os.replace(latest.with_name(".LATEST.test.tmp"), latest)
        client = redis.Redis.from_url(redis_url)
        try:
            client.set(redis_prefix + "model:current", v0)
        finally:
            client.close()
        c.portal.call(c.app.state.holder.check)  # one round: LATEST is an error, the pointer still moves
        info = model_details(c)
        assert info["version"] == v0 and info["source"] == "redis"
        assert info["last_reload_error"]["version"] == "LATEST"
        assert c.post("/rank", json=REQUEST).json()["model_version"] == v0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` bind-mounted read-only onto itself (as compose mounts the artifacts): root too
    gets EROFS there, which a chmod would not give it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        yield
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


ADMIN = {"Authorization": "Bearer rollback-token"}


@pytest.mark.slow
def test_an_admin_rollback_of_read_only_artifacts(
    two_versions: tuple[Path, str, str], redis_url: str, redis_prefix: str
) -> None:
    """Without Redis LATEST is the only record every worker follows: a rollback that cannot write
    it is refused (409) and nothing changes. With Redis the rollback is recorded in model:current
    (with the LATEST it was made against) and a new replica serves it; LATEST stays."""
    artifacts, v0, v1 = two_versions
    assert materialize(artifacts, redis_url, redis_prefix).exit_code == 0
    with read_only(models_dir(artifacts)):
        with TestClient(create_app(service_settings(artifacts, admin_token="rollback-token"))) as c:
            r = c.post("/admin/rollback", json={"version": v0}, headers=ADMIN)
            assert r.status_code == 409, r.text
            assert "not writable" in r.json()["error"]["message"]
            assert c.post("/rank", json=REQUEST).json()["model_version"] == v1

        s = redis_settings(artifacts, redis_url, redis_prefix, admin_token="rollback-token")
        with TestClient(create_app(s)) as a:
            r = a.post("/admin/rollback", json={"version": v0}, headers=ADMIN)
            assert r.status_code == 200, r.text
            assert {k: r.json()[k] for k in ("version", "latest_updated", "announced")} == {
                "version": v0,
                "latest_updated": False,
                "announced": True,
            }
            with TestClient(create_app(s)) as b:  # a replica started after the rollback
                assert b.post("/rank", json=REQUEST).json()["model_version"] == v0
        assert read_latest(artifacts) == v1
    client = redis.Redis.from_url(redis_url)
    try:
        assert json.loads(client.get(redis_prefix + "model:current")) == {"version": v0, "latest": v1}
    finally:
        client.close()
