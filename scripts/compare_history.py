"""A config with and without user behaviour histories, over seeds: test AUC and GAUC of every binary
head, mean ± std (sample std), and the paired differences seed by seed.

Each variant is the config plus ``[[data.sequences]]`` entries (none for the baseline); the data is
prepared once per variant (histories are part of the encoded rows) and every seed trains from
scratch with ``model.train.fit``. Prints a markdown table and writes a JSON report with every run.

    python scripts/compare_history.py                       # MMoE: none / attention / mean, 3 seeds
    python scripts/compare_history.py --variants none attention --seeds 0 --max-len 20
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import Config, SequenceDecl, load_config  # noqa: E402
from model.data import Split, load_dataset  # noqa: E402
from model.train import fit  # noqa: E402

METRICS = ("auc", "gauc")


def variant(base: Config, name: str, label: str, max_len: int, side: list[str]) -> Config:
    """``none``: the config as it is; ``attention`` / ``mean``: plus one history of ``label`` events;
    ``+likes`` adds a mean-pooled history of likes, ``+clicks`` an attention-pooled one of clicks."""
    cfg = copy.deepcopy(base)
    cfg.data.sequences = []
    if name != "none":
        pooling, *extra = name.split("+")
        cfg.data.sequences = [SequenceDecl(f"recent_{label}", label, max_len, pooling, list(side))]  # type: ignore[arg-type]
        if "likes" in extra:
            cfg.data.sequences.append(SequenceDecl("recent_likes", "is_like", 10, "mean", list(side)))
        if "clicks" in extra:
            cfg.data.sequences.append(
                SequenceDecl("recent_clicks", "is_click", max_len, "attention", list(side))
            )
    cfg.data.check()
    return cfg


def best_valid(history: list[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """The validation metrics of the epoch training kept."""
    row = next((h for h in history if h.get("epoch") == best_epoch), {})
    return {k: v for k, v in row.items() if k.startswith("valid/")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kuairand_mmoe.toml")
    ap.add_argument("--variants", nargs="+", default=["none", "attention", "mean"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label", default="long_view", help="the log column whose positive rows are events")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--side", nargs="*", default=["author_id", "tag"], help="item side features")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "reports" / "compare_history.json")
    a = ap.parse_args()

    base = load_config(a.config)
    base.train.num_threads = a.threads
    heads = [t.name for t in base.tasks if t.kind == "binary"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for name in a.variants:
        cfg = variant(base, name, a.label, a.max_len, a.side)
        t0 = time.perf_counter()
        ds = load_dataset(cfg)
        prep_s = time.perf_counter() - t0
        assert isinstance(ds.test, Split)  # load_dataset holds the splits in memory
        for seq in cfg.data.sequences:
            lens = ds.test.seqs[f"seq.{seq.name}.len"]
            print(
                f"{name}: {seq.name} test rows with a history {np.mean(lens > 0):.1%}, mean length {lens.mean():.2f}"
            )
        for seed in a.seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.seed = seed
            t0 = time.perf_counter()
            res = fit(run_cfg, ds)
            m = res.metrics
            row = {
                "variant": name,
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 1),
                "prepare_seconds": round(prep_s, 1),
                "best_epoch": m["best_epoch"],
                "metrics": {k: v for k, v in m.items() if k.startswith("test/")},
                "valid": best_valid(res.history, m["best_epoch"]),
            }
            runs.append(row)
            print(
                f"{name:18s} seed={seed} "
                + " ".join(f"{h} {k} {m[f'test/{h}/{k}']:.4f}" for h in heads for k in METRICS)
                + f" | valid loss {row['valid'].get('valid/loss', float('nan')):.5f} "
                + " ".join(f"{h} gauc {row['valid'].get(f'valid/{h}/gauc', float('nan')):.4f}" for h in heads)
                + f" | best epoch {m['best_epoch']} ({row['seconds']:.0f}s)",
                flush=True,
            )
            a.out.write_text(
                json.dumps({"config": str(a.config), "args": vars(a), "runs": runs}, indent=1, default=str)
            )
    print()
    print(table(runs, heads, a.variants))
    print(f"\nwrote {a.out}")


def table(runs: list[dict[str, Any]], heads: list[str], variants: list[str]) -> str:
    cols = [(h, k) for h in heads for k in METRICS]
    lines = [
        "| history | " + " | ".join(f"{h} test {k.upper()}" for h, k in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    base = {r["seed"]: r for r in runs if r["variant"] == variants[0]}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        cells = []
        for h, k in cols:
            x = np.array([r["metrics"][f"test/{h}/{k}"] for r in rs])
            cell = f"{x.mean():.4f} ± {x.std(ddof=1) if len(x) > 1 else 0.0:.4f}"
            if v != variants[0]:
                d = np.array(
                    [
                        r["metrics"][f"test/{h}/{k}"] - base[r["seed"]]["metrics"][f"test/{h}/{k}"]
                        for r in rs
                        if r["seed"] in base
                    ]
                )
                if len(d):
                    cell += f" ({d.mean():+.4f})"
            cells.append(cell)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
