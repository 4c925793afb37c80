"""Small real objects for the model tests: the 300-user KuaiRand fixture and tiny configs."""

from __future__ import annotations

from pathlib import Path

from model.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data" / "kuairand-pure"
FIXTURE_LOG = "kuairand_pure_20220425_0508_300users_seed20240601.csv"


def tiny_config(arch: str = "mmoe", epochs: int = 2, seed: int = 0) -> Config:
    """The shipped KuaiRand config on the 300-user fixture with small layers: trains in ~1 s."""
    cfg = load_config(ROOT / "configs" / "kuairand_mmoe.toml")
    cfg.data.data_dir = str(DATA_DIR)
    cfg.data.log = FIXTURE_LOG
    cfg.model.arch = arch  # type: ignore[assignment]
    cfg.model.embed_dim = 4
    cfg.model.expert_dims = [16]
    cfg.model.bottom_dims = [16]
    cfg.model.tower_dims = [8]
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
