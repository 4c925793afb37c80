"""User histories online: ``/rank`` reads them from the store, ``POST /events`` appends to them.

Parity: the store starts from the log of the training days only (the embedded store builds its
histories from it at load; ``mtrank materialize`` writes them into Redis); the test days are then
replayed in time order: each impression is ranked, then the events of its timestamp are posted.
Every impression's /rank scores must equal offline evaluation's (whose histories come from the whole
log in one pass), on both stores.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis
from conftest import TrainTiny
from fastapi.testclient import TestClient
from modelkit import DATA_DIR, FIXTURE_LOG, ROOT, metric, model_details, service_settings
from typer.testing import CliRunner

from model import load_checkpoint, resolve_checkpoint
from model.config import Config, SequenceDecl
from model.data import load_dataset
from model.data.history import load_event_tables
from model.sequences import unpack_events
from model.train import predict
from service.app import create_app
from service.cli import app as cli
from service.store.redis_store import history_key

TRAIN_END = 20220430  # the fixture config's last training day


def _with_history(cfg: Config) -> None:
    # sharper than one epoch (see test_train_serve_parity), two histories: attention and mean
    cfg.train.epochs, cfg.train.lr, cfg.train.embed_weight_decay = 4, 0.01, 0.0
    cfg.data.sequences = [
        SequenceDecl("recent_long_views", "long_view", 5, "attention", ["author_id", "tag"]),
        SequenceDecl("likes", ["is_like", "is_follow"], 3, "mean", []),
    ]
    cfg.data.check()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, train_tiny: TrainTiny) -> Path:
    path = tmp_path_factory.mktemp("history")
    train_tiny(path, seed=0, configure=_with_history)
    return path


def log_rows() -> pd.DataFrame:
    """The fixture log as training reads it (exact duplicate rows dropped), from the file itself."""
    return pd.read_csv(DATA_DIR / FIXTURE_LOG).drop_duplicates().reset_index(drop=True)


@pytest.fixture(scope="module")
def train_days_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with the tables and only the training days of the log (under its name)."""
    d = tmp_path_factory.mktemp("train-days")
    for name in ("user_features_pure.csv", "video_features_basic_pure.csv"):
        shutil.copy(DATA_DIR / name, d / name)
    log = pd.read_csv(DATA_DIR / FIXTURE_LOG)
    log[log["date"] <= TRAIN_END].to_csv(d / FIXTURE_LOG, index=False)
    return d


