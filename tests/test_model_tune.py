import json

import numpy as np
from modelkit import tiny_config, tiny_toml
from typer.testing import CliRunner

from model.data import load_dataset
from model.tune import folds, tune
from service.cli import app


def test_folds_partition_rows_by_user():
    ds = load_dataset(tiny_config())
    cv = folds(ds, 3)
    assert len(cv) == 3
    total = len(ds.train) + len(ds.valid)
    for f in cv:
        assert len(f.train) + len(f.valid) == total and len(f.test) == 0
        assert not set(f.train.users) & set(f.valid.users)  # no user on both sides
    assert sum(len(f.valid) for f in cv) == total


def test_tune_searches_and_reports_the_best_trial():
    cfg = tiny_config(epochs=1)
    res = tune(cfg, load_dataset(cfg), n_trials=3, k=2)
    assert len(res.trials) == 3
    values = [t["value"] for t in res.trials]
    assert res.best_value == min(values)  # monitor valid/loss: lower is better
    assert {"lr", "embed_dim", "dropout", "n_experts"} <= set(res.best_params)
    assert len({t["lr"] for t in res.trials}) == 3 and all(np.isfinite(values))


def test_tune_cli_writes_results(tmp_path):
    out = tmp_path / "tune.json"
    r = CliRunner().invoke(
        app, ["tune", "--config", tiny_toml(tmp_path), "--trials", "2", "--folds", "2", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    body = json.loads(out.read_text())
    assert body["monitor"] == "valid/loss" and len(body["trials"]) == 2
