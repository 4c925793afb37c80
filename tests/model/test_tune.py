import json

import numpy as np
import optuna
import pytest
from modelkit import tiny_config, tiny_toml
from typer.testing import CliRunner

from model.config import MMoEConfig
from model.data import load_dataset
from model.tune import DEFAULT_SPACE, SPACE, folds, suggest, tune
from service.cli import app


def test_folds_partition_rows_by_user():
    ds = load_dataset(tiny_config())
    cv = folds(ds, 3, "user")
    assert len(cv) == 3
    total = len(ds.train) + len(ds.valid)
    for f in cv:
        assert len(f.train) + len(f.valid) == total and len(f.test) == 0
        assert not set(f.train.users) & set(f.valid.users)  # no user on both sides
        # a held-out value its fold never trained on reads "unknown" (0), as at test time and serving
        for j in range(f.valid.cats.shape[1]):
            assert set(np.unique(f.valid.cats[:, j])) <= set(np.unique(f.train.cats[:, j])) | {0}
        user_col = [c.name for c in ds.schema.cats()].index("user_id")
        assert (f.valid.cats[:, user_col] == 0).all()  # every held-out user is a new user
    assert sum(len(f.valid) for f in cv) == total


def test_time_folds_validate_on_later_rows():
    """Forward chaining: every fold validates on a later time block than all of its training rows,
    the training window grows, and the validation blocks tile the last k/(k+1) of the rows."""
    ds = load_dataset(tiny_config())
    assert ds.train.times is not None and ds.valid.times is not None
    k, total = 3, len(ds.train) + len(ds.valid)
    cv = folds(ds, k)  # "time" is the default
    sizes = [len(f.train) for f in cv]
    assert sizes == sorted(sizes) and len(set(sizes)) == k
    for f in cv:
        assert f.train.times.max() <= f.valid.times.min()
        assert len(f.test) == 0
    assert sum(len(f.valid) for f in cv) == total - sizes[0]
    valid_times = np.concatenate([f.valid.times for f in cv])
    assert np.all(np.diff(valid_times) >= 0)  # the blocks follow each other in time
    with pytest.raises(ValueError, match="cv must be"):
        folds(ds, 3, "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        folds(ds, 1)


def test_tune_can_search_a_subset_keeping_the_rest():
    cfg = tiny_config(epochs=1)
    ds = load_dataset(cfg)
    res = tune(cfg, ds, n_trials=2, k=2, cv="user", params=["embed_weight_decay"])
    assert all(set(t) == {"trial", "value", "embed_weight_decay"} for t in res.trials)
    assert set(res.best_params) == {"embed_weight_decay"} and (res.cv, res.folds) == ("user", 2)
    with pytest.raises(ValueError, match="subset"):
        tune(cfg, ds, n_trials=1, k=2, params=["batch_size"])


def test_batch_l2_is_searched_only_when_named():
    cfg = tiny_config(epochs=1)
    assert "embed_batch_l2" in SPACE and "embed_batch_l2" not in DEFAULT_SPACE
    named = suggest(optuna.trial.FixedTrial({"embed_batch_l2": 0.02}), cfg, ["embed_batch_l2"])
    assert named.train.embed_batch_l2 == 0.02 and named.train.lr == cfg.train.lr
    everything = {"lr": 1e-3, "weight_decay": 1e-6, "embed_weight_decay": 1e-4, "embed_dim": 8}
    fixed = {**everything, "dropout": 0.1, "n_experts": 2, "gate_dropout": 0.0}
    default = suggest(optuna.trial.FixedTrial(fixed), cfg)
    assert default.train.embed_batch_l2 == cfg.train.embed_batch_l2 == 0.0
    assert default.model.net == MMoEConfig(n_experts=2, expert_dims=[16], gate_dropout=0.0)  # [model.mmoe]
    res = tune(cfg, load_dataset(cfg), n_trials=2, k=2, params=["embed_batch_l2"])
    assert all(1e-3 <= t["embed_batch_l2"] <= 0.3 and np.isfinite(t["value"]) for t in res.trials)


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
    assert (body["cv"], body["folds"]) == ("time", 2)


def test_tune_cli_subset_and_user_folds(tmp_path):
    out = tmp_path / "tune.json"
    args = ["tune", "--config", tiny_toml(tmp_path), "--trials", "1", "--folds", "2", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--cv", "user", "--param", "lr", "--param", "dropout"])
    assert r.exit_code == 0, r.output
    body = json.loads(out.read_text())
    assert body["cv"] == "user" and set(body["best_params"]) == {"lr", "dropout"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cv", "random"], "--cv must be"),
        (["--param", "batch_size"], "not searchable"),
        (["--folds", "1"], ">= 2"),
    ],
)
def test_tune_cli_refuses_bad_options(tmp_path, extra, message):
    r = CliRunner().invoke(app, ["tune", "--config", tiny_toml(tmp_path), "--trials", "1", *extra])
    assert r.exit_code != 0 and message in r.output
