"""Any multi-task table, end to end (issue 17's done-when): a table that is not a recommendation log --
no user or item ids, text labels, a random split -- goes from `mtrank init` to a trained and evaluated
model with no hand-written config, and `mtrank predict` scores its rows exactly as `/rank` does.

The table is generated here (census-like: ages, hours, a skewed capital gain, text columns, two text
labels that depend on them), so the test needs no download.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from modelkit import service_settings
from typer.testing import CliRunner

from model.config import load_config
from service.app import create_app
from service.cli import app as cli

N_ROWS = 3000


def census(n: int = N_ROWS, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, n)
    education = rng.choice(["school", "college", "degree", "phd"], n, p=[0.4, 0.3, 0.2, 0.1])
    workclass = rng.choice(["private", "self-employed", "public", "none"], n)
    hours = rng.integers(10, 70, n)
    gain = np.where(rng.random(n) < 0.1, rng.pareto(1.2, n) * 1000, 0.0).round()
    z = 0.04 * (age - 45) + np.select([education == "degree", education == "phd"], [1.0, 2.0], 0.0)
    z += 0.04 * (hours - 40) + 1.5 * (gain > 0) - 0.8 * (workclass == "none")
    income = np.where(z + rng.normal(size=n) > 0.5, ">50K", "<=50K")
    married = np.where(
        0.08 * (age - 35) + 0.6 * (workclass == "public") + rng.normal(size=n) > 0, "Married", "Never married"
    )
    return pd.DataFrame(
        {
            "record": np.arange(100_000, 100_000 + n),  # an identifier: not a feature
            "age": age,
            "education": education,
            "workclass": workclass,
            "hours": hours,
            "capital_gain": gain,
            "country": "US",  # one value: not a feature
            "income": income,
            "marital": married,
        }
    )


def run(*args: Any) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("census")
    census().to_csv(d / "census.csv", index=False)
    paths = {"csv": d / "census.csv", "config": d / "census.toml", "artifacts": d / "artifacts"}
    run(
        "init",
        "--log",
        paths["csv"],
        "--label",
        "income",
        "--label",
        "marital=Never married",
        "--out",
        paths["config"],
    )
    # the config as written; only the epoch budget is lowered for the test
    run("train", "--config", paths["config"], "--artifacts", paths["artifacts"], "--set", "train.epochs=4")
    return paths


@pytest.mark.slow
def test_init_writes_a_config_for_a_table_without_ids(trained: dict[str, Path]) -> None:
    text = trained["config"].read_text()
    raw = tomllib.loads(text)
    data = raw["data"]
    assert (data["user_key"], data["video_key"], data["users"], data["videos"]) == ("", "", "", "")
    assert data["split"] == "random" and "no day-like column" in text
    feats = {f["name"]: f for f in data["features"]}
    assert set(feats) == {"age", "education", "workclass", "hours", "capital_gain"}  # no label, id, constant
    assert all(f["group"] == "context" for f in feats.values())
    assert feats["education"]["kind"] == "categorical" and feats["age"]["kind"] == "numeric"
    assert feats["capital_gain"]["log1p"] is True and not feats["hours"].get("log1p")
    tasks = {t["name"]: t["label"] for t in raw["tasks"]}
    # a two-valued text label: the rarer value is the positive class, said so in a comment
    rarer = census()["income"].value_counts().index[-1]
    assert tasks == {
        "income": {"column": "income", "equals": rarer},
        "marital": {"column": "marital", "equals": "Never married"},
    }
    assert "record: unique in every row: an identifier" in text and "country: a single value" in text
    cfg = load_config(trained["config"])
    assert cfg.monitor == "valid/loss" and cfg.data.groups == []


def test_the_init_config_trains_and_evaluates_both_text_labels(trained: dict[str, Path]) -> None:
    out = run("evaluate", "--artifacts", trained["artifacts"], "--json")
    metrics = json.loads(out.stdout)["metrics"]
    assert metrics["test/income/auc"] > 0.75 and metrics["test/marital/auc"] > 0.75
    assert not any("gauc" in k or "ndcg" in k for k in metrics)  # no list groups here
    models = json.loads(run("models", "--artifacts", trained["artifacts"], "--json").stdout)
    assert models[0]["heads"] == ["income", "marital"] and models[0]["latest"]
    manifest = json.loads(
        (trained["artifacts"] / "models" / models[0]["version"] / "manifest.json").read_text()
    )
    fp = manifest["data_fingerprint"]
    assert fp["split"] == "random" and fp["duplicates_dropped"] == 0
    assert fp["train_rows"] + fp["valid_rows"] + fp["test_rows"] == N_ROWS
    assert 0.15 < fp["test_rows"] / N_ROWS < 0.25 and 0.05 < fp["valid_rows"] / N_ROWS < 0.15


def _value(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


@pytest.mark.slow
def test_predict_reproduces_the_per_head_scores_of_rank(trained: dict[str, Path], tmp_path: Path) -> None:
    scores = tmp_path / "scores.parquet"
    run("predict", "--input", trained["csv"], "--output", scores, "--artifacts", trained["artifacts"])
    out = pd.read_parquet(scores)
    rows = pd.read_csv(trained["csv"])
    assert list(out.columns) == [*rows.columns, "score", "score_income", "score_marital"]
    pd.testing.assert_frame_equal(out[rows.columns], rows, check_dtype=False)  # the input, row for row
    # streamed in small batches, written as CSV: the same scores
    csv = tmp_path / "scores.csv.gz"
    run(
        "predict",
        "-i",
        trained["csv"],
        "-o",
        csv,
        "-a",
        trained["artifacts"],
        "--batch-rows",
        700,
        "--keep",
        "record",
    )
    small = pd.read_csv(csv)
    assert list(small.columns) == ["record", "score", "score_income", "score_marital"]
    # float32 forward passes over other batch sizes: equal up to rounding
    np.testing.assert_allclose(
        small[["score_income", "score_marital"]], out[["score_income", "score_marital"]], atol=1e-6
    )

    features = ["age", "education", "workclass", "hours", "capital_gain"]
    picks = np.linspace(0, len(rows) - 1, 12).round().astype(int)
    with TestClient(create_app(service_settings(trained["artifacts"]))) as client:
        for i in picks:
            body = {
                "user_id": "anyone",
                "candidates": [f"row-{i}"],
                "context": {c: _value(rows.at[i, c]) for c in features},
            }
            r = client.post("/rank", json=body)
            assert r.status_code == 200, r.text
            (item,) = r.json()["items"]
            for head in ("income", "marital"):
                want, got = item["heads"][head], out.at[i, f"score_{head}"]
                assert abs(got - want) < 1e-5 and abs(got - want) < 1e-4 * want, (i, head, got, want)
            assert abs(out.at[i, "score"] - item["score"]) < 1e-5, i
    # the picked rows are not all alike: parity on near-constant scores would prove little
    assert np.ptp(out["score_income"].to_numpy()[picks]) > 0.1


@pytest.mark.slow
def test_predict_reads_a_glob_of_files_in_path_order(trained: dict[str, Path], tmp_path: Path) -> None:
    rows = pd.read_csv(trained["csv"])
    parts = tmp_path / "parts"
    parts.mkdir()
    for k, chunk in enumerate(np.array_split(np.arange(len(rows)), 3)):
        rows.iloc[chunk].to_parquet(parts / f"part-{k}.parquet", index=False)
    run("predict", "-i", trained["csv"], "-o", tmp_path / "whole.parquet", "-a", trained["artifacts"])
    run(
        "predict",
        "-i",
        parts / "part-*.parquet",
        "-o",
        tmp_path / "parts.parquet",
        "-a",
        trained["artifacts"],
    )
    whole, split = pd.read_parquet(tmp_path / "whole.parquet"), pd.read_parquet(tmp_path / "parts.parquet")
    assert (split["record"] == whole["record"]).all()
    np.testing.assert_allclose(split["score"], whole["score"], atol=1e-6)


def test_a_failed_predict_leaves_no_partial_output(trained: dict[str, Path], tmp_path: Path) -> None:
    rows = pd.read_csv(trained["csv"]).astype({"capital_gain": str})  # numbers as text: still numbers
    rows.loc[2500, "capital_gain"] = "lots"  # in the third batch of 1000 rows
    rows.to_parquet(tmp_path / "rows.parquet")
    out = tmp_path / "out" / "scores.parquet"
    out.parent.mkdir()
    args = [
        "predict",
        "-i",
        tmp_path / "rows.parquet",
        "-o",
        out,
        "-a",
        trained["artifacts"],
        "--batch-rows",
        1000,
    ]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2
    assert "numeric feature 'capital_gain' holds 'lots' in row 2501" in " ".join(result.output.split())
    assert list(out.parent.iterdir()) == []  # neither the output nor its temporary file