def offline_test_scores(artifacts: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """The test days' rows (file order), their offline heads and history lengths."""
    ckpt = load_checkpoint(resolve_checkpoint(artifacts))
    ds = load_dataset(ckpt.config, schema=ckpt.schema)
    heads = predict(ckpt.model, ds.test, ckpt.config.tasks)
    test = log_rows()
    test = test[test["date"] > TRAIN_END].reset_index(drop=True)
    assert len(test) == len(ds.test)
    np.testing.assert_array_equal(test["time_ms"].to_numpy(), ds.test.times)
    return test, heads, ds.test.seqs["seq.recent_long_views.len"]


def event_of(i: int, row: Any) -> dict[str, Any]:
    labels = {c: int(getattr(row, c)) for c in ("long_view", "is_like", "is_follow", "is_click")}
    return {
        "event_id": f"log-{i}",
        "user_id": int(row.user_id),
        "video_id": int(row.video_id),
        "timestamp": int(row.time_ms),
        "labels": labels,
    }


def replay(client: TestClient, artifacts: Path, limit: int | None = None) -> None:
    """Rank every test impression (the first ``limit`` in time), then post the events of its
    timestamp, in time order."""
    test, offline, lens = offline_test_scores(artifacts)
    ranked, with_history = 0, 0
    for _t, group in test.groupby("time_ms", sort=True):
        if limit is not None and ranked >= limit:
            break
        for i in group.index:
            row = test.loc[i]
            body = {
                "user_id": int(row.user_id),
                "candidates": [int(row.video_id)],
                "context": {"tab": int(row.tab), "hour": int(row.hourmin) // 100},
            }
            r = client.post("/rank", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["degraded"] is False, out
            (item,) = out["items"]
            for head, want in offline.items():
                got = item["heads"][head]
                assert abs(got - want[i]) < 1e-5 and abs(got - want[i]) < 1e-4 * want[i], (
                    i,
                    head,
                    got,
                    want[i],
                )
            ranked += 1
            with_history += int(lens[i] > 0)
        events = [event_of(i, r) for i, r in zip(group.index, group.itertuples(), strict=True)]
        r = client.post("/events", json={"events": events})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(events)
    assert ranked == (len(test) if limit is None else ranked) and with_history > ranked // 2  # most had one


@pytest.mark.slow
def test_embedded_store_replay_scores_as_offline(artifacts: Path, train_days_dir: Path) -> None:
    with TestClient(create_app(service_settings(artifacts, data_dir=train_days_dir))) as c:
        store = model_details(c)["feature_store"]
        assert store["histories"]["recent_long_views"]["users"] > 100
        replay(c, artifacts)
        assert metric(c, "mtrank_events_total", result="accepted") > 1000


@pytest.mark.slow
@pytest.mark.redis
def test_redis_store_replay_scores_as_offline(
    artifacts: Path, train_days_dir: Path, redis_url: str, redis_prefix: str
) -> None:
    args = ["materialize", "--artifacts", str(artifacts), "--redis-url", redis_url, "--prefix", redis_prefix]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(train_days_dir)])
    assert result.exit_code == 0, result.output
    assert "recent_long_views histories" in result.output
    settings = service_settings(
        artifacts,
        feature_store="redis",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        redis_timeout_ms=2000.0,
    )
    with TestClient(create_app(settings)) as c:
        replay(c, artifacts)


@pytest.mark.slow
@pytest.mark.redis
def test_redis_cluster_replay_scores_as_offline(
    artifacts: Path, train_days_dir: Path, tmp_path: Path
) -> None:
    """On a Redis Cluster a user's histories and event ids share the slot of the user's row (hash
    tags): materialize, the events' scripts and /rank work across the nodes."""
    sys.path.insert(0, str(ROOT))
    from scripts.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path / "cluster", masters=3).start()
    try:
        args = ["materialize", "--artifacts", str(artifacts), "--redis-url", cluster.url, "--prefix", "h:"]
        result = CliRunner().invoke(cli, [*args, "--data-dir", str(train_days_dir)])
        assert result.exit_code == 0, result.output
        settings = service_settings(
            artifacts,
            feature_store="redis",
            redis_url=cluster.url,
            redis_prefix="h:",
            redis_timeout_ms=2000.0,
        )
        with TestClient(create_app(settings)) as c:
            assert model_details(c)["feature_store"]["kind"] == "redis"
            replay(c, artifacts, limit=400)
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.redis
def test_materialize_writes_each_users_latest_events(
    artifacts: Path, train_days_dir: Path, redis_url: str, redis_prefix: str
) -> None:
    args = ["materialize", "--artifacts", str(artifacts), "--redis-url", redis_url, "--prefix", redis_prefix]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(train_days_dir)])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(resolve_checkpoint(artifacts))
    tables = load_event_tables(ckpt.config.data, ckpt.schema.sequences, train_days_dir)
    client = redis.Redis.from_url(redis_url)
    try:
        for q in ckpt.schema.sequences:
            table = tables[q.name]
            assert table.users
            for i, user in enumerate(table.users[:50]):
                members = client.zrange(history_key(redis_prefix, q.name, user), 0, -1)
                times, codes = unpack_events(members, q.width)
                h = table.history(i)
                assert 0 < len(members) <= q.max_len
                np.testing.assert_array_equal(times, h.times)
                np.testing.assert_array_equal(codes, h.codes)
        # materializing again changes nothing (the same members), another definition is refused
        again = CliRunner().invoke(cli, [*args, "--data-dir", str(train_days_dir)])
        assert again.exit_code == 0, again.output
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# POST /events


@pytest.fixture
def client(artifacts: Path, train_days_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(service_settings(artifacts, data_dir=train_days_dir))) as c:
        yield c


