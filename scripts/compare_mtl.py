"""Architectures x task weightings x seeds on one config: test AUC of both heads, mean ± std.

The data is loaded once (it does not depend on the network or the weighting); every run trains
from scratch with ``model.train.fit`` and is evaluated on the config's test split. Prints a
markdown table and writes a JSON report with every run's metrics and per-epoch history (losses,
validation metrics, per-task weights) for plotting; the report is rewritten after every run, so an
interrupted comparison keeps what it finished.

    python scripts/compare_mtl.py                                   # 4 archs x 2 weightings x 3 seeds
    python scripts/compare_mtl.py --archs mmoe ple --weightings static mgda pcgrad --seeds 0
    python scripts/compare_mtl.py --set train.epochs=3 --set model.mmoe.gate_dropout=0.0
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import ARCHS, WEIGHTINGS, Config, apply_overrides, load_config  # noqa: E402
from model.data import load_dataset  # noqa: E402
from model.train import fit  # noqa: E402
from scripts.experiments import compare_table, plot_compare, write_section  # noqa: E402


def binary_heads(cfg: Config) -> list[str]:
    """The heads compared here: the config's binary tasks (test AUC)."""
    return [t.name for t in cfg.tasks if t.kind == "binary"]


def run_one(base: Config, ds: Any, arch: str, weighting: str, seed: int) -> dict[str, Any]:
    cfg = apply_overrides(base, [f"model.arch={arch}", f"train.weighting={weighting}", f"train.seed={seed}"])
    t0 = time.perf_counter()
    res = fit(cfg, ds)
    m = res.metrics
    keep = {k: v for k, v in m.items() if k.startswith("test/") or k in ("best_epoch", "task_weights")}
    return {
        "arch": arch,
        "weighting": weighting,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": keep,
        "history": res.history,
    }


def summarise(
    runs: list[dict[str, Any]], heads: list[str]
) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    out: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}
    for r in runs:
        out.setdefault((r["arch"], r["weighting"]), {})
    for key in out:
        rs = [r for r in runs if (r["arch"], r["weighting"]) == key]
        for h in heads:
            v = np.array([r["metrics"][f"test/{h}/auc"] for r in rs])
            out[key][h] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))  # sample std
    return out


def markdown(runs: list[dict[str, Any]], heads: list[str]) -> str:
    lines = [
        "| arch | weighting | " + " | ".join(f"{h} test AUC" for h in heads) + " | seeds |",
        "|---|---|" + "---|" * len(heads) + "---|",
    ]
    for (arch, weighting), s in summarise(runs, heads).items():
        cells = " | ".join(f"{s[h][0]:.4f} ± {s[h][1]:.4f}" for h in heads)
        lines.append(f"| {arch} | {weighting} | {cells} | {s[heads[0]][2]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kuairand_mmoe.toml")
    ap.add_argument("--archs", nargs="+", default=["separate", "shared_bottom", "mmoe", "ple"], choices=ARCHS)
    ap.add_argument("--weightings", nargs="+", default=["static", "uncertainty"], choices=WEIGHTINGS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1 is fastest on shared CPUs)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=TOML value")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "reports" / "compare_mtl.json")
    a = ap.parse_args()

    base = load_config(a.config)
    base.train.num_threads = a.threads
    base = apply_overrides(base, a.overrides)
    heads = binary_heads(base)
    if not heads:
        raise SystemExit(f"{a.config}: no binary task to compare by test AUC")
    t0 = time.perf_counter()
    ds = load_dataset(base)
    print(
        f"data: train={len(ds.train)} valid={len(ds.valid)} test={len(ds.test)} "
        f"({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for seed in a.seeds:
        for arch in a.archs:
            for weighting in a.weightings:
                r = run_one(base, ds, arch, weighting, seed)
                runs.append(r)
                m = r["metrics"]
                print(
                    f"{arch:14s} {weighting:12s} seed={seed} "
                    + " ".join(f"{h} AUC {m[f'test/{h}/auc']:.4f}" for h in heads)
                    + f" best epoch {m['best_epoch']} "
                    f"weights {m['task_weights']} ({r['seconds']:.0f}s)",
                    flush=True,
                )
                report = {
                    "config": str(a.config),
                    "overrides": a.overrides,
                    "data": {"train": len(ds.train), "valid": len(ds.valid), "test": len(ds.test)},
                    "summary": [
                        {
                            "arch": k[0],
                            "weighting": k[1],
                            **{f"{h}_auc": {"mean": v[0], "std": v[1], "n": v[2]} for h, v in s.items()},
                        }
                        for k, s in summarise(runs, heads).items()
                    ],
                    "runs": runs,
                }
                a.out.write_text(json.dumps(report, indent=1))
    print()
    print(markdown(runs, heads))
    given = ", ".join(f"<code>{html.escape(str(o))}</code>" for o in a.overrides or [])
    body = (f"<p>settings over the config: {given}</p>" if given else "") + compare_table(report)
    title = "Architectures x task weighting"
    section = write_section(a.out.parent, "compare_mtl", title, body, lambda png: plot_compare(report, png))
    print(f"\nwrote {a.out} and {section} (mtrank report includes it)")


if __name__ == "__main__":
    main()
