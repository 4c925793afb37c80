"""The promotion gate: a new version becomes LATEST only if its heads, feature schema and test metrics
(on the same test split) pass against the current LATEST; otherwise it is written, not promoted, and
its manifest says why. ``--force`` overrides."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from modelkit import tiny_config, tiny_toml
from typer.testing import CliRunner

from model import list_versions, read_latest
from model.checkpoint import read_manifest, resolve_checkpoint
from model.config import Config
from model.data import Dataset, load_dataset
from model.features import FeatureSchema, FeatureSpec
from model.promotion import decide, split_identity
from model.train import TrainResult, fit, save_result
from service.cli import app as cli


@pytest.fixture(scope="module")
def fitted() -> tuple[Config, Dataset, TrainResult]:
    cfg = tiny_config(epochs=1)
    ds = load_dataset(cfg)
    return cfg, ds, fit(cfg, ds)


def variant(result: TrainResult, **metrics: float) -> TrainResult:
    """The same trained network reporting other test metrics (a worse or better retrain)."""
    return dataclasses.replace(result, metrics={**result.metrics, **metrics}, checkpoint=None)


def promotion_of(art: Path, version: str) -> dict[str, Any]:
    entry: dict[str, Any] = read_manifest(resolve_checkpoint(art, version))["promotion"]
    return entry


def test_first_version_is_promoted_and_a_worse_one_is_not(
    fitted: tuple[Config, Dataset, TrainResult], tmp_path: Path
) -> None:
    cfg, ds, result = fitted
    first = save_result(tmp_path, result, cfg, ds).name
    assert read_latest(tmp_path) == first
    assert promotion_of(tmp_path, first)["promoted"] is True
    assert "no LATEST yet" in promotion_of(tmp_path, first)["reason"]

    loss = result.metrics["test/loss"]
    worse = save_result(tmp_path, variant(result, **{"test/loss": loss * 1.05}), cfg, ds).name
    assert read_latest(tmp_path) == first  # written, not promoted
    assert worse in list_versions(tmp_path)
    entry = promotion_of(tmp_path, worse)
    assert entry["promoted"] is False and entry["against"] == first and "test/loss" in entry["reason"]
    assert {c["name"]: c["ok"] for c in entry["checks"]} == {
        "heads": True,
        "schema": True,
        "split": True,
        "metrics": False,
    }

    within = save_result(tmp_path, variant(result, **{"test/loss": loss * 1.001}), cfg, ds).name
    assert read_latest(tmp_path) == within  # 0.1% worse: inside the default 0.5% tolerance

    forced = save_result(tmp_path, variant(result, **{"test/loss": loss * 2}), cfg, ds, force=True).name
    assert read_latest(tmp_path) == forced
    entry = promotion_of(tmp_path, forced)
    assert entry["promoted"] is True and entry["forced"] is True and "test/loss" in entry["reason"]


def test_an_auc_drop_beyond_the_configured_tolerance_is_refused(
    fitted: tuple[Config, Dataset, TrainResult], tmp_path: Path
) -> None:
    cfg, ds, result = fitted
    save_result(tmp_path, result, cfg, ds)
    auc = result.metrics["test/engagement/auc"]
    strict = copy.deepcopy(cfg)
    strict.promotion.max_regression = 0.0
    d = decide(
        tmp_path, strict, ds.schema, {**result.metrics, "test/engagement/auc": auc - 1e-4}, ds.fingerprint
    )
    assert not d.promoted and "test/engagement/auc" in d.reason
    loose = copy.deepcopy(cfg)
    loose.promotion.max_regression = 0.01
    d = decide(
        tmp_path, loose, ds.schema, {**result.metrics, "test/engagement/auc": auc - 1e-4}, ds.fingerprint
    )
    assert d.promoted, d.reason
    better = {
        **result.metrics,
        "test/engagement/auc": auc + 0.01,
        "test/loss": result.metrics["test/loss"] * 0.9,
    }
    assert decide(tmp_path, strict, ds.schema, better, ds.fingerprint).promoted


def test_other_heads_or_an_incompatible_schema_are_refused(
    fitted: tuple[Config, Dataset, TrainResult], tmp_path: Path
) -> None:
    cfg, ds, result = fitted
    save_result(tmp_path, result, cfg, ds)
    renamed = copy.deepcopy(cfg)
    renamed.tasks[1].name = "like"
    d = decide(tmp_path, renamed, ds.schema, result.metrics, ds.fingerprint)
    assert not d.promoted and "heads differ" in d.reason and "like (binary)" in d.reason

    s = ds.schema
    wider = FeatureSchema([*s.features, FeatureSpec("new_col", "video", "numeric")], s.user_key, s.video_key)
    d = decide(tmp_path, cfg, wider, result.metrics, ds.fingerprint)
    assert not d.promoted and "video.new_col" in d.reason and "materialise" in d.reason

    no_tab = FeatureSchema([f for f in s.features if f.name != "tab"], s.user_key, s.video_key)
    d = decide(tmp_path, cfg, no_tab, result.metrics, ds.fingerprint)
    assert not d.promoted and "'tab'" in d.reason

    d = decide(tmp_path, renamed, ds.schema, result.metrics, ds.fingerprint, force=True)
    assert d.promoted and d.forced


def test_another_test_split_is_not_comparable(
    fitted: tuple[Config, Dataset, TrainResult], tmp_path: Path
) -> None:
    cfg, ds, result = fitted
    save_result(tmp_path, result, cfg, ds)
    other_log = {**ds.fingerprint, "log": {**ds.fingerprint["log"], "sha256": "0" * 64}}
    assert split_identity(cfg.to_dict(), other_log) != split_identity(cfg.to_dict(), ds.fingerprint)
    d = decide(tmp_path, cfg, ds.schema, result.metrics, other_log)
    assert not d.promoted and "not possible" in d.reason
    assert {c.name: c.ok for c in d.checks}["metrics"] is None
    moving = copy.deepcopy(cfg)
    moving.promotion.different_split = "promote"
    d = decide(tmp_path, moving, ds.schema, {**result.metrics, "test/loss": 99.0}, other_log)
    assert d.promoted, d.reason  # decided on heads and schema alone
    off = copy.deepcopy(cfg)
    off.promotion.enabled = False
    assert decide(tmp_path, off, ds.schema, result.metrics, other_log).promoted


@pytest.mark.slow
def test_cli_train_reports_a_refusal_and_models_shows_data_set_and_objective(tmp_path: Path) -> None:
    runner = CliRunner()
    cfg, art = tiny_toml(tmp_path), str(tmp_path / "art")
    first = runner.invoke(cli, ["train", "--config", cfg, "--artifacts", art])
    assert first.exit_code == 0, first.output
    assert re.search(r"data: train=\d+ valid=\d+ test=\d+ rows \(\d+ duplicates dropped\)", first.output)
    assert re.search(r"epoch 1/1 \([\d.]+s training\): \{'train/loss': [\d.]+", first.output), first.output
    assert "'valid/loss': " in first.output
    # the same config on the log's first 20000 rows: another test split, so LATEST is kept
    other = tmp_path / "other.toml"
    other.write_text(Path(cfg).read_text().replace("[data]\n", "[data]\nmax_rows = 20000\n", 1))
    second = runner.invoke(cli, ["train", "--config", str(other), "--artifacts", art])
    assert second.exit_code == 0, second.output
    v1, v2 = list_versions(art)
    assert read_latest(art) == v1
    assert "did not promote" in second.output and "test split" in second.output

    rows = json.loads(runner.invoke(cli, ["models", "--artifacts", art, "--json"]).stdout)
    assert [(r["version"], r["latest"], r["promoted"]) for r in rows] == [
        (v1, True, True),
        (v2, False, False),
    ]
    for r in rows:
        assert r["data_set"].startswith("kuairand_pure_20220425_0508_300users") and "@" in r["data_set"]
        assert r["objective"] == "static" and r["monitor"] == "valid/loss"
        assert set(r["test_metrics"]) == {"engagement/auc", "satisfaction/auc"}
    piped = runner.invoke(cli, ["models", "--artifacts", art])  # not a terminal: tab-separated on stdout
    lines = piped.stdout.splitlines()
    assert lines[0].split("\t")[:5] == ["version", "arch", "heads", "data set", "objective"]
    assert lines[1].split("\t")[0] == v1 and lines[1].split("\t")[-1] == "LATEST"
    assert lines[2].split("\t")[-1] == "not promoted"
