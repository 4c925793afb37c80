"""Synthetic generators: determinism, the properties they promise, and loading end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.config import DATA_DIR_ENV, Config, load_config
from model.data import load_dataset
from model.synth import SYNTH_KINDS, make_mmoe_benchmark, make_youtube_log, position_bias

ROOT = Path(__file__).resolve().parents[2]
YOUTUBE_CONFIG = ROOT / "configs" / "synth_youtube_mmoe.toml"
MMOE_CONFIG = ROOT / "configs" / "synth_mmoe_benchmark.toml"

SMALL_YT = {"n_users": 300, "n_videos": 200, "n_impressions": 20000, "days": 7}


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def youtube(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_youtube_log(tmp_path_factory.mktemp("yt"), seed=3, **SMALL_YT)


@pytest.fixture(scope="module")
def yt_log(youtube: dict[str, Path]) -> pd.DataFrame:
    return pd.read_parquet(youtube["log"])


def _bytes(paths: dict[str, Path]) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in paths.items()}


def test_kinds() -> None:
    assert {"mmoe": make_mmoe_benchmark, "youtube": make_youtube_log} == SYNTH_KINDS


# --------------------------------------------------------------------------------------------
# determinism


def test_mmoe_deterministic(tmp_path: Path) -> None:
    a = make_mmoe_benchmark(tmp_path / "a", 0.5, n_rows=500, dim=10, seed=7)
    b = make_mmoe_benchmark(tmp_path / "b", 0.5, n_rows=500, dim=10, seed=7)
    c = make_mmoe_benchmark(tmp_path / "c", 0.5, n_rows=500, dim=10, seed=8)
    assert set(a) == {"log", "meta"}
    assert _bytes(a) == _bytes(b)
    pd.testing.assert_frame_equal(pd.read_parquet(a["log"]), pd.read_parquet(b["log"]))
    assert not pd.read_parquet(a["log"]).equals(pd.read_parquet(c["log"]))


def test_youtube_deterministic(tmp_path: Path, youtube: dict[str, Path]) -> None:
    again = make_youtube_log(tmp_path / "again", seed=3, **SMALL_YT)
    assert set(again) == {"log", "users", "videos", "meta"}
    assert _bytes(again) == _bytes(youtube)
    other = make_youtube_log(tmp_path / "other", seed=4, **SMALL_YT)
    assert not pd.read_parquet(other["log"]).equals(pd.read_parquet(youtube["log"]))


# --------------------------------------------------------------------------------------------
# MMoE benchmark


def test_mmoe_layout(tmp_path: Path) -> None:
    paths = make_mmoe_benchmark(tmp_path, 0.3, n_rows=1000, dim=12, seed=1)
    df = pd.read_parquet(paths["log"])
    xs = [f"x{j}" for j in range(12)]
    assert list(df.columns) == ["user_id", "video_id", "day", "time", *xs, "y1", "y2"]
    assert all(df[c].dtype == np.float32 for c in xs)
    rows = np.arange(1000)
    np.testing.assert_array_equal(df["user_id"], rows // 10)
    np.testing.assert_array_equal(df["video_id"], rows)
    np.testing.assert_array_equal(df["time"], rows)
    assert df["day"].tolist() == [0] * 800 + [1] * 200
    assert not (tmp_path / "users.parquet").exists()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_mmoe_label_correlation_follows_p(tmp_path: Path) -> None:
    corr_y: dict[float, float] = {}
    for p in (0.1, 0.5, 0.9):
        paths = make_mmoe_benchmark(tmp_path / str(p), p, n_rows=5000, dim=100, seed=0)
        df = pd.read_parquet(paths["log"])
        meta = json.loads(paths["meta"].read_text())
        x = df[[f"x{j}" for j in range(100)]].to_numpy(dtype=np.float64)
        w1, w2 = np.array(meta["w1"]), np.array(meta["w2"])
        assert abs(np.linalg.norm(w1) - 1.0) < 1e-9 and abs(np.linalg.norm(w2) - 1.0) < 1e-9
        assert w1 @ w2 == pytest.approx(p, abs=1e-9)  # cosine = p exactly
        assert _corr(x @ w1, x @ w2) == pytest.approx(p, abs=0.05)  # linear parts
        corr_y[p] = _corr(df["y1"].to_numpy(), df["y2"].to_numpy())
    assert corr_y[0.1] < corr_y[0.5] < corr_y[0.9]
    assert corr_y[0.9] - corr_y[0.1] > 0.3


def test_mmoe_identical_tasks_at_p1(tmp_path: Path) -> None:
    df = pd.read_parquet(make_mmoe_benchmark(tmp_path, 1.0, n_rows=2000, dim=20, seed=2)["log"])
    # only the label noise differs
    assert _corr(df["y1"].to_numpy(), df["y2"].to_numpy()) > 0.99


def test_mmoe_alpha_std_sets_how_wiggly_the_target_is(tmp_path: Path) -> None:
    """alpha_std = 0 leaves y = w.x + const + noise; a larger spread of the sines' frequencies moves
    the target away from its linear part (same seed: same directions, same x)."""
    r2 = {}
    for a in (0.0, 1.0, 3.0):
        paths = make_mmoe_benchmark(tmp_path / str(a), 0.0, n_rows=4000, dim=10, seed=3, alpha_std=a)
        df = pd.read_parquet(paths["log"])
        x = df[[f"x{i}" for i in range(10)]].to_numpy(np.float64)
        y = df["y1"].to_numpy()
        fit = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
        r2[a] = 1 - np.var(y - np.c_[x, np.ones(len(x))] @ fit) / np.var(y)
        assert json.loads(paths["meta"].read_text())["params"]["alpha_std"] == a
    assert r2[0.0] > 0.98 and r2[0.0] > r2[1.0] > r2[3.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"correlation": 1.5},
        {"correlation": 0.5, "dim": 1},
        {"correlation": 0.5, "n_rows": 1},
        {"correlation": 0.5, "alpha_std": -1.0},
    ],
)
def test_mmoe_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_mmoe_benchmark(tmp_path, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# YouTube-like log


def test_youtube_layout(youtube: dict[str, Path], yt_log: pd.DataFrame) -> None:
    assert list(yt_log.columns) == [
        "user_id", "video_id", "day", "time", "hour", "position", "device",
        "click", "long_view", "watch_time_s", "like",
    ]  # fmt: skip
    assert len(yt_log) == SMALL_YT["n_impressions"]
    assert set(yt_log["day"]) == set(range(SMALL_YT["days"]))
    assert yt_log["time"].is_monotonic_increasing
    assert (yt_log["time"] // 86400 == yt_log["day"]).all()
    assert set(yt_log["position"]) == set(range(1, 11))
    users, videos = pd.read_parquet(youtube["users"]), pd.read_parquet(youtube["videos"])
    assert list(users.columns) == ["user_id", "age_bucket", "country", "primary_device", "activity"]
    assert list(videos.columns) == ["video_id", "category", "duration_s", "upload_days", "creator_id"]
    assert users["user_id"].is_unique and videos["video_id"].is_unique
    assert yt_log["user_id"].isin(users["user_id"]).all()
    assert yt_log["video_id"].isin(videos["video_id"]).all()
    # a slate never shows a video twice
    slates = yt_log.groupby(["user_id", "time"])["video_id"]
    assert (slates.nunique() == slates.size()).all()


def test_youtube_like_observed_only_on_clicks(yt_log: pd.DataFrame) -> None:
    np.testing.assert_array_equal(yt_log["like"].isna().to_numpy(), (yt_log["click"] == 0).to_numpy())
    assert set(yt_log["like"].dropna()) == {0.0, 1.0}
    assert set(yt_log["click"]) == {0, 1}


def test_youtube_watch_time_and_long_view(youtube: dict[str, Path], yt_log: pd.DataFrame) -> None:
    videos = pd.read_parquet(youtube["videos"]).set_index("video_id")
    dur = videos.loc[yt_log["video_id"], "duration_s"].to_numpy()
    watch, click = yt_log["watch_time_s"].to_numpy(), yt_log["click"].to_numpy()
    assert (watch[click == 0] == 0).all()
    assert (watch[click == 1] > 0).all() and (watch <= dur).all()
    np.testing.assert_array_equal(yt_log["long_view"].to_numpy(), (watch > 0.5 * dur).astype(np.int64))
    assert 0 < yt_log["long_view"].sum() < yt_log["click"].sum()


def test_youtube_engagement_and_satisfaction_related_not_identical(yt_log: pd.DataFrame) -> None:
    clicked = yt_log[yt_log["click"] == 1]
    r = _corr(clicked["long_view"].to_numpy(float), clicked["like"].to_numpy(float))
    assert 0.02 < r < 0.8


def test_youtube_position_bias(yt_log: pd.DataFrame) -> None:
    ctr = yt_log.groupby("position")["click"].mean()
    assert ctr[1] > ctr[10] + 0.1
    assert ctr[1] > ctr[5] > ctr[10]
    dev = np.array(["mobile", "tv"], dtype=object)
    pos = np.array([1, 1], dtype=np.int64)
    np.testing.assert_array_equal(position_bias(pos, dev), [0.0, 0.0])
    ten = position_bias(np.array([10, 10], dtype=np.int64), dev)
    assert ten[0] < ten[1] < 0  # steeper on mobile than on a TV


def test_youtube_popularity_is_skewed(yt_log: pd.DataFrame) -> None:
    counts = yt_log["video_id"].value_counts().to_numpy()
    top = counts[: max(1, len(counts) // 10)].sum()
    assert top / counts.sum() > 0.3  # the top 10% of videos get far more than 10% of impressions


def test_youtube_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_youtube_log(tmp_path, days=1)
    with pytest.raises(ValueError):
        make_youtube_log(tmp_path, n_videos=5)


# --------------------------------------------------------------------------------------------
# the configs load the generated data end to end


def _with_data_dir(cfg: Config, data_dir: Path) -> Config:
    cfg.data.data_dir = str(data_dir)
    return cfg


def test_youtube_config_loads_end_to_end(youtube: dict[str, Path], yt_log: pd.DataFrame) -> None:
    cfg = _with_data_dir(load_config(YOUTUBE_CONFIG), youtube["log"].parent)
    assert cfg.data.source == "tables"
    assert cfg.data.train_range == (0, SMALL_YT["days"] - 2)
    assert cfg.data.test_range == (SMALL_YT["days"] - 1,) * 2
    assert "position" not in {f.name for f in cfg.data.features}
    ds = load_dataset(cfg)
    assert len(ds.train) > 0 and len(ds.valid) > 0 and len(ds.test) > 0
    assert len(ds.train) + len(ds.valid) + len(ds.test) == len(yt_log)
    assert len(ds.test) == int((yt_log["day"] == SMALL_YT["days"] - 1).sum())
    assert ds.train.cats.shape[1] == ds.schema.n_cats == 9
    assert ds.train.nums.shape[1] == ds.schema.n_nums == 3
    assert all(f.cardinality > 1 for f in ds.schema.cats())  # every vocabulary was fitted
    assert np.isfinite(ds.train.nums).all()
    eng, sat = ds.train.labels[:, 0], ds.train.labels[:, 1]
    assert not np.isnan(eng).any() and set(np.unique(eng)) == {0.0, 1.0}
    assert 0 < np.isnan(sat).sum() < len(sat)  # satisfaction masked on non-clicks


def test_mmoe_config_loads_end_to_end(tmp_path: Path) -> None:
    make_mmoe_benchmark(tmp_path, 0.5, n_rows=2000, seed=0)
    cfg = _with_data_dir(load_config(MMOE_CONFIG), tmp_path)
    assert cfg.data.users is None and cfg.data.videos is None  # "" in TOML means "no table"
    assert [t.kind for t in cfg.tasks] == ["regression", "regression"]
    ds = load_dataset(cfg)
    assert ds.schema.n_cats == 0 and ds.schema.n_nums == 100
    assert len(ds.train) + len(ds.valid) == 1600 and len(ds.test) == 400
    assert not np.isnan(ds.test.labels).any()


# --------------------------------------------------------------------------------------------
# the CLI: mtrank data synth KIND


def test_cli_synth_mmoe_writes_the_benchmark(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "cli"
    args = [
        "data",
        "synth",
        "mmoe",
        "--out",
        str(out),
        "--rows",
        "500",
        "--seed",
        "7",
        "--correlation",
        "0.3",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    want = make_mmoe_benchmark(tmp_path / "direct", 0.3, n_rows=500, seed=7)
    got = {k: out / p.name for k, p in want.items()}
    assert all(p.is_file() for p in got.values())
    assert _bytes(got) == _bytes(want)  # the command passes its options through, nothing else
    assert len(pd.read_parquet(got["log"])) == 500
    cfg = _with_data_dir(load_config(MMOE_CONFIG), out)
    ds = load_dataset(cfg)
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 500


def test_cli_synth_youtube_writes_a_loadable_log(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(
        app, ["data", "synth", "youtube", "--out", str(out), "--rows", "3000", "--seed", "3"]
    )
    assert r.exit_code == 0, r.output
    want = make_youtube_log(tmp_path / "direct", n_impressions=3000, seed=3)
    got = {k: out / p.name for k, p in want.items()}
    assert set(got) >= {"log", "users", "videos"} and all(p.is_file() for p in got.values())
    assert _bytes(got) == _bytes(want)
    log = pd.read_parquet(got["log"])
    assert len(log) == 3000
    ds = load_dataset(_with_data_dir(load_config(YOUTUBE_CONFIG), out))
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 3000


def test_cli_synth_rejects_an_unknown_kind(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    r = CliRunner().invoke(app, ["data", "synth", "movielens", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown synthetic data kind 'movielens'" in r.output
    assert not (tmp_path / "x").exists()