def _rank(c: TestClient, user: int, videos: list[int]) -> dict[int, float]:
    r = c.post("/rank", json={"user_id": user, "candidates": videos, "context": {"tab": 1, "hour": 18}})
    assert r.status_code == 200, r.text
    return {it["video_id"]: it["heads"]["engagement"] for it in r.json()["items"]}


def test_an_event_changes_the_next_rank_once(client: TestClient) -> None:
    user, videos = 10**9, [4214, 3978, 160]  # a user the log never saw: an empty history
    before = _rank(client, user, videos)
    ev = {
        "event_id": "e1",
        "user_id": user,
        "video_id": 3978,
        "timestamp": 1.7e12,
        "labels": {"long_view": 1},
    }
    r = client.post("/events", json={"events": [ev, {**ev, "event_id": "e2", "labels": {"long_view": 0}}]})
    assert r.json() == {"accepted": 2, "duplicates": 0, "appended": {"recent_long_views": 1, "likes": 0}}
    after = _rank(client, user, videos)
    assert any(abs(after[v] - before[v]) > 1e-6 for v in videos)
    r = client.post("/events", json={"events": [ev]})  # a retry: nothing changes
    assert r.json() == {"accepted": 0, "duplicates": 1, "appended": {"recent_long_views": 0, "likes": 0}}
    assert _rank(client, user, videos) == after
    # the same event under another id is the same history entry
    r = client.post("/events", json={"events": [{**ev, "event_id": "e3"}]})
    assert r.json()["accepted"] == 1 and _rank(client, user, videos) == after


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"events": []}, "events"),
        ({"events": [{"event_id": "a", "user_id": 1, "video_id": 2}]}, "timestamp"),
        ({"events": [{"event_id": "a", "user_id": 1, "video_id": 2, "timestamp": "now"}]}, "timestamp"),
        (
            {
                "events": [
                    {"event_id": "a", "user_id": 1, "video_id": 2, "timestamp": 1, "labels": {"x": "1"}}
                ]
            },
            "labels",
        ),
        ({"events": [{"event_id": [], "user_id": 1, "video_id": 2, "timestamp": 1}]}, "event_id"),
        ({"events": [{"event_id": "a", "user_id": 1, "video_id": 2, "timestamp": 1, "extra": 1}]}, "extra"),
        ([1, 2], "body"),
    ],
)
def test_bad_events_are_a_422_and_record_nothing(client: TestClient, body: Any, where: str) -> None:
    r = client.post("/events", json=body)
    assert r.status_code == 422, r.text
    assert where in r.json()["error"]["message"]
    assert metric(client, "mtrank_events_total", result="accepted") == 0


