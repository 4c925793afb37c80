"""`mtrank replay`: the test days' impressions as request-like lists, replayed through the service's
own ranking path (in process and against a running server), with parity against offline scores."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import TrainTiny
from modelkit import DATA_DIR, FIXTURE_LOG, service_settings, tiny_config
from typer.testing import CliRunner

from model import load_checkpoint, resolve_checkpoint
from model.config import Config
from model.replay import POPULARITY, RANDOM, SERVED, UNFITTED, LoggedLists, judge, logged_lists
from model.scoring import combine_scores
from service.cli import app as cli
from service.replay import offline_heads, run_replay, serve_in_process, serve_url


def _sharper(cfg: Config) -> None:
    # a few epochs at a higher rate: heads that differ between rows (parity on near-constant scores
    # would prove little)
    cfg.train.epochs, cfg.train.lr, cfg.train.embed_weight_decay = 4, 0.01, 0.0


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, train_tiny: TrainTiny) -> Path:
    path = tmp_path_factory.mktemp("replay")
    train_tiny(path, seed=0, configure=_sharper)
    return path


@pytest.fixture(scope="module")
def lists() -> LoggedLists:
    return logged_lists(tiny_config(), "test")


def reference_lists(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fixture log's test rows (duplicates dropped, log order) and its lists as the issue
    defines them, computed with pandas from the file: user x date x tab, in time order, a video
    once (its first impression), at least 2 videos and some gain long_view + 5 * is_like."""
    log = pd.read_csv(DATA_DIR / FIXTURE_LOG).drop_duplicates().reset_index(drop=True)
    lo, hi = cfg.data.test_range
    test = log[(log["date"] >= lo) & (log["date"] <= hi)].reset_index(drop=True)
    test["gain"] = test["long_view"] + 5.0 * test["is_like"]
    test["hour"] = test["hourmin"] // 100
    rows = test.reset_index(names="split_row").sort_values(
        ["user_id", "date", "tab", "time_ms"], kind="stable"
    )
    rows = rows.drop_duplicates(["user_id", "date", "tab", "video_id"], keep="first")
    keep = rows.groupby(["user_id", "date", "tab"])["gain"].transform(lambda g: len(g) >= 2 and g.max() > 0)
    return test, rows[keep.astype(bool)]


def test_lists_are_the_logged_user_day_tab_groups(lists: LoggedLists) -> None:
    cfg = tiny_config()
    test, ref = reference_lists(cfg)
    want = {}
    for (user, _, _), g in ref.groupby(["user_id", "date", "tab"]):
        want[(user, tuple(g["video_id"]))] = (
            g,
            {"tab": int(g["tab"].iloc[0]), "hour": int(g["hour"].iloc[0])},
        )
    assert len(lists) == len(want) > 20
    assert lists.counts["split_rows"] == len(test)
    sizes = np.diff(lists.starts)
    assert sizes.min() >= 2 and lists.rows == len(ref)
    for i in range(len(lists)):
        body = lists.request(i)
        g, context = want[(body["user_id"], tuple(body["candidates"]))]  # same user, videos, order
        assert body["context"] == context  # the list's first impression's context
        a, b = lists.starts[i], lists.starts[i + 1]
        np.testing.assert_array_equal(lists.split_rows[a:b], g["split_row"])  # rows of the split
        np.testing.assert_array_equal(lists.gain[a:b], g["gain"])
        np.testing.assert_array_equal(lists.same_context[a:b], g["hour"].to_numpy() == context["hour"])
    assert 0 < lists.same_context.sum() < lists.rows  # some rows were logged in a later hour


def test_popularity_is_the_smoothed_training_days_rate(lists: LoggedLists) -> None:
    cfg = tiny_config()
    log = pd.read_csv(DATA_DIR / FIXTURE_LOG).drop_duplicates()
    lo, hi = cfg.data.train_range
    days = log[(log["date"] >= lo) & (log["date"] <= hi)]
    gain = days["long_view"] + 5.0 * days["is_like"]
    m, mean = lists.popularity_info["prior"], gain.mean()
    per = gain.groupby(days["video_id"]).agg(["sum", "size"])
    rate = (per["sum"] + m * mean) / (per["size"] + m)
    _, ref = reference_lists(cfg)
    videos = [v for i in range(len(lists)) for v in lists.request(i)["candidates"]]
    want = [rate.get(v, mean) for v in videos]
    np.testing.assert_allclose(lists.popularity, want, rtol=1e-12)
    assert lists.popularity_info["chosen_on"] == "validation lists"
    assert lists.popularity_info["videos"] == len(per)


