"""`mtrank init`: what it infers from the files' schema (keys, labels, feature kinds, the split), and
that what it writes loads and trains as it is."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from modelkit import DATA_DIR, FIXTURE_LOG
from typer.testing import CliRunner

from model.config import load_config
from model.data import load_dataset
from model.scaffold import ScaffoldError, scaffold
from model.train import train
from service.cli import app as cli


def features(text: str) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in tomllib.loads(text)["data"]["features"]}


@pytest.mark.slow
def test_a_recommendation_log_with_tables(tmp_path: Path) -> None:
    """The KuaiRand fixture with its users and videos tables: keys found, 0/1 outcomes as heads,
    features from the tables, only categorical log columns as context, a day split."""
    s = scaffold(
        DATA_DIR / FIXTURE_LOG,
        DATA_DIR / "user_features_pure.csv",
        DATA_DIR / "video_features_basic_pure.csv",
    )
    assert (s.user_key, s.video_key) == ("user_id", "video_id")
    feats = features(s.text)
    assert feats["user_id"]["group"] == "user" and feats["user_id"]["kind"] == "categorical"
    assert feats["video_id"]["group"] == "video" and feats["video_id"]["min_count"] >= 3
    assert feats["fans_user_num"]["kind"] == "numeric" and feats["fans_user_num"]["log1p"] is True
    assert feats["user_active_degree"]["kind"] == "categorical"  # text
    # integer ids spread over a wide range are ids, not quantities
    assert feats["author_id"]["kind"] == "categorical" and feats["music_id"]["kind"] == "categorical"
    assert {n for n, f in feats.items() if f["group"] == "context"} == {"tab", "hourmin"}
    # the log's numeric columns (watch time, ...) are written but commented out: they may be outcomes
    assert '# name = "play_time_ms"' in s.text and "play_time_ms" not in feats
    assert {"is_click", "long_view", "is_like"} <= set(s.tasks)
    assert not set(s.tasks) & set(feats)  # a label is never a feature
    assert "upload_dt: a date" in s.text and "is_lowactive_period: a single value" in s.text
    d = s.config.data
    assert (d.split, d.split_column, d.time_column) == ("time", "date", "time_ms")
    assert (d.train_days, d.test_days) == (11, 3)  # 14 days in the log: test on the last ~fifth
    # it loads from the file and trains as written (one short epoch here)
    path = tmp_path / "kuairand.toml"
    path.write_text(s.text)
    cfg = load_config(path)
    cfg.train.epochs, cfg.train.batch_size = 1, 512
    res = train(cfg, tmp_path / "artifacts")
    assert res.checkpoint is not None and "test/long_view/auc" in res.metrics
    assert "test/long_view/gauc" in res.metrics  # grouped by the user key


def day_log(tmp_path: Path, days: list[Any], n: int = 2000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    df = pd.DataFrame(
        {
            "day": np.sort(rng.choice(np.array(days, dtype=object), n)),
            "x": x,
            "shop": rng.choice(["a", "b", "c"], n),
            "y": (x + rng.normal(size=n) > 0).astype(int),
        }
    )
    path = tmp_path / "log.parquet"
    df.to_parquet(path)
    return path


def test_a_day_column_without_a_time_column_validates_on_the_last_train_day(tmp_path: Path) -> None:
    path = day_log(tmp_path, [20240101, 20240102, 20240103, 20240104, 20240105])
    s = scaffold(path)
    d = s.config.data
    assert (d.split, d.split_column, d.time_column, d.train_days, d.test_days) == ("time", "day", "day", 4, 1)
    ds = load_dataset(s.config)
    days = pd.read_parquet(path)["day"]
    assert len(ds.valid) == (days == 20240104).sum() and len(ds.test) == (days == 20240105).sum()


def test_text_days_split_by_day_without_a_validation_tail(tmp_path: Path) -> None:
    path = day_log(tmp_path, ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"])
    s = scaffold(path)
    d = s.config.data
    assert (d.split, d.split_column, d.valid_fraction) == ("time", "day", 0.0)
    assert "text days cannot order a validation tail" in s.text
    ds = load_dataset(s.config)
    assert len(ds.test) == (pd.read_parquet(path)["day"] == "2024-01-04").sum() and len(ds.valid) == 0


def test_too_few_days_make_a_random_split(tmp_path: Path) -> None:
    s = scaffold(day_log(tmp_path, [20240101, 20240102]))
    assert s.split == "random" and "'day' has 2 distinct day(s)" in s.text


def table(n: int = 500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "flag": rng.integers(0, 2, n),  # 0/1
            "spend": rng.pareto(1.5, n) * 100,  # skewed, non-negative
            "temp": rng.normal(size=n),
            "grade": rng.choice(["a", "b", "c", "d"], n),
            "outcome": rng.choice(["won", "lost"], n, p=[0.3, 0.7]),
            "y": rng.integers(0, 2, n),
        }
    )


@pytest.mark.parametrize(
    ("labels", "want"),
    [
        ([], {"flag": ("binary", "flag"), "y": ("binary", "y")}),  # every 0/1 column
        (["outcome"], {"outcome": ("binary", {"column": "outcome", "equals": "won"})}),  # the rarer
        (["grade=b"], {"grade": ("binary", {"column": "grade", "equals": "b"})}),
        (["spend"], {"spend": ("regression", "spend")}),
        (["temp=1"], {"temp": ("binary", {"column": "temp", "equals": 1})}),
    ],
)
def test_labels(tmp_path: Path, labels: list[str], want: dict[str, Any]) -> None:
    path = tmp_path / "t.csv"
    table().to_csv(path, index=False)
    s = scaffold(path, labels=labels)
    got = {t.name: (t.kind, t.label) for t in s.config.tasks}
    assert got == want
    feats = features(s.text)
    assert not set(got) & set(feats)
    if labels:  # a named label: the table's other 0/1 columns are features
        assert feats["flag"]["kind"] == "categorical"
    if labels == ["spend"]:
        assert s.config.tasks[0].transform == "log1p"  # a skewed non-negative target
    else:
        assert feats["spend"]["log1p"] is True and not feats.get("temp", {}).get("log1p")
    # the few-valued text columns that are not labels are suggested as commented text labels
    assert "# label = { column = " in s.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ["nope"]}, "--label 'nope': no such column"),
        ({"labels": ["grade"]}, "is text with 4 values .*--label grade=VALUE"),
        ({"labels": ["spend=high"]}, "holds numbers, not text"),
        ({"labels": ["y", "y"]}, "names a column twice"),
        ({"labels": ["=3"]}, "want COLUMN or COLUMN=VALUE"),
    ],
)
def test_bad_labels_are_clear_errors(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    path = tmp_path / "t.csv"
    table().to_csv(path, index=False)
    with pytest.raises(ScaffoldError, match=message):
        scaffold(path, **kwargs)


def test_a_table_without_any_0_1_column_asks_for_labels(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    table().drop(columns=["flag", "y"]).to_csv(path, index=False)
    with pytest.raises(ScaffoldError, match="no 0/1 column .*--label.*two-valued text columns: outcome"):
        scaffold(path)


def test_keys_are_columns_unique_in_their_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    log = pd.DataFrame(
        {
            "uid": rng.integers(0, 50, 800),
            "item": rng.choice(["i1", "i2", "i3"], 800),
            "y": rng.integers(0, 2, 800),
        }
    )
    users = pd.DataFrame({"uid": range(50), "item": "i1", "age": rng.integers(18, 80, 50)})
    items = pd.DataFrame({"item": ["i1", "i2", "i3"], "price": [1.0, 2.5, 4.0]})
    for name, df in (("log", log), ("users", users), ("items", items)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    s = scaffold(tmp_path / "log.csv", tmp_path / "users.csv", tmp_path / "items.csv")
    assert (s.user_key, s.video_key) == ("uid", "item")  # users.item repeats: not the user key
    assert s.features["user"] == ["uid", "age"] and s.features["video"] == ["item", "price"]
    assert s.config.data.users == "users.csv" and s.config.data.data_dir == str(tmp_path.resolve())
    assert load_dataset(s.config).fingerprint["users"]["path"].endswith("users.csv")

    pd.DataFrame({"id": range(5), "age": 30}).to_csv(tmp_path / "strangers.csv", index=False)
    with pytest.raises(ScaffoldError, match="cannot tell the user key .* shares no column with the log"):
        scaffold(tmp_path / "log.csv", tmp_path / "strangers.csv")


def test_init_command_writes_the_file_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    table().to_csv(path, index=False)
    out = tmp_path / "cfg.toml"
    r = CliRunner().invoke(cli, ["init", "--log", str(path), "--out", str(out), "--name", "shop"])
    assert r.exit_code == 0, r.output
    assert "heads flag, y" in r.output and "random split" in r.output and "mtrank train --config" in r.output
    assert load_config(out).name == "shop"
    again = CliRunner().invoke(cli, ["init", "--log", str(path), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output and "--force" in again.output
    forced = CliRunner().invoke(
        cli, ["init", "--log", str(path), "--out", str(out), "--force", "--label", "y"]
    )
    assert forced.exit_code == 0 and [t.name for t in load_config(out).tasks] == ["y"]


def test_parquet_dates_and_a_unix_time_column(tmp_path: Path) -> None:
    days = [dt.date(2024, 1, d) for d in range(1, 6)]
    path = day_log(tmp_path, days)
    df = pd.read_parquet(path)
    df["ts"] = np.sort(np.random.default_rng(1).integers(1_704_067_200, 1_704_499_200, len(df)))  # seconds
    df.to_parquet(path)
    s = scaffold(path)
    d = s.config.data
    assert (d.split, d.split_column, d.time_column, d.valid_fraction) == ("time", "day", "ts", 0.1)
    assert "ts" not in s.features["context"]  # a time is not a feature
    ds = load_dataset(s.config)
    assert len(ds.test) == (df["day"] == days[-1]).sum() and len(ds.valid) > 0