def test_events_need_the_token_when_one_is_set(artifacts: Path, train_days_dir: Path) -> None:
    settings = service_settings(artifacts, data_dir=train_days_dir, events_token="s3cret", max_events=2)
    ev = {"event_id": "a", "user_id": 1, "video_id": 2, "timestamp": 1, "labels": {"long_view": 1}}
    with TestClient(create_app(settings)) as c:
        assert c.post("/events", json={"events": [ev]}).status_code == 401
        bad = c.post("/events", json={"events": [ev]}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        ok = c.post("/events", json={"events": [ev]}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["accepted"] == 1
        many = c.post("/events", json={"events": [ev] * 3}, headers={"Authorization": "Bearer s3cret"})
        assert many.status_code == 422 and "at most 2" in many.json()["error"]["message"]


@pytest.mark.slow
@pytest.mark.redis
def test_redis_history_failures_degrade_never_500(
    artifacts: Path, train_days_dir: Path, redis_server: Any
) -> None:
    """A broken history member is served as an empty history and flagged; a Redis that does not
    answer degrades /rank and makes /events a 503 (nothing recorded, safe to retry)."""
    prefix = "mtrank-hist:"
    args = ["materialize", "--artifacts", str(artifacts), "--redis-url", redis_server.url, "--prefix", prefix]
    assert CliRunner().invoke(cli, [*args, "--data-dir", str(train_days_dir)]).exit_code == 0
    settings = service_settings(
        artifacts,
        feature_store="redis",
        redis_url=redis_server.url,
        redis_prefix=prefix,
        redis_timeout_ms=500.0,
        redis_breaker_failures=100,
    )
    ev = {"event_id": "z", "user_id": 7, "video_id": 2, "timestamp": 1.7e12, "labels": {"long_view": 1}}
    with TestClient(create_app(settings)) as c:
        r = c.post("/events", json={"events": [ev]})
        assert r.status_code == 200 and r.json()["appended"]["recent_long_views"] == 1
        raw = redis_server.client()
        raw.zadd(history_key(prefix, "recent_long_views", "7"), {b"short": 1.0})
        out = c.post("/rank", json={"user_id": 7, "candidates": [1, 2]}).json()
        assert out["degraded"] is True and out["degraded_reason"] == "history_malformed"
        raw.close()
        redis_server.kill()
        out = c.post("/rank", json={"user_id": 7, "candidates": [1, 2]})
        assert out.status_code == 200 and out.json()["degraded"] is True
        r = c.post("/events", json={"events": [{**ev, "event_id": "y"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "events_not_recorded"


@pytest.mark.slow
@pytest.mark.redis
def test_redis_store_refuses_a_model_whose_histories_were_not_materialized(
    artifacts: Path, redis_url: str, redis_prefix: str, trained_artifacts: Path
) -> None:
    """Materialized for a model without histories: a model with histories is not served (its
    histories would all read empty), with a message naming the fix."""
    args = ["materialize", "--artifacts", str(trained_artifacts), "--redis-url", redis_url]
    assert CliRunner().invoke(cli, [*args, "--prefix", redis_prefix]).exit_code == 0
    settings = service_settings(
        artifacts,
        feature_store="redis",
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        redis_timeout_ms=2000.0,
    )
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").status_code == 503
        err = model_details(c)["last_reload_error"]["error"]
        assert "recent_long_views" in err and "materialize" in err


# --------------------------------------------------------------------------------------------
# mtrank replay of a history model: each list sees the histories of its own time


@pytest.mark.slow
def test_replay_gives_each_list_the_histories_before_it(artifacts: Path, tmp_path: Path) -> None:
    from model.replay import HistoriesAsOf, at_list_time, list_times, logged_lists
    from service.replay import offline_heads, run_replay, serve_in_process

    ckpt = load_checkpoint(resolve_checkpoint(artifacts))
    cfg, specs = ckpt.config, ckpt.schema.sequences
    as_of = HistoriesAsOf(cfg, specs, DATA_DIR)
    log = log_rows()
    users = sorted(set(log["user_id"].astype(str)))[::5]
    for q in (0.05, 0.3, 0.9):
        cut = int(log["time_ms"].quantile(q))
        # the reference: a store's histories built from the log's rows strictly before the cut
        d = tmp_path / f"before-{q}"
        d.mkdir()
        for name in ("user_features_pure.csv", "video_features_basic_pure.csv"):
            shutil.copy(DATA_DIR / name, d / name)
        log[log["time_ms"] < cut].to_csv(d / FIXTURE_LOG, index=False)
        want = load_event_tables(cfg.data, specs, d)
        seen = 0
        for u in users:
            got = as_of.at(u, float(cut))
            for s in specs:
                ref = want[s.name].as_dict().get(u)
                expect = ref.codes if ref is not None else np.zeros((0, s.width), np.int64)
                np.testing.assert_array_equal(got[s.name], expect, err_msg=f"{u} {s.name} {cut}")
                seen += len(expect)
        assert seen > 0

    # end to end: the in-process replay scores the rows at their list's first time as offline does
    lists = logged_lists(cfg, "test")
    version = resolve_checkpoint(artifacts).name
    served = serve_in_process(service_settings(artifacts), version, lists)
    offline, _ = offline_heads(artifacts, version, cfg, "test")
    m = lists.same_context & at_list_time(lists)
    assert m.sum() > 100 and list_times(lists) is not None
    for head, s in served.heads.items():
        assert np.abs(s[m] - offline[head][lists.split_rows[m]]).max() < 1e-5, head
    out = run_replay(artifacts=artifacts, resamples=50, max_lists=200)
    assert out["parity"]["rows"] > 0 and max(out["parity"]["max_abs_diff"].values()) < 1e-5
