import json

import pytest
import torch
from modelkit import tiny_config

import model.checkpoint as ck
from model import Ranker, combine_scores
from model.checkpoint import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    load_checkpoint,
    read_latest,
    resolve_checkpoint,
    save_checkpoint,
    write_latest,
)
from model.data import load_dataset
from model.train import fit, predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = tiny_config(epochs=1)
    ds = load_dataset(cfg)
    res = fit(cfg, ds)
    art = tmp_path_factory.mktemp("art")
    path = save_checkpoint(
        art, res.model, cfg, ds.schema, metrics=res.metrics, data_fingerprint=ds.fingerprint
    )
    return art, path, res, ds, cfg


def test_round_trip_is_bit_exact(trained):
    art, path, res, ds, cfg = trained
    assert read_latest(art) == path.name
    ckpt = load_checkpoint(resolve_checkpoint(art))
    saved = res.model.state_dict()
    loaded = ckpt.model.state_dict()
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    a, b = predict(res.model, ds.test, cfg.tasks), predict(ckpt.model, ds.test, cfg.tasks)
    for t in a:
        assert (a[t] == b[t]).all()
    assert ckpt.schema.to_dict() == ds.schema.to_dict()
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["data_fingerprint"]["log"]["sha256"]
    assert "test/engagement/auc" in m["metrics"]


def test_ranker_scores_match_offline_predictions(trained):
    art, path, res, ds, cfg = trained
    ranker = Ranker.load(path)
    heads = ranker.score_encoded(ds.test.cats[:50], ds.test.nums[:50])
    offline = predict(res.model, ds.test, cfg.tasks)
    for t in ranker.task_names:
        assert heads[t] == pytest.approx(offline[t][:50], rel=1e-6)
        assert ((heads[t] > 0) & (heads[t] < 1)).all()
    score = combine_scores(heads, {"engagement": 1.0, "satisfaction": 0.5}, "product")
    assert score == pytest.approx(heads["engagement"] * heads["satisfaction"] ** 0.5)
    ranker.warmup(n=16, rounds=1)


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "models" / path.name
    shutil.copytree(path, dst)
    return dst


def test_tampered_weights_are_rejected(trained, tmp_path):
    p = _copy(trained[1], tmp_path)
    data = bytearray((p / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (p / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_checkpoint(p)


def test_missing_and_garbled_files_are_clear_errors(trained, tmp_path):
    p = _copy(trained[1], tmp_path)
    (p / "weights.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="weights.safetensors"):
        load_checkpoint(p)
    p2 = tmp_path / "other"
    p2.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="manifest.json"):
        load_checkpoint(p2)
    (p2 / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_checkpoint(p2)
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(tmp_path / "nope")


def test_mismatched_manifest_is_rejected(trained, tmp_path):
    p = _copy(trained[1], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["config"]["model"]["embed_dim"] = 7
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleCheckpointError, match="do not fit"):
        load_checkpoint(p)
    m["format_version"] = 99
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IncompatibleCheckpointError, match="format_version"):
        load_checkpoint(p)


def test_version_ids_are_never_paths(tmp_path):
    for bad in ("../etc", "a/b", "", ".tmp-x", "x" * 200):
        with pytest.raises(CheckpointNotFoundError):
            resolve_checkpoint(tmp_path, bad)
    with pytest.raises(CheckpointNotFoundError, match="train a model first"):
        read_latest(tmp_path)


def test_crash_mid_write_leaves_latest_and_versions_intact(trained, tmp_path, monkeypatch):
    art, path, res, ds, cfg = trained
    first = save_checkpoint(tmp_path, res.model, cfg, ds.schema)

    def boom(*a, **k):
        (tmp_path / "models").joinpath("partial").write_bytes(b"x")  # whatever was written so far
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, res.model, cfg, ds.schema)
    monkeypatch.undo()
    assert read_latest(tmp_path) == first.name
    assert ck.list_versions(tmp_path) == [first.name]
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp")]
    load_checkpoint(resolve_checkpoint(tmp_path))
    with pytest.raises(CheckpointNotFoundError):
        write_latest(tmp_path, "20990101-000000-abcdef")


def test_ranker_request_path_matches_the_broadcast_path(trained):
    import pandas as pd

    from model.data import load_entity_table

    art, path, res, ds, cfg = trained
    ranker = Ranker.load(path)
    s = ranker.schema
    videos = load_entity_table(cfg.data, "video").iloc[:300]
    users = load_entity_table(cfg.data, "user").iloc[[5]]
    u, v = s.canonicalize_frame("user", users), s.canonicalize_frame("video", videos)
    c = s.canonicalize_records("context", [{"tab": 1, "hour": 18}])
    fast = ranker.score(u, v, c)
    slow = ranker.score_encoded(*ranker.encode(u, v, c))
    for t in ranker.task_names:
        assert fast[t] == pytest.approx(slow[t], rel=1e-5, abs=1e-7)
    assert isinstance(videos, pd.DataFrame)
