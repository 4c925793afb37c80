"""MMoE vs shared-bottom on the synthetic task-correlation benchmark (Ma et al. KDD 2018, 3.2).

For each task correlation p and seed: generate the data (model.synth; for a fixed seed only p
changes, so the target functions' shape is the same and only the angle between the tasks moves),
train both architectures with the same budget (no early stopping) and record the final training
MSE (what the paper plots) and the test MSE, each the mean over the two regression heads.

The paper's finding is a trend: shared-bottom degrades as p falls, MMoE barely does. How hard a
seed's sinusoidal target is varies far more between seeds than the effect of p, so the trend is
measured per seed, as a paired ratio against p = max(p) (model.synth.summarize_mmoe_benchmark:
geometric mean over seeds with a bootstrap interval), and the two architectures are compared on those ratios.

The paper's explanation is negative transfer in the shared bottom, growing as the tasks
decorrelate. ``--single-task`` measures it directly: it also fits the shared-bottom network on each
task alone (same seed, data and budget) and reports each architecture's two-task loss over that
baseline per p (model.synth.sharing_cost).

    python scripts/mmoe_synthetic.py --seeds 30 --jobs 2      # about 25 min on 2 cores
    python scripts/mmoe_synthetic.py --seeds 30 --single-task # twice that
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.experiments import (  # noqa: E402
    FAILED_RUN_FACTOR,
    MIN_SEEDS_FOR_VERDICT,
    MMOE_BENCHMARK_ARCHS,
    SINGLE_TASK,
    STEP_WINDOW,
    add_budget_losses,
    budget_keys,
    plot_mmoe_synthetic,
    sharing_cost,
    sharing_cost_table,
    summarize_mmoe_benchmark,
    window_means,
    write_section,
)

ARCHS = MMOE_BENCHMARK_ARCHS  # ("shared_bottom", "mmoe"), the summary's order
N_EXPERTS, TOWER_UNITS, DIM, TASKS = 8, 8, 100, 2


def arch_sizes(expert_units: int = 16) -> dict[str, dict[str, Any]]:
    """The paper's sizes, matched in parameters: 8 single-layer experts of ``expert_units`` units
    against one shared bottom of h units, towers of 8 on both, with h solving
    DIM*h + h*8*TASKS = DIM*units*8 + units*8*TASKS (units = 16 gives the paper's h = 113)."""
    per_expert_layer = DIM * expert_units * N_EXPERTS + expert_units * TOWER_UNITS * TASKS
    bottom = round(per_expert_layer / (DIM + TOWER_UNITS * TASKS))
    return {
        "shared_bottom": {"bottom_dims": [bottom]},  # [model.shared_bottom]
        "mmoe": {"n_experts": N_EXPERTS, "expert_dims": [expert_units]},  # [model.mmoe]
    }


def run_one(
    p: float, seed: int, arch: str, rows: int, epochs: int, alpha_std: float, expert_units: int = 16
) -> dict[str, Any]:
    """One training run in a fresh process (one torch thread): data for (p, seed), then fit.

    Losses are the mean of the two heads' MSE. ``arch = SINGLE_TASK`` fits the shared-bottom
    network on y1 alone and on y2 alone (same seed and budget) and averages the two the same way."""
    from model.config import apply_overrides, load_config
    from model.data import load_dataset
    from model.synth import make_mmoe_benchmark
    from model.train import fit

    with tempfile.TemporaryDirectory() as d:
        make_mmoe_benchmark(Path(d), correlation=p, n_rows=rows, seed=seed, alpha_std=alpha_std)
        cfg = load_config(ROOT / "configs" / "synth_mmoe_benchmark.toml")
        cfg.data.data_dir = d
        cfg.train.seed, cfg.train.epochs = seed, epochs
        # the same budget for every fit: no early stop, and the test MSE is the last epoch's too
        cfg.train.patience, cfg.train.restore_best, cfg.train.num_threads = epochs, False, 1
        cfg.train.log_every = 1  # every step's task losses, for the loss-vs-steps curves
        net = "shared_bottom" if arch == SINGLE_TASK else arch
        sizes = [f"model.{net}.{k}={v}" for k, v in arch_sizes(expert_units)[net].items()]
        cfg = apply_overrides(cfg, sizes)
        t0 = time.perf_counter()
        fits = []
        for tasks in [[t] for t in cfg.tasks] if arch == SINGLE_TASK else [cfg.tasks]:
            one = copy.deepcopy(cfg)
            one.tasks = tasks
            fits.append((fit(one, load_dataset(one)), [t.name for t in tasks]))
    # per fit: sums over its heads, per step / per epoch; then the mean over the two heads
    per_step = (
        np.sum([[sum(s[f"{n}/loss"] for n in names) for s in r.steps] for r, names in fits], axis=0) / 2
    )
    per_epoch = np.sum([[h["train/loss"] for h in r.history] for r, _ in fits], axis=0) / 2
    return {
        "p": p,
        "seed": seed,
        "arch": arch,
        "train_mse": float(per_epoch[-1]),
        "train_mse_by_task": {n: float(r.history[-1][f"train/{n}/loss"]) for r, names in fits for n in names},
        "test_mse": sum(float(r.metrics["test/loss"]) for r, _ in fits) / 2,
        "train_curve": [float(v) for v in per_epoch],  # per epoch
        "step_window": STEP_WINDOW,
        # per STEP_WINDOW steps, as the paper plots
        "step_curve": window_means(per_step.tolist(), STEP_WINDOW),
        "alpha_std": alpha_std,
        "expert_units": expert_units,
        "seconds": time.perf_counter() - t0,
    }


def run(
    correlations: list[float],
    seeds: int,
    rows: int,
    epochs: int,
    jobs: int,
    alpha_std: float,
    expert_units: int = 16,
    single_task: bool = False,
) -> list[dict[str, Any]]:
    archs = (*ARCHS, SINGLE_TASK) if single_task else ARCHS
    todo = [
        (p, s, a, rows, epochs, alpha_std, expert_units)
        for s in range(seeds)
        for p in correlations
        for a in archs
    ]
    out = []
    spawn = multiprocessing.get_context("spawn")  # no torch state forked into the workers
    with ProcessPoolExecutor(jobs, mp_context=spawn) if jobs > 1 else nullcontext() as pool:
        results = pool.map(run_one, *zip(*todo, strict=True)) if pool else (run_one(*t) for t in todo)
        for r in results:
            print(
                f"p={r['p']} seed={r['seed']} {r['arch']:14s} train MSE {r['train_mse']:.4f} "
                f"test MSE {r['test_mse']:.4f} ({r['seconds']:.0f}s)",
                flush=True,
            )
            out.append(r)
    return out


def print_summary(t: dict[str, Any]) -> None:
    top = t["correlations"][0]
    print(
        f"\n{t['key']} over {t['n_seeds']} seeds: mean ± s.e. (median); ratio = geometric mean of loss(p) / loss(p={top}) per seed, 95% CI"
    )
    print(
        "\n| task correlation p | shared-bottom | MMoE | shared-bottom ratio | MMoE ratio | SB ratio / MMoE ratio |"
    )
    print("|---|---|---|---|---|---|")
    for p in t["correlations"]:
        cells = []
        for arch in ARCHS:
            c = t["archs"][arch][str(p)]
            cells.append(f"{c['mean']:.4f} ± {c['sem']:.4f} ({c['median']:.4f})")
        for arch in ARCHS:
            r = t["archs"][arch][str(p)]["ratio_vs_top"]
            cells.append(
                "1"
                if r is None
                else f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}], worse on {r['frac_higher']:.0%}"
            )
        g = t["sb_over_mmoe_degradation"].get(str(p))
        cells.append("" if g is None else f"{g['ratio']:.2f} [{g['low']:.2f}, {g['high']:.2f}]")
        print(f"| {p} | " + " | ".join(cells) + " |")
    vs = t.get("mmoe_over_shared_bottom")  # absent in summaries written before it existed
    if vs:
        side = "; ".join(f"p={p}: {_ci(r)}, MMoE lower on {1 - r['frac_higher']:.0%}" for p, r in vs.items())
        print(f"\nMMoE / shared-bottom {t['key']}, per seed (geometric mean, 95% CI): {side}")
    stalled = ", ".join(f"{a} {v:.0%}" for a, v in t["stalled_share"].items())
    print(f"\nstalled runs (loss > {FAILED_RUN_FACTOR:g}x the best run on the same seed): {stalled}")
    verdict = t["trend_reproduced"]
    print(
        "\ntrend reproduced (shared-bottom's ratio and its excess over MMoE's both > 1 at 95%): "
        + (f"no verdict below {MIN_SEEDS_FOR_VERDICT} seeds" if verdict is None else str(verdict))
    )


