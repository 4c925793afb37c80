"""Fine-tuning from a checkpoint (--init-from, freeze, reset_heads) and old checkpoints still loading."""

import json
from pathlib import Path

import numpy as np
import pytest
import reference_data
import torch
from modelkit import ROOT, tiny_config, tiny_toml
from typer.testing import CliRunner

from model import Ranker
from model.checkpoint import list_versions, load_checkpoint, resolve_checkpoint
from model.config import (
    ARCHS,
    ConfigError,
    MMoEConfig,
    PlainWeighting,
    SeparateConfig,
    SharedBottomConfig,
)
from model.data import DataError, load_dataset
from model.train import evaluate_split, fit, load_init_checkpoint, predict, train
from service.cli import app

LEGACY = ROOT / "tests" / "fixtures" / "legacy_checkpoints"


def _cfg(arch: str = "mmoe", epochs: int = 1, **train_kw):
    cfg = tiny_config(arch, epochs=epochs)
    cfg.train.num_threads = 1
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained tiny MMoE checkpoint to fine-tune from."""
    art = tmp_path_factory.mktemp("art")
    res = train(_cfg(epochs=2), art)
    assert res.checkpoint is not None
    return art, load_checkpoint(res.checkpoint)


@pytest.mark.slow
def test_init_from_reproduces_the_source_model_before_any_step(source):
    art, ckpt = source
    cfg = _cfg(epochs=0)
    ds = load_dataset(cfg, schema=ckpt.schema)
    res = fit(cfg, ds, init_from=ckpt)
    for k, v in ckpt.model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k
    a, b = predict(res.model, ds.test, cfg.tasks), predict(ckpt.model, ds.test, cfg.tasks)
    for t in a:
        assert np.array_equal(a[t], b[t])
    assert res.metrics["test/loss"] == pytest.approx(ckpt.manifest["metrics"]["test/loss"], rel=1e-9)
    assert res.metrics["init_loaded_tensors"] == len(ckpt.model.state_dict())
    # a checkpoint is named by its folder, its version id under the artifacts dir, or LATEST
    for ref in (ckpt.version, "LATEST", str(ckpt.path)):
        assert load_init_checkpoint(ref, art).path == ckpt.path
    again = train(cfg, art, init_from=ckpt.version)  # the same through train()
    assert again.metrics["test/loss"] == pytest.approx(res.metrics["test/loss"], rel=1e-9)
    assert again.metrics["init_from"] == str(ckpt.path)


@pytest.mark.slow
def test_fine_tuning_reuses_the_checkpoint_vocabularies(source):
    _, ckpt = source
    cfg = _cfg()
    cfg.data.train_range = (20220425, 20220427)  # other train days: refitting gives other vocabularies
    fresh = load_dataset(cfg)
    reused = load_dataset(cfg, schema=ckpt.schema)
    assert fresh.schema.to_dict() != ckpt.schema.to_dict()
    assert reused.schema.to_dict() == ckpt.schema.to_dict()
    with pytest.raises(ConfigError, match="feature schema"):  # refitted data would misalign embeddings
        fit(cfg, fresh, init_from=ckpt)
    cfg.data.features = cfg.data.features[:-1]
    with pytest.raises(DataError, match="features differ"):
        load_dataset(cfg, schema=ckpt.schema)


@pytest.mark.slow
def test_freeze_keeps_frozen_parameters_unchanged(source):
    _, ckpt = source
    cfg = _cfg(epochs=2, freeze=["embed", "experts"], lr=0.01)
    res = fit(cfg, load_dataset(cfg, schema=ckpt.schema), init_from=ckpt)
    before, after = ckpt.model.state_dict(), res.model.state_dict()
    frozen = [k for k in before if k.startswith(("embed.", "experts."))]
    assert frozen and set(res.metrics["frozen_parameters"]) == {k for k in frozen if k != "embed.offsets"}
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["towers.engagement.out.weight"], after["towers.engagement.out.weight"])
    assert not torch.equal(before["gates.engagement.weight"], after["gates.engagement.weight"])
    with pytest.raises(ConfigError, match="bottom"):  # an MMoE has no bottom
        fit(_cfg(freeze=["bottom"]), load_dataset(_cfg()))


def test_reset_heads_reinitialises_only_the_output_layers(source):
    _, ckpt = source
    cfg = _cfg(epochs=0, reset_heads=True)
    res = fit(cfg, load_dataset(cfg, schema=ckpt.schema), init_from=ckpt)
    before, after = ckpt.model.state_dict(), res.model.state_dict()
    for k in before:
        if ".out." in k:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k


def test_layer_lr_decay_and_lr_scale_fine_tune(source):
    _, ckpt = source
    cfg = _cfg(epochs=2, lr_scale=0.1, layer_lr_decay=0.5)
    res = fit(cfg, load_dataset(cfg, schema=ckpt.schema), init_from=ckpt)
    assert res.history[-1]["train/loss"] < res.history[0]["train/loss"] + 0.05
    before, after = ckpt.model.state_dict(), res.model.state_dict()

    def moved(prefix: str) -> float:
        ks = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
        return float(np.mean([(after[k] - before[k]).abs().mean().item() for k in ks]))

    assert moved("towers.") > moved("embed.")  # depth 0 lr vs lr * 0.5**2


def test_init_across_architectures_loads_what_fits(source):
    _, ckpt = source
    cfg = _cfg("ple", epochs=0)
    res = fit(cfg, load_dataset(cfg, schema=ckpt.schema), init_from=ckpt)
    assert torch.equal(
        res.model.state_dict()["embed.emb.weight"], ckpt.model.state_dict()["embed.emb.weight"]
    )
    assert any(k.startswith("levels.") for k in res.metrics["init_skipped"])


@pytest.mark.slow
def test_cli_train_init_from(tmp_path):
    runner = CliRunner()
    art = tmp_path / "art"
    args = ["train", "--config", tiny_toml(tmp_path), "--artifacts", str(art)]
    assert runner.invoke(app, args).exit_code == 0
    (src,) = list_versions(art)
    r = runner.invoke(app, [*args, "--init-from", src, "--no-latest"])
    assert r.exit_code == 0, r.output
    (new,) = set(list_versions(art)) - {src}
    metrics = json.loads((art / "models" / new / "manifest.json").read_text())["metrics"]
    assert metrics["init_from"] == str(resolve_checkpoint(art, src))
    assert metrics["init_skipped"] == []
    bad = runner.invoke(app, [*args, "--init-from", "20990101-000000-abcdef"])
    assert bad.exit_code == 2 and "not found" in bad.output
    assert list_versions(art) == sorted([src, new])


# -- checkpoints written before the multi-task toolkit ------------------------------------------------


@pytest.mark.parametrize("arch", ["separate", "shared_bottom", "mmoe"])
def test_legacy_checkpoints_load_and_predict_the_same(arch):
    expected = json.loads((LEGACY / "expected.json").read_text())
    ckpt = load_checkpoint(LEGACY / "models" / f"legacy-{arch}")
    assert ckpt.config.train.weighting == PlainWeighting("static") and ckpt.config.model.bias_features == []
    # the flat keys moved to the arch's table; the other archs' (stored, unused) keys are dropped
    assert (
        ckpt.config.model.net
        == {
            "separate": SeparateConfig(bottom_dims=[8]),
            "shared_bottom": SharedBottomConfig(bottom_dims=[8]),
            "mmoe": MMoEConfig(n_experts=3, expert_dims=[8], gate_dropout=0.1),
        }[arch]
    )
    assert ckpt.model.bias_tower is None
    cats, nums = torch.tensor(expected["cats"]), torch.tensor(expected["nums"])
    with torch.no_grad():
        out = ckpt.model(cats, nums)
    for t, want in expected["outputs"][arch].items():
        torch.testing.assert_close(out[t], torch.tensor(want), rtol=0, atol=1e-6)


def test_legacy_trained_checkpoint_scores_and_fine_tunes(tmp_path):
    path = next(p for p in (LEGACY / "models").iterdir() if p.name[0].isdigit())
    ranker = Ranker.load(path)
    s = ranker.schema
    heads = ranker.score(s.default_rows("user", 1), s.default_rows("video", 4), s.default_rows("context", 1))
    assert all(v.shape == (4,) for v in heads.values())
    # its stored test AUC is reproduced by the current code on the same rows
    cfg = ranker.config
    cfg.data.data_dir = str(ROOT.parent / "shared" / "data" / "kuairand-pure")
    raw = reference_data.load_raw(cfg.data)  # the in-memory loader these checkpoints were trained with
    test_m = reference_data.split_masks(raw.log, cfg.data)[2]
    ds = load_dataset(cfg, schema=ranker.schema)
    cats, nums = reference_data.encode_groups(
        ranker.schema, reference_data.canonical_groups(ranker.schema, raw.log.loc[test_m])
    )
    assert np.array_equal(cats, ds.test.cats)
    metrics = evaluate_split(ranker.model, ds.test, cfg.tasks, "test/")
    stored = ranker.manifest["metrics"]
    assert metrics["test/engagement/auc"] == pytest.approx(stored["test/engagement/auc"], rel=1e-9)
    # and it is a valid starting point for fine-tuning with the new options
    cfg.train.epochs, cfg.train.num_threads, cfg.train.weighting = 1, 1, PlainWeighting("uncertainty")
    cfg = cfg.validated()
    res = fit(cfg, ds, init_from=load_checkpoint(path))
    assert res.metrics["init_loaded_tensors"] == len(ranker.model.state_dict())


def test_legacy_fixture_is_untouched():
    """The fixtures are data: nobody should regenerate them with the new code."""
    for p in (LEGACY / "models").iterdir():
        manifest = json.loads((p / "manifest.json").read_text())
        assert "weighting" not in manifest["config"]["train"], p.name
        assert "ple_levels" not in manifest["config"]["model"], p.name
        assert "n_experts" in manifest["config"]["model"], p.name  # the old flat form ...
        assert not set(ARCHS) & set(manifest["config"]["model"]), p.name  # ... without [model.<arch>]
        assert Path(p / "weights.safetensors").is_file()