def test_judge_reports_each_policy_against_popularity(lists: LoggedLists) -> None:
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    perfect = lists.gain + 1e-3 * rng.random(lists.rows)  # orders every list by its gain
    out = judge(lists, {SERVED: perfect, POPULARITY: lists.popularity}, cfg, resamples=200)
    assert out[SERVED]["ndcg@10"]["mean"] == pytest.approx(1.0)
    d = out[SERVED]["ndcg@10_minus_popularity"]
    assert d["low"] <= d["mean"] <= d["high"] and d["mean"] > 0
    assert d["mean"] == pytest.approx(1.0 - out[POPULARITY]["ndcg@10"]["mean"])
    assert "ndcg@10_minus_popularity" not in out[POPULARITY]


@pytest.mark.slow
def test_replay_through_the_service_path_matches_offline_scores(artifacts: Path) -> None:
    version = resolve_checkpoint(artifacts).name
    ckpt = load_checkpoint(resolve_checkpoint(artifacts))
    fitted = ckpt.manifest["ranking"]["combination"]
    cfg = ckpt.config
    lists = logged_lists(cfg, "test")
    served = serve_in_process(service_settings(artifacts), version, lists)
    assert served.version == version and served.scoring["weights_from"] == "fitted"
    # the served default is the fitted combination of the served heads
    want = combine_scores(served.heads, fitted["weights"], fitted["method"])
    np.testing.assert_allclose(served.scores, want, rtol=1e-12)
    offline, times = offline_heads(artifacts, version, cfg, "test")
    np.testing.assert_array_equal(times, lists.split_times)
    same = lists.same_context
    for head, s in served.heads.items():
        diff = np.abs(s[same] - offline[head][lists.split_rows[same]])
        assert diff.max() < 1e-5, head
        assert np.ptp(s) > 1e-3  # scores that differ between rows
    # rows logged in a later hour were scored in the list's context: not offline's row context
    other = ~same
    assert other.any()
    assert (
        max(np.abs(s[other] - offline[h][lists.split_rows[other]]).max() for h, s in served.heads.items())
        > 1e-5
    )


@pytest.mark.slow
def test_replay_against_a_running_server_gives_the_in_process_scores(
    artifacts: Path, serve_process: Callable[..., Any]
) -> None:
    svc = serve_process(args=["--artifacts", str(artifacts)])
    lists = logged_lists(load_checkpoint(resolve_checkpoint(artifacts)).config, "test").take(40)
    remote = serve_url(svc.url, lists)
    local = serve_in_process(service_settings(artifacts), resolve_checkpoint(artifacts).name, lists)
    assert remote.version == local.version
    # the same model, the same requests: float32 forward passes in another process (other thread
    # counts) agree to their rounding
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-5)
    for head in local.heads:
        np.testing.assert_allclose(remote.heads[head], local.heads[head], rtol=1e-5, atol=1e-7)
    assert remote.scoring["weights"] == local.scoring["weights"]
    rep = run_replay(artifacts=artifacts, url=svc.url, max_lists=40, resamples=100)
    assert rep["via"].startswith("POST http://127.0.0.1") and rep["parity"]["rows"] > 0
    assert max(rep["parity"]["max_abs_diff"].values()) < 1e-5


@pytest.mark.slow
def test_cli_replay_writes_a_report_that_mtrank_report_shows(artifacts: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli, ["replay", "--artifacts", str(artifacts), "--max-lists", "30", "--resamples", "100", "--json"]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["policies"]) == {
        SERVED,
        UNFITTED,
        "head:engagement",
        "head:satisfaction",
        POPULARITY,
        RANDOM,
    }
    assert rep["counts"]["lists"] == 30 and rep["objective"]["group_by"] == ["user_id", "date", "tab"]
    assert rep["served"]["weights_from"] == "fitted"
    assert max(rep["parity"]["max_abs_diff"].values()) < 1e-5
    for e in rep["policies"].values():
        assert e["ndcg@10"]["low"] <= e["ndcg@10"]["mean"] <= e["ndcg@10"]["high"]
    saved = artifacts / "reports" / f"replay-{rep['version']}-test.json"
    assert json.loads(saved.read_text())["policies"] == rep["policies"]
    out = CliRunner().invoke(cli, ["report", "--artifacts", str(artifacts), "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    page = (tmp_path / "report.html").read_text()
    assert "Served order replayed" in page and "Served combination and calibration" in page
    assert rep["version"] in page


def test_cli_replay_explains_a_missing_model(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["replay", "--artifacts", str(tmp_path)])
    assert r.exit_code == 2 and "LATEST" in r.output
