"""Small real objects for the model tests: the 300-user KuaiRand fixture and tiny configs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from model import Ranker, models_dir, stable_hash
from model.checkpoint import seal_manifest
from model.config import (
    ConditionedConfig,
    Config,
    MMoEConfig,
    ModelConfig,
    NetConfig,
    PLEConfig,
    SeparateConfig,
    SharedBottomConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data" / "kuairand-pure"
FIXTURE_LOG = "kuairand_pure_20220425_0508_300users_seed20240601.csv"


NETS: dict[str, type] = {
    "separate": SeparateConfig,
    "shared_bottom": SharedBottomConfig,
    "mmoe": MMoEConfig,
    "ple": PLEConfig,
    "conditioned": ConditionedConfig,
}


def model_config(
    arch: str,
    *,
    expert_dims: list[int] | None = None,
    bottom_dims: list[int] | None = None,
    **keys: Any,
) -> ModelConfig:
    """A ``ModelConfig`` for any ``arch`` from one set of widths: ``expert_dims`` / ``bottom_dims``
    go to ``[model.<arch>]`` when the architecture has them (and are ignored when it does not);
    every other key is ``[model]``'s or else the architecture's own (an unknown key is an error)."""
    cls = NETS[arch]
    own = {f.name for f in dataclasses.fields(cls)} - {"arch"}
    common = {f.name for f in dataclasses.fields(ModelConfig)} - {"net"}
    dims = {"expert_dims": expert_dims, "bottom_dims": bottom_dims}
    net_keys = {k: v for k, v in dims.items() if v is not None and k in own}
    net_keys.update({k: v for k, v in keys.items() if k not in common})
    return ModelConfig(net=cls(**net_keys), **{k: v for k, v in keys.items() if k in common})


def tiny_config(arch: str = "mmoe", epochs: int = 2, seed: int = 0) -> Config:
    """The shipped KuaiRand config on the 300-user fixture with small layers: trains in ~1 s."""
    cfg = load_config(ROOT / "configs" / "kuairand_mmoe.toml")
    cfg.data.data_dir = str(DATA_DIR)
    cfg.data.log = FIXTURE_LOG
    shipped = cfg.model.net  # [model.mmoe] of the shipped file: its expert count and gate dropout
    assert isinstance(shipped, MMoEConfig)
    nets: dict[str, NetConfig] = {
        "mmoe": MMoEConfig(n_experts=shipped.n_experts, expert_dims=[16], gate_dropout=shipped.gate_dropout),
        "ple": PLEConfig(expert_dims=[16], gate_dropout=shipped.gate_dropout),
        "shared_bottom": SharedBottomConfig(bottom_dims=[16]),
        "separate": SeparateConfig(bottom_dims=[16]),
        "conditioned": ConditionedConfig(bottom_dims=[16]),
    }
    cfg.model.net = nets[arch]
    cfg.model.embed_dim = 4
    cfg.model.tower_dims = [8]
    cfg = cfg.validated()  # before the epochs: some tests ask for 0, which a config refuses
    cfg.train.epochs = epochs
    cfg.train.batch_size = 256
    cfg.train.seed = seed
    cfg.train.patience = 10
    for f in cfg.data.features:
        f.min_count = 1
    return cfg


def tiny_toml(tmp_path: Path) -> str:
    """The KuaiRand MMoE config file rewritten for the 300-user fixture, one small epoch."""
    src = (ROOT / "configs" / "kuairand_mmoe.toml").read_text()
    src = src.replace(
        'log = "log_standard_20220425_to_20220508_pure.csv.gz"',
        'log = "kuairand_pure_20220425_0508_300users_seed20240601.csv"',
    )
    src = src.replace("epochs = 8", "epochs = 1").replace("expert_dims = [128, 64]", "expert_dims = [16]")
    src = src.replace(
        'data_dir = "../shared/data/kuairand-pure"',
        f'data_dir = "{ROOT.parent / "shared/data/kuairand-pure"}"',
    )
    p = tmp_path / "tiny.toml"
    p.write_text(src)
    return str(p)


def service_settings(artifacts: Path, **overrides: Any) -> Any:
    """Settings for an in-process test app: the embedded store, no admin router, a quick warm-up and
    no hot reload during the test unless ``overrides`` say otherwise."""
    from service.settings import Settings  # keeps modelkit importable by model-only tests

    base: dict[str, Any] = {
        "artifacts": artifacts,
        "feature_store": "embedded",
        "reload_interval_s": 30.0,
        "warmup_batch": 16,
        "admin_token": None,
    }
    return Settings(**{**base, **overrides})


def served_default(artifacts: Path) -> tuple[str, dict[str, float]]:
    """(method, weights) of the combination fitted after training for LATEST (its manifest): what
    the service serves by default."""
    from model import read_latest, resolve_checkpoint
    from model.checkpoint import read_manifest

    fitted = read_manifest(resolve_checkpoint(artifacts, read_latest(artifacts)))["ranking"]["combination"]
    return str(fitted["method"]), {k: float(v) for k, v in fitted["weights"].items()}


def served_score(heads: Mapping[str, float], method: str, weights: Mapping[str, float]) -> float:
    """One candidate's combined score, written out: prod_i s_i ** w_i or sum_i w_i * s_i."""
    if method == "product":
        return float(np.prod([heads[h] ** w for h, w in weights.items()]))
    return float(sum(w * heads[h] for h, w in weights.items()))


def copy_version(artifacts: Path, source: str, new: str) -> Path:
    """Copy version ``source`` of ``artifacts`` as version ``new`` (its manifest resealed: a valid
    checkpoint of its own); returns the new folder."""
    dst = models_dir(artifacts) / new
    shutil.copytree(models_dir(artifacts) / source, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = new
    (dst / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))  # a new digest: a real copy
    return dst


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metric(client: Any, name: str, **labels: str) -> float:
    """One sample of the app's /metrics (``client``: a TestClient), e.g. a counter's ``<name>_total``."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"metric {name}{labels} not exposed")


def default_row_heads(
    ranker: Ranker, user_id: int | str, video_ids: Sequence[int | str], context: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """What a user and videos the feature store has no row for must score: every feature missing
    (the schema's default rows) except the entity id columns, which hold ``stable_hash(id)``.

    Scored through the full-batch forward (``score_encoded``), not the service's per-request path.
    """
    s = ranker.schema
    user, videos = s.default_rows("user", 1), s.default_rows("video", len(video_ids))
    user_cats, video_cats = s.columns("user")[0], s.columns("video")[0]
    if s.user_key in user_cats:
        user.cats[0, user_cats.index(s.user_key)] = stable_hash(user_id)
    if s.video_key in video_cats:
        j = video_cats.index(s.video_key)
        videos.cats[:, j] = [stable_hash(v) for v in video_ids]
    ctx = s.canonicalize_records("context", [dict(context)])
    return ranker.score_encoded(*ranker.encode(user, videos, ctx))


def model_details(client: Any) -> dict[str, Any]:
    """What ``GET /admin/model`` answers (the served model, its store, the last rejection: details
    the public ``/model`` leaves out), read from the app's model holder as that route renders it;
    the test apps mostly run without an admin token."""
    import orjson

    out: dict[str, Any] = orjson.loads(orjson.dumps(client.app.state.holder.describe(), default=str))
    return out
