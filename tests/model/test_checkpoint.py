import json
import os

import pytest
import torch
from modelkit import model_config, tiny_config

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


def _rewrite_manifest(path, m):
    """Write an edited manifest with a fresh digest, so the load gets past the digest check to the
    check under test (tests/model/test_checkpoint_integrity.py covers the digest itself)."""
    (path / "manifest.json").write_text(json.dumps(ck.seal_manifest(m)))


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
    _rewrite_manifest(p, m)
    with pytest.raises(IncompatibleCheckpointError, match="do not fit"):
        load_checkpoint(p)
    m["format_version"] = 99
    _rewrite_manifest(p, m)
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
    with pytest.raises(ck.CheckpointError, match="disk full"):
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


# -- malformed manifests: always a CheckpointError naming the field --------------------------------


def _first_tensor(m):
    return next(iter(m["weights"]["tensors"].values()))


def _first(m, kind):
    return next(f for f in m["feature_schema"]["features"] if f["kind"] == kind)


def _set(keys, value):
    """A manifest mutation: set m[k1][k2]... = value."""

    def mutate(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return mutate


def _delete(keys):
    def mutate(m):
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]

    return mutate


MALFORMED = {
    # JSON types, checked before anything is built from them
    "weights is a list": (_set(["weights"], []), CorruptCheckpointError, r"weights: expected object"),
    "tensors is a list": (
        _set(["weights", "tensors"], []),
        CorruptCheckpointError,
        r"weights\.tensors: expected object",
    ),
    "tensor entry is a string": (
        lambda m: m["weights"]["tensors"].update({"embed.offsets": "x"}),
        CorruptCheckpointError,
        r"weights\.tensors(\['embed\.offsets'\]|\.embed\.offsets): expected object, got string 'x'",
    ),
    "tensor shape is a string": (
        lambda m: _first_tensor(m).update(shape="abc"),
        CorruptCheckpointError,
        r"\.shape: expected list",
    ),
    "tensor dtype missing": (
        lambda m: _first_tensor(m).pop("dtype"),
        CorruptCheckpointError,
        r"missing key 'dtype'",
    ),
    "sha256 is a number": (
        _set(["weights", "sha256"], 5),
        CorruptCheckpointError,
        r"sha256: expected string",
    ),
    "config is a list": (_set(["config"], []), CorruptCheckpointError, r"config: expected object"),
    "model is a string": (
        _set(["config", "model"], "mmoe"),
        CorruptCheckpointError,
        r"config\.model: expected",
    ),
    "tasks is an object": (
        _set(["config", "tasks"], {}),
        CorruptCheckpointError,
        r"config\.tasks: expected list",
    ),
    "task without a name": (
        _delete(["config", "tasks", 0, "name"]),
        CorruptCheckpointError,
        r"config\.tasks\[0\]: missing key 'name'",
    ),
    "features is a string": (
        _set(["feature_schema", "features"], "abc"),
        CorruptCheckpointError,
        r"feature_schema\.features: expected list",
    ),
    "feature is a number": (
        _set(["feature_schema", "features", 0], 5),
        CorruptCheckpointError,
        r"feature_schema\.features\[0\]: expected object",
    ),
    "vocab is a number": (
        lambda m: _first(m, "categorical").update(vocab=5),
        CorruptCheckpointError,
        r"feature_schema\.features\[0\]\.vocab: expected list( or null)?, got integer 5",
    ),
    "vocab item is a number": (
        lambda m: _first(m, "categorical").update(vocab=[1, 2]),
        CorruptCheckpointError,
        r"\.vocab\[0\]: expected string",
    ),
    "dropout is a string": (
        _set(["config", "model", "dropout"], "a"),
        CorruptCheckpointError,
        r"config\.model\.dropout: expected number, got string 'a'",
    ),
    "width is a string": (
        _set(["config", "model", "mmoe", "expert_dims"], ["16"]),
        CorruptCheckpointError,
        r"config\.model\.mmoe\.expert_dims\[0\]: expected integer, got string '16'",
    ),
    "weighting key is a string": (
        _set(["config", "train", "weighting"], {"gradnorm": {"alpha": "2"}}),
        CorruptCheckpointError,
        r"config\.train\.weighting\.gradnorm\.alpha: expected number, got string '2'",
    ),
    "embed_dim is a boolean": (
        _set(["config", "model", "embed_dim"], True),
        CorruptCheckpointError,
        r"config\.model\.embed_dim: expected integer, got boolean",
    ),
    "train_range has 3 items": (
        _set(["config", "data", "train_range"], [1, 2, 3]),
        CorruptCheckpointError,
        r"config\.data\.train_range: expected a list of 2 items, got 3",
    ),
    "metrics is a list": (_set(["metrics"], []), CorruptCheckpointError, r"metrics: expected object"),
    "version is a number": (_set(["version"], 7), CorruptCheckpointError, r"version: expected string"),
    "version is a path": (_set(["version"], "../x"), CorruptCheckpointError, r"not a model version id"),
    # values the constructors or the network refuse
    "numeric std is zero": (
        lambda m: _first(m, "numeric").update(std=0.0),
        CorruptCheckpointError,
        r"numeric feature .* std 0\.0",
    ),
    "numeric mean is NaN": (
        lambda m: _first(m, "numeric").update(mean=float("nan")),
        CorruptCheckpointError,
        r"numeric feature .* mean nan",
    ),
    "dropout out of range": (
        _set(["config", "model", "dropout"], 2.0),
        CorruptCheckpointError,
        r"builds no network: ValueError: dropout probability",
    ),
    "negative width": (
        _set(["config", "model", "mmoe", "expert_dims"], [-3]),
        CorruptCheckpointError,
        r"builds no network: RuntimeError",
    ),
    "bias features the schema lacks": (
        _set(["config", "model", "bias_features"], ["position"]),
        CorruptCheckpointError,
        r"builds no network: ValueError: model\.bias_features",
    ),
    # a newer (or older) build's manifest: incompatible rather than corrupt
    # a newer build's architecture, with its own table
    "unknown arch": (
        lambda m: m["config"]["model"].update(arch="nope", nope=m["config"]["model"].pop("mmoe")),
        IncompatibleCheckpointError,
        r"model: Input tag 'nope' found using 'arch' does not match",
    ),
    "arch and its table disagree": (
        _set(["config", "model", "arch"], "ple"),
        IncompatibleCheckpointError,
        r"\[model\] arch = 'ple' but the table is \[model\.mmoe\]",
    ),
    "unknown weighting": (
        _set(["config", "train", "weighting"], "nope"),
        IncompatibleCheckpointError,
        r"train\.weighting: Input tag 'nope' found using 'kind' does not match",
    ),
    "another arch's key": (
        _set(["config", "model", "mmoe", "levels"], 2),
        IncompatibleCheckpointError,
        r"\[model\.mmoe\] unknown keys: \['levels'\]",
    ),
    "unknown feature kind": (
        _set(["feature_schema", "features", 0, "kind"], "weird"),
        IncompatibleCheckpointError,
        r"kind must be",
    ),
    "unknown config key": (
        _set(["config", "model", "new_knob"], 1),
        IncompatibleCheckpointError,
        r"unknown keys: \['new_knob'\]",
    ),
    "format_version is a boolean": (
        _set(["format_version"], True),
        IncompatibleCheckpointError,
        r"format_version True",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_a_checkpoint_error(trained, tmp_path, case):
    mutate, error, match = MALFORMED[case]
    p = _copy(trained[1], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    mutate(m)
    _rewrite_manifest(p, m)
    with pytest.raises(error, match=match) as info:
        load_checkpoint(p)
    assert type(info.value) is error


@pytest.mark.parametrize(
    "text",
    [
        b"{not json",
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000,  # deeper than the parser's recursion limit
        b'{"format_version": 1, "x": 1' + b"0" * 5000 + b"}",  # an int beyond int_max_str_digits
    ],
    ids=["not json", "not utf-8", "deeply nested", "huge int literal"],
)
def test_garbled_manifest_is_corrupt(trained, tmp_path, text):
    p = _copy(trained[1], tmp_path)
    (p / "manifest.json").write_bytes(text)
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_checkpoint(p)


# -- a manifest claiming huge layers is rejected before anything is allocated ----------------------


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


HUGE = {  # each would need ~10^12 parameters (4 TB) if the network were materialised
    "expert widths": (_set(["config", "model", "mmoe", "expert_dims"], [10**6, 10**6]), r"do not fit"),
    "embed_dim": (_set(["config", "model", "embed_dim"], 10**9), r"do not fit"),
    "vocabulary": (
        lambda m: (
            _first(m, "categorical").update(vocab=[str(i) for i in range(100_000)]),
            m["config"]["model"].update(embed_dim=10**7),
        ),
        r"do not fit",
    ),
    "tower widths": (_set(["config", "model", "tower_dims"], [10**6, 10**6]), r"do not fit"),
    "n_experts": (
        _set(["config", "model", "mmoe", "n_experts"], 10**9),
        r"model\.mmoe\.n_experts needs at least",
    ),
    "ple levels": (
        lambda m: (
            m["config"]["model"].pop("mmoe"),
            m["config"]["model"].update(arch="ple", ple={"levels": 10**9}),
        ),
        r"model\.ple\.levels x experts per gate needs at least",
    ),
    "ple levels, an old flat manifest": (
        lambda m: (
            m["config"]["model"].pop("mmoe"),
            m["config"]["model"].update(arch="ple", ple_levels=10**9),
        ),
        r"model\.ple\.levels x experts per gate needs at least",
    ),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_dims_are_rejected_without_allocating(trained, tmp_path, monkeypatch, case):
    mutate, match = HUGE[case]
    p = _copy(trained[1], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    mutate(m)
    _rewrite_manifest(p, m)
    devices = []
    real_build = ck.build_model

    def spy(*a, **k):
        devices.append(torch.empty(0).device.type)  # the default device inside the call
        return real_build(*a, **k)

    def no_read(*a, **k):
        raise AssertionError("the weights must not be read before the network is checked")

    monkeypatch.setattr(ck, "build_model", spy)
    monkeypatch.setattr(ck, "load_file", no_read)
    rss0 = _peak_rss_mb()
    with pytest.raises(IncompatibleCheckpointError, match=match):
        load_checkpoint(p)
    assert _peak_rss_mb() - rss0 < 500
    assert set(devices) <= {"meta"}


def test_overflowing_dims_are_corrupt(trained, tmp_path):
    p = _copy(trained[1], tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["config"]["model"]["embed_dim"] = 10**30
    _rewrite_manifest(p, m)
    with pytest.raises(CorruptCheckpointError, match="builds no network") as info:
        load_checkpoint(p)
    assert "\n" not in str(info.value)  # torch's C++ stack trace is left out of the message


def _small_schema(bias: bool):
    from model.features import FeatureSchema, FeatureSpec

    specs = [
        FeatureSpec("user_id", "user", "categorical", vocab=[str(i) for i in range(10)]),
        FeatureSpec("video_id", "video", "categorical", vocab=[str(i) for i in range(20)]),
        FeatureSpec("dur", "video", "numeric", mean=1.0, std=2.0),
        FeatureSpec("tab", "context", "categorical", vocab=["a", "b"]),
    ]
    if bias:
        specs.append(FeatureSpec("position", "bias", "categorical", vocab=[str(i) for i in range(8)]))
    return FeatureSchema(specs)


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias tower"])
@pytest.mark.parametrize("arch", ["separate", "shared_bottom", "mmoe", "ple", "conditioned"])
def test_every_arch_is_checked_on_the_meta_device(tmp_path, arch, bias):
    from model.nets import build_model

    cfg = tiny_config(arch)
    own = {"mmoe": {"n_experts": 3}, "conditioned": {"conditioning": "film"}}.get(arch, {})
    cfg.model = model_config(
        arch,
        embed_dim=4,
        bottom_dims=[8, 6],
        expert_dims=[8],
        tower_dims=[4],
        bias_features=["position"] if bias else [],
        **own,
    )
    schema = _small_schema(bias)
    net = build_model(cfg.model, schema, cfg.tasks)
    path = save_checkpoint(tmp_path, net, cfg, schema)
    loaded = load_checkpoint(path).model.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded[k]) and not loaded[k].is_meta, k
    m = json.loads((path / "manifest.json").read_text())
    key = "expert_dims" if arch in ("mmoe", "ple") else "bottom_dims"
    assert m["config"]["model"]["arch"] == arch and key in m["config"]["model"][arch]
    m["config"]["model"][arch][key] = [10**6, 10**6]
    if bias:
        m["config"]["model"]["bias_dims"] = [10**6, 10**6]
    _rewrite_manifest(path, m)
    with pytest.raises(IncompatibleCheckpointError, match="do not fit"):
        load_checkpoint(path)


# -- configs stored flat, before [model.<arch>] and [train.weighting.<kind>] -------------------------

# every key the flat [model] / [train] of older checkpoints held for the parts, at the old defaults
_OLD_FLAT_MODEL = {
    "bottom_dims": [256, 128],
    "n_experts": 4,
    "expert_dims": [128, 64],
    "gate_dropout": 0.0,
    "ple_levels": 2,
    "n_shared_experts": 2,
    "n_task_experts": 1,
    "conditioning": "concat",
    "task_embed_dim": 16,
}
_OLD_FLAT_TRAIN = {
    "worst_case_temperature": 0.1,
    "worst_case_reference": "constant",
    "gradnorm_alpha": 1.5,
    "gradnorm_lr": 0.01,
    "gradnorm_reference": "constant",
}


def _flatten_config(config: dict) -> dict:
    """A manifest's config as an older build wrote it: the arch's table and the weighting's keys flat
    in [model] / [train] (``levels`` was ``ple_levels``), every other part's keys stored too."""
    out = json.loads(json.dumps(config))
    model, train = out["model"], out["train"]
    own = model.pop(model["arch"])
    model.update(_OLD_FLAT_MODEL)
    model.update({"ple_levels" if k == "levels" else k: v for k, v in own.items()})
    w = train.pop("weighting")
    kind, keys = (w, {}) if isinstance(w, str) else next(iter(w.items()))
    train.update(weighting=kind, **_OLD_FLAT_TRAIN)
    train.update({f"{kind}_{k}": v for k, v in keys.items()})
    return out


@pytest.mark.parametrize(
    ("arch", "net_keys", "weighting"),
    [
        ("separate", {"bottom_dims": [8, 6]}, "static"),
        ("shared_bottom", {"bottom_dims": [8]}, "mgda"),
        (
            "mmoe",
            {"n_experts": 3, "expert_dims": [8], "gate_dropout": 0.2},
            {"gradnorm": {"alpha": 2.0, "lr": 0.05, "reference": "initial"}},
        ),
        (
            "ple",
            {"levels": 3, "n_shared_experts": 1, "n_task_experts": 2, "expert_dims": [6]},
            {"worst_case": {"temperature": 0.3, "reference": "initial"}},
        ),
        ("conditioned", {"bottom_dims": [8, 6], "conditioning": "film", "task_embed_dim": 5}, "uncertainty"),
    ],
)
def test_a_manifest_with_the_old_flat_config_loads_and_scores_the_same(tmp_path, arch, net_keys, weighting):
    from model.config import Config, ConfigError
    from model.nets import build_model

    d = tiny_config(arch).to_dict()
    d["model"].update(embed_dim=4, tower_dims=[4], **{arch: net_keys})
    d["train"]["weighting"] = weighting
    cfg = Config.from_dict(d)
    schema = _small_schema(False)
    torch.manual_seed(0)
    net = build_model(cfg.model, schema, cfg.tasks).eval()
    path = save_checkpoint(tmp_path, net, cfg, schema)
    m = json.loads((path / "manifest.json").read_text())
    assert m["config"]["model"][arch] == {**m["config"]["model"][arch], **net_keys}  # the nested form
    m["config"] = _flatten_config(m["config"])
    assert arch not in m["config"]["model"] and "n_experts" in m["config"]["model"]
    assert isinstance(m["config"]["train"]["weighting"], str) and "gradnorm_lr" in m["config"]["train"]
    with pytest.raises(ConfigError, match=r"is now \[(model\.|train\.weighting\.)"):
        Config.from_dict(m["config"])  # refused in a config file ...
    _rewrite_manifest(path, m)
    ckpt = load_checkpoint(path)  # ... migrated in a checkpoint
    assert ckpt.config == cfg
    assert ckpt.config.model.net == cfg.model.net and ckpt.config.train.weighting == cfg.train.weighting
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt.model.state_dict()[k]), k
    g = torch.Generator().manual_seed(1)
    cats = torch.stack(
        [
            torch.randint(0, 11, (16,), generator=g),
            torch.randint(0, 21, (16,), generator=g),
            torch.randint(0, 3, (16,), generator=g),
        ],
        1,
    )
    nums = torch.randn(16, 1, generator=g)
    with torch.no_grad():
        want, got = net(cats, nums), ckpt.model(cats, nums)
    for t in want:
        assert torch.equal(want[t], got[t]), t
    ranker = Ranker.load(path)
    c, x = cats.numpy(), nums.numpy()
    heads = ranker.score_encoded(c, x)
    for t in want:
        assert heads[t] == pytest.approx(torch.sigmoid(want[t]).numpy(), rel=1e-6), t


# -- LATEST ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"../etc\n", "not a model version id"),
        (b"", "not a model version id"),
        (b".tmp-20990101-000000-abcdef", "not a model version id"),
        (b"two words\n", "not a model version id"),
        (b"x" * 10_000, "longer than 256 bytes"),
        (None, "cannot read.*a directory"),  # LATEST is a directory
        ("fifo", "cannot read.*a FIFO"),  # opening it would wait for a writer
    ],
    ids=["not utf-8", "a path", "empty", "a temp folder", "two words", "huge", "a directory", "a fifo"],
)
def test_unusable_latest_is_corrupt(tmp_path, content, match):
    latest = tmp_path / "models" / "LATEST"
    latest.parent.mkdir()
    if content is None:
        latest.mkdir()
    elif content == "fifo":
        os.mkfifo(latest)
    else:
        latest.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=match):
        read_latest(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=match):
        resolve_checkpoint(tmp_path)


def test_latest_tolerates_whitespace_and_a_models_file_is_corrupt(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "LATEST").write_bytes(b"  20990101-000000-abcdef \r\n")
    assert read_latest(tmp_path) == "20990101-000000-abcdef"
    other = tmp_path / "other"
    other.mkdir()
    (other / "models").write_bytes(b"not a folder")
    with pytest.raises(CorruptCheckpointError, match="cannot read"):
        read_latest(other)
