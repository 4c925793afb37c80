"""The served order on the test days: train each config x seed (``mtrank train``'s path, with the
fitted combination and calibration), replay its test split through the service (``mtrank
replay``'s path), and summarise NDCG@k of every policy and the served default's lead over
popularity, with the bootstrap intervals over lists.

Each run gets its own artifacts folder under ``--out`` (one shared data cache); the summary is
rewritten after every run (``served_order.json``) and printed as a markdown table.

    python scripts/served_order.py                                          # MMoE + shared-bottom, seeds 0-2
    python scripts/served_order.py --configs configs/kuairand_mmoe.toml --seeds 0 --resamples 200
    python scripts/served_order.py --replay-only      # replay the versions trained before (same --out)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import list_versions, models_dir, read_manifest  # noqa: E402
from model.config import load_config  # noqa: E402
from model.replay import POPULARITY, SERVED  # noqa: E402
from model.train import train  # noqa: E402
from service.replay import run_replay  # noqa: E402


def summary_row(
    config: str, seed: int, rep: dict[str, Any], ranking: dict[str, Any] | None
) -> dict[str, Any]:
    k = rep["objective"]["k"]
    pol = rep["policies"]
    return {
        "config": config,
        "seed": seed,
        "version": rep["version"],
        "arch": rep["arch"],
        "served": rep["served"],
        "validation": (ranking or {}).get("validation"),
        "calibrated": sorted(
            h
            for h, e in ((ranking or {}).get("calibration") or {}).items()
            if isinstance(e, dict) and e.get("applied")
        ),
        "ndcg": {name: e[f"ndcg@{k}"] for name, e in pol.items()},
        "served_minus_popularity": pol[SERVED][f"ndcg@{k}_minus_popularity"],
        "parity": rep["parity"],
        "counts": rep["counts"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    policies = list(rows[0]["ndcg"])
    head = ["config", "seed", "served combination", *policies, f"served - {POPULARITY}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["served"]
        w = ", ".join(f"{h} {v:.2f}" for h, v in (s.get("weights") or {}).items())
        d = r["served_minus_popularity"]
        out.append(
            "| "
            + " | ".join(
                [
                    Path(r["config"]).stem,
                    str(r["seed"]),
                    f"{s.get('combine')} ({w})",
                    *(f"{r['ndcg'][p]['mean']:.4f}" for p in policies),
                    f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]",
                ]
            )
            + " |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs", nargs="+", default=["configs/kuairand_mmoe.toml", "configs/kuairand_shared_bottom.toml"]
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("artifacts/served_order"))
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument(
        "--replay-only", action="store_true", help="replay the versions already trained under --out"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MTRANK_CACHE_DIR", str(args.out / "cache"))
    rows: list[dict[str, Any]] = []
    for config in args.configs:
        for seed in args.seeds:
            cfg = load_config(config)
            cfg.train.seed = seed
            artifacts = args.out / f"{Path(config).stem}-seed{seed}"
            t0 = time.perf_counter()
            if args.replay_only:
                (version,) = list_versions(artifacts)
                ranking = read_manifest(models_dir(artifacts) / version).get("ranking")
            else:
                result = train(cfg, artifacts, set_latest=False)
                assert result.checkpoint is not None
                version, ranking = result.checkpoint.name, result.ranking
            rep = run_replay(artifacts=artifacts, version=version, resamples=args.resamples)
            reports = artifacts / "reports"
            reports.mkdir(parents=True, exist_ok=True)
            (reports / f"replay-{rep['version']}-test.json").write_text(json.dumps(rep, indent=1))
            rows.append(summary_row(config, seed, rep, ranking))
            logging.info("%s seed %d done in %.0fs", config, seed, time.perf_counter() - t0)
            (args.out / "served_order.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