def _ci(r: dict[str, float]) -> str:
    return f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def print_sharing_cost(t: dict[str, Any]) -> None:
    print(
        f"\ncost of sharing ({t['key']}, {t['n_seeds']} seeds): two-task loss / the shared-bottom net"
        " trained on each task alone, geometric mean over seeds, 95% CI"
    )
    print("\n| task correlation p | shared-bottom | MMoE |")
    print("|---|---|---|")
    for p in t["correlations"]:
        print(f"| {p} | " + " | ".join(_ci(t["vs_single_task"][a][str(p)]) for a in ARCHS) + " |")


def print_budgets(tables: list[dict[str, Any]]) -> None:
    """The trend at the lowest p for each training budget (and the test loss), in one table."""
    top, low = tables[0]["correlations"][0], tables[0]["correlations"][-1]
    print(
        f"\nloss(p={low}) / loss(p={top}) by budget: geometric mean of per-seed ratios, and ratio of"
        " the means (the paper's averaged curves), 95% CI"
    )
    print("\n| loss | shared-bottom | MMoE | SB / MMoE | SB, ratio of means | MMoE, ratio of means | trend |")
    print("|---|---|---|---|---|---|---|")
    for t in tables:
        sb, mm = (t["archs"][a][str(low)] for a in ARCHS)
        cells = [
            _ci(sb["ratio_vs_top"]),
            _ci(mm["ratio_vs_top"]),
            _ci(t["sb_over_mmoe_degradation"][str(low)]),
            _ci(sb["mean_ratio_vs_top"]),
            _ci(mm["mean_ratio_vs_top"]),
            str(t["trend_reproduced"]),
        ]
        print(f"| {t['key']} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--correlations", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--rows", type=int, default=70_000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument(
        "--alpha-std", type=float, default=1.0, help="std of the sines' frequencies (target difficulty)"
    )
    ap.add_argument(
        "--expert-units",
        type=int,
        default=16,
        help="expert width (paper: 16); the shared bottom is matched in parameters (16 -> 113 units)",
    )
    ap.add_argument(
        "--single-task",
        action="store_true",
        help="also fit the shared-bottom net on each task alone, to measure what sharing costs",
    )
    ap.add_argument("--jobs", type=int, default=2, help="parallel training processes (one thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "reports" / "mmoe_synthetic.json")
    ap.add_argument("--from-runs", type=Path, help="summarise an earlier --out's runs instead of training")
    a = ap.parse_args()
    if a.seeds < 2:
        ap.error("--seeds must be >= 2 (the trend is a paired statistic over seeds)")
    if a.expert_units < 1:
        ap.error("--expert-units must be >= 1")
    runs = (
        json.loads(a.from_runs.read_text())["runs"]
        if a.from_runs
        else run(
            sorted(set(a.correlations), reverse=True),
            a.seeds,
            a.rows,
            a.epochs,
            a.jobs,
            a.alpha_std,
            a.expert_units,
            a.single_task,
        )
    )
    budgets = [k for k in (1, 2, 5) if k < min(len(r["train_curve"]) for r in runs)]
    keys = [*budget_keys(budgets), "test_mse"]
    with_budgets = add_budget_losses(runs, budgets)
    summary = {k: summarize_mmoe_benchmark(with_budgets, k) for k in keys}
    for k in ("train_mse", "test_mse"):
        print_summary(summary[k])
    print_budgets([summary[k] for k in keys])
    payload: dict[str, Any] = {"runs": runs, "summary": summary}
    if any(r["arch"] == SINGLE_TASK for r in runs):
        payload["sharing_cost"] = {k: sharing_cost(runs, k) for k in ("train_mse", "test_mse")}
        for k in ("train_mse", "test_mse"):
            print_sharing_cost(payload["sharing_cost"][k])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=1))
    title = "Synthetic task-correlation benchmark"
    section = write_section(
        a.out.parent,
        "mmoe_synthetic",
        title,
        sharing_cost_table(payload),
        lambda png: plot_mmoe_synthetic(payload, png),
    )
    print(f"\nwrote {a.out} and {section} (mtrank report includes it)")


if __name__ == "__main__":
    main()
