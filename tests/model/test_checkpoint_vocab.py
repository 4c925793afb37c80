"""Vocabularies of millions of ids: stored as arrays beside the weights, not as JSON lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
from modelkit import tiny_config

import model.checkpoint as ck
from model.data import load_dataset
from model.train import fit, predict


@pytest.fixture
def trained(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "VOCAB_INLINE_MAX", 50)  # the fixture's user and video ids are "large"
    cfg = tiny_config(epochs=1)
    ds = load_dataset(cfg)
    res = fit(cfg, ds)
    path = ck.save_checkpoint(tmp_path, res.model, cfg, ds.schema)
    return path, res, ds


def test_large_vocabularies_live_in_a_listed_sidecar_and_load_back_the_same(trained):
    path, res, ds = trained
    manifest = json.loads((path / ck.MANIFEST).read_text())
    assert manifest["format_version"] == ck.SIDECAR_FORMAT_VERSION
    assert ck.VOCAB in manifest["files"]  # covered by the manifest's digest like the weights
    big = {f["name"] for f in manifest["feature_schema"]["features"] if f.get("vocab", []) is None}
    assert {"user_id", "video_id"} <= big and "tab" not in big  # small ones stay readable inline
    loaded = ck.load_checkpoint(path)
    assert loaded.schema.to_dict() == ds.schema.to_dict()
    for a, b in zip(loaded.schema.cats(), ds.schema.cats(), strict=True):
        assert np.array_equal(a.vocab_codes(), b.vocab_codes())
    got, want = (
        predict(loaded.model, ds.test, loaded.config.tasks),
        predict(res.model, ds.test, loaded.config.tasks),
    )
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_an_edited_sidecar_is_refused(trained):
    path, _, _ = trained
    arrays = ck.load_numpy(str(path / ck.VOCAB))
    key = next(k for k in arrays if k.endswith(".codes"))
    arrays[key] = arrays[key][::-1].copy()  # swap the ids' rows
    ck.save_numpy(arrays, str(path / ck.VOCAB))
    with pytest.raises(ck.CorruptCheckpointError, match="vocab.safetensors"):
        ck.load_checkpoint(path)
