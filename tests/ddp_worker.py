"""Run by the DDP tests under ``torchrun``: train several variants of one config in one process group.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py CONFIG ROOT VARIANTS_JSON

Each variant is {"name": str, "set": {"train.weighting": "mgda", ...}, "init_from": path or null}
(``set``: ``--set`` assignments with JSON values);
its checkpoint goes to ROOT/<name>. The group is joined once (one start-up for all variants).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

from model.config import Config, SequenceDecl, apply_overrides, load_config
from model.distributed import init_distributed
from model.train import train


def apply(cfg: Config, overrides: dict[str, object]) -> Config:
    """``cfg`` with ``overrides`` ({"section.key": JSON value}) applied, as ``--set`` applies them
    (``train.weighting``, ``model.arch`` switch to that part's defaults; ``model.ple.levels`` keys)."""
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if k != "data.sequences"]
    cfg = apply_overrides(cfg, sets)
    if "data.sequences" in overrides:  # JSON objects -> the config's dataclasses
        cfg.data.sequences = [SequenceDecl(**q) for q in overrides["data.sequences"]]  # type: ignore[attr-defined]
        cfg = cfg.validated()
    return cfg


def main() -> None:
    config, root, variants = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    logging.basicConfig(level=logging.WARNING)
    replica = init_distributed()
    try:
        for v in variants:
            cfg = apply(load_config(config), v.get("set", {}))
            train(cfg, root / v["name"], replica=replica, init_from=v.get("init_from"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown (see model.train.main)


if __name__ == "__main__":
    main()
