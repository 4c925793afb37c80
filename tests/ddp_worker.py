"""Run by the DDP tests under ``torchrun``: train several variants of one config in one process group.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py CONFIG ROOT VARIANTS_JSON

Each variant is {"name": str, "set": {"train.weighting": "mgda", ...}, "init_from": path or null};
its checkpoint goes to ROOT/<name>. The group is joined once (one start-up for all variants).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

from model.config import SequenceDecl, load_config
from model.distributed import init_distributed
from model.train import train


def apply(cfg: object, overrides: dict[str, object]) -> None:
    for key, value in overrides.items():
        section, name = key.split(".")
        if key == "data.sequences":  # JSON objects -> the config's dataclasses
            value = [SequenceDecl(**q) for q in value]  # type: ignore[attr-defined]
        setattr(getattr(cfg, section), name, value)


def main() -> None:
    config, root, variants = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    logging.basicConfig(level=logging.WARNING)
    replica = init_distributed()
    try:
        for v in variants:
            cfg = load_config(config)
            apply(cfg, v.get("set", {}))
            cfg.__post_init__()
            train(cfg, root / v["name"], replica=replica, init_from=v.get("init_from"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown (see model.train.main)


if __name__ == "__main__":
    main()
