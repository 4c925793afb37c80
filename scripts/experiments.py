"""What the experiment scripts share (scripts/mmoe_synthetic.py, scripts/compare_mtl.py): paired
statistics over seeds, the synthetic MMoE benchmark's summaries, and their figures and tables.

The library trains and evaluates; measuring an architecture against another over seeds is an
experiment, and lives here. Each script writes its JSON and, with ``write_section``, an HTML section
and its figure under ``experiments/`` beside its JSON (``artifacts/reports/``), which ``mtrank report`` includes as they are.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import bootstrap

from model.report import EXPERIMENTS_DIR, html_table


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# -- paired statistics over seeds ---------------------------------------------------------------


@dataclass(frozen=True)
class PairedRatio:
    """How much larger ``after`` is than ``before`` over paired runs (same seed, one factor changed).

    ``ratio`` is the geometric mean of after/before, ``low``..``high`` its bootstrap confidence
    interval, ``frac_higher`` the share of pairs with after > before.
    """

    ratio: float
    low: float
    high: float
    frac_higher: float
    n: int


def _paired_positive(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or len(b) < 2:
        raise ValueError(f"need two 1-D arrays of the same length >= 2, got {b.shape} and {a.shape}")
    if (b <= 0).any() or (a <= 0).any() or not np.isfinite(np.r_[a, b]).all():
        raise ValueError("paired ratios need finite positive values")
    return b, a


def paired_ratio(
    before: np.ndarray, after: np.ndarray, *, confidence: float = 0.95, seed: int = 0
) -> PairedRatio:
    """Geometric-mean ratio of paired positive values (e.g. losses) with a BCa bootstrap interval.

    A log-ratio per pair removes what the two runs of a pair share (here the seed's target
    function, which sets how hard both are), so a small effect shows under large run-to-run spread.
    """
    b, a = _paired_positive(before, after)
    logr = np.log(a / b)
    if np.ptp(logr) < 1e-12:  # no spread: the bootstrap interval degenerates to the point
        lo = hi = float(logr[0])
    else:
        ci = bootstrap(
            (logr,), np.mean, confidence_level=confidence, method="BCa", random_state=seed
        ).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return PairedRatio(
        float(np.exp(logr.mean())), float(np.exp(lo)), float(np.exp(hi)), float((logr > 0).mean()), len(logr)
    )


def paired_mean_ratio(
    before: np.ndarray, after: np.ndarray, *, confidence: float = 0.95, seed: int = 0
) -> PairedRatio:
    """mean(after) / mean(before) over paired positive values, with a paired BCa bootstrap interval.

    The ratio of two averaged curves, as papers plot them (e.g. Ma et al. 2018 average 200 runs per
    curve). Unlike paired_ratio it is dominated by the worst runs, so a few failed runs move it.
    """
    b, a = _paired_positive(before, after)

    def stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(y.mean(axis=axis) / x.mean(axis=axis))

    if np.ptp(a / b) < 1e-12:  # every pair has the same ratio: so has every resample
        lo = hi = float(a[0] / b[0])
    else:
        ci = bootstrap(
            (b, a),
            stat,
            paired=True,
            vectorized=True,
            confidence_level=confidence,
            method="BCa",
            random_state=seed,
        ).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return PairedRatio(float(a.mean() / b.mean()), lo, hi, float((a > b).mean()), len(a))


# -- the synthetic MMoE benchmark (Ma et al. KDD 2018, section 3.2) -----------------------------

MIN_SEEDS_FOR_VERDICT = 10
FAILED_RUN_FACTOR = 2.0
MMOE_BENCHMARK_ARCHS = ("shared_bottom", "mmoe")
SINGLE_TASK = "single_task"  # the shared-bottom network trained on each task alone (a baseline)
STEP_WINDOW = 50  # training steps averaged into one point of a loss-vs-steps curve


def window_means(values: Sequence[float], window: int) -> list[float]:
    """Means of consecutive ``window``-long stretches of ``values`` (the last may be shorter)."""
    _require(window >= 1, f"window must be >= 1, got {window}")
    v = np.asarray(values, dtype=np.float64)
    return [float(v[i : i + window].mean()) for i in range(0, len(v), window)]


def add_budget_losses(
    runs: Sequence[Mapping[str, Any]], epochs: Sequence[int] = (1, 2, 5)
) -> list[dict[str, Any]]:
    """Copies of ``runs`` with the training loss at shorter budgets, read off each run's per-epoch
    ``train_curve``: ``train_mse@ep{k}`` for each k in ``epochs`` (the mean loss over epoch k) and
    ``train_mse_curve_mean`` (the mean over all epochs: the area under the training curve, where the
    paper's loss-vs-steps figures show their gaps). Each is summarised like ``train_mse``."""
    need, out = max(epochs, default=1), []
    for r in runs:
        curve = [float(v) for v in r["train_curve"]]
        _require(len(curve) >= need, f"a run has {len(curve)} epochs, budgets ask for {need}")
        out.append(
            {
                **r,
                **{f"train_mse@ep{k}": curve[k - 1] for k in epochs},
                "train_mse_curve_mean": float(np.mean(curve)),
            }
        )
    return out


def budget_keys(epochs: Sequence[int] = (1, 2, 5)) -> list[str]:
    """The keys add_budget_losses adds, shortest budget first, then the final loss."""
    return [f"train_mse@ep{k}" for k in epochs] + ["train_mse_curve_mean", "train_mse"]


def summarize_mmoe_benchmark(runs: Sequence[Mapping[str, Any]], key: str = "train_mse") -> dict[str, Any]:
    """Summarise runs of scripts/mmoe_synthetic.py (dicts with p, seed, arch and ``key``).

    Per arch and p: mean, standard error and median of ``key``, and the paired ratio
    (paired_ratio) of each p against the highest p over seeds, also as a ratio of
    the means (paired_mean_ratio: the paper's averaged curves). Per p: the ratio of
    shared-bottom's ratio to MMoE's (> 1: shared-bottom degrades more), and MMoE's loss over
    shared-bottom's on the same seed (``mmoe_over_shared_bottom``). Per arch: the share of
    stalled runs (loss over FAILED_RUN_FACTOR x the seed's best). ``trend_reproduced``, the
    paper's finding at the lowest p: shared-bottom's ratio and its excess over MMoE's both above 1
    at 95%; None below MIN_SEEDS_FOR_VERDICT seeds.
    """
    ps = sorted({float(r["p"]) for r in runs}, reverse=True)
    seeds = sorted({int(r["seed"]) for r in runs})
    val = {(r["arch"], float(r["p"]), int(r["seed"])): float(r[key]) for r in runs}
    _require(len(ps) >= 2, f"need runs at two or more correlations, got {ps}")
    missing = [k for k in product(MMOE_BENCHMARK_ARCHS, ps, seeds) if k not in val]
    _require(not missing, f"incomplete grid of runs, missing (arch, p, seed) {missing[:3]}")
    table: dict[str, Any] = {"key": key, "correlations": ps, "n_seeds": len(seeds), "archs": {}}
    for arch in MMOE_BENCHMARK_ARCHS:
        rows = {}
        for p in ps:
            v = np.array([val[(arch, p, s)] for s in seeds])
            top = np.array([val[(arch, ps[0], s)] for s in seeds])
            first = p == ps[0]
            rows[str(p)] = {
                "mean": float(v.mean()),
                "sem": float(v.std(ddof=1) / np.sqrt(len(v))),
                "median": float(np.median(v)),
                "ratio_vs_top": None if first else asdict(paired_ratio(top, v)),
                "mean_ratio_vs_top": None if first else asdict(paired_mean_ratio(top, v)),
            }
        table["archs"][arch] = rows
    # trainability (the paper's 3.5): a run "stalls" when its loss is over FAILED_RUN_FACTOR x the
    # best loss any run reached on the same seed (same target function at every p)
    best = {s: min(val[(a, p, s)] for a in MMOE_BENCHMARK_ARCHS for p in ps) for s in seeds}
    table["stalled_share"] = {
        arch: float(np.mean([val[(arch, p, s)] > FAILED_RUN_FACTOR * best[s] for p in ps for s in seeds]))
        for arch in MMOE_BENCHMARK_ARCHS
    }
    gap = {}
    for p in ps[1:]:
        sb = np.array([val[("shared_bottom", p, s)] / val[("shared_bottom", ps[0], s)] for s in seeds])
        mm = np.array([val[("mmoe", p, s)] / val[("mmoe", ps[0], s)] for s in seeds])
        gap[str(p)] = asdict(paired_ratio(mm, sb))  # > 1: shared-bottom degrades more than MMoE
    table["sb_over_mmoe_degradation"] = gap
    # the architectures side by side: MMoE's loss / shared-bottom's per seed (< 1: MMoE fits better)
    table["mmoe_over_shared_bottom"] = {
        str(p): asdict(
            paired_ratio(
                np.array([val[("shared_bottom", p, s)] for s in seeds]),
                np.array([val[("mmoe", p, s)] for s in seeds]),
            )
        )
        for p in ps
    }
    low = str(ps[-1])
    sb_low = table["archs"]["shared_bottom"][low]["ratio_vs_top"]["low"]
    table["trend_reproduced"] = (
        None  # a bootstrap over a handful of seeds says nothing
        if len(seeds) < MIN_SEEDS_FOR_VERDICT
        else bool(sb_low > 1.0 and gap[low]["low"] > 1.0)
    )
    return table


def sharing_cost(runs: Sequence[Mapping[str, Any]], key: str = "train_mse") -> dict[str, Any]:
    """What training two tasks together costs, per p: for each of MMOE_BENCHMARK_ARCHS the paired
    ratio (paired_ratio over seeds) of its two-task loss to the ``SINGLE_TASK`` runs'
    (the shared-bottom network trained on each task alone, the mean of the two). Negative transfer,
    the paper's premise, is shared-bottom's ratio rising as p falls; below 1 sharing helps."""
    ps = sorted({float(r["p"]) for r in runs if r["arch"] == SINGLE_TASK}, reverse=True)
    _require(bool(ps), f"no {SINGLE_TASK} runs to compare with")
    val = {(r["arch"], float(r["p"]), int(r["seed"])): float(r[key]) for r in runs}
    seeds = sorted({int(r["seed"]) for r in runs if r["arch"] == SINGLE_TASK})
    _require(len(seeds) >= 2, f"need two or more seeds, got {seeds}")
    missing = [k for k in product((*MMOE_BENCHMARK_ARCHS, SINGLE_TASK), ps, seeds) if k not in val]
    _require(not missing, f"incomplete grid of runs, missing (arch, p, seed) {missing[:3]}")
    out: dict[str, Any] = {"key": key, "correlations": ps, "n_seeds": len(seeds), "vs_single_task": {}}
    for arch in MMOE_BENCHMARK_ARCHS:
        out["vs_single_task"][arch] = {
            str(p): asdict(
                paired_ratio(
                    np.array([val[(SINGLE_TASK, p, s)] for s in seeds]),
                    np.array([val[(arch, p, s)] for s in seeds]),
                )
            )
            for p in ps
        }
    return out


# -- figures and tables -------------------------------------------------------------------------


def plot_mmoe_synthetic(data: Mapping[str, Any], path: Path) -> bool:
    """scripts/mmoe_synthetic.py results: final training MSE against task correlation (mean ±
    standard error over seeds) and, per seed, the loss ratio against the highest correlation
    (geometric mean with its bootstrap interval): the paper's trend is the right-hand panel. When
    the runs carry per-step curves, a second row plots the training loss against steps averaged
    over seeds, one line per correlation, as the paper's figures do."""
    summary = data.get("summary", {}).get("train_mse") if isinstance(data, Mapping) else None
    if not isinstance(summary, Mapping) or not summary.get("archs"):
        return False
    ps = [float(p) for p in summary["correlations"]]
    runs = [r for r in data.get("runs", []) if isinstance(r, Mapping) and r.get("step_curve")]
    fig, axes = plt.subplots(2 if runs else 1, 2, figsize=(9, 6.8 if runs else 3.4), squeeze=False)
    ax, ax_r = axes[0]
    for i, (arch, rows) in enumerate(summary["archs"].items()):
        cells = [rows[str(p)] for p in ps]
        ax.errorbar(
            ps, [c["mean"] for c in cells], yerr=[c["sem"] for c in cells], marker="o", capsize=3, label=arch
        )
        ratios = [c["ratio_vs_top"] or {"ratio": 1.0, "low": 1.0, "high": 1.0} for c in cells]
        mid = np.array([r["ratio"] for r in ratios])
        err = np.array([mid - [r["low"] for r in ratios], [r["high"] for r in ratios] - mid])
        ax_r.errorbar(np.array(ps) + 0.02 * (i - 0.5), mid, yerr=err, marker="o", capsize=3, label=arch)
        if runs:
            _plot_step_curves(axes[1][i], arch, [r for r in runs if r.get("arch") == arch], ps)
    ax_r.axhline(1.0, color="grey", lw=0.8, ls="--")
    for a in (ax, ax_r):
        a.invert_xaxis()
        a.legend()
    ax.set(
        title=f"synthetic benchmark, {summary['n_seeds']} seeds",
        xlabel="task correlation",
        ylabel="train MSE",
    )
    ax_r.set(title=f"per-seed loss / loss at p={ps[0]:g} (95% CI)", xlabel="task correlation", ylabel="ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_step_curves(ax: Any, arch: str, runs: Sequence[Mapping[str, Any]], ps: Sequence[float]) -> None:
    """Training loss against steps for one arch, averaged over seeds, one line per correlation."""
    for p in ps:
        curves = [np.asarray(r["step_curve"], dtype=float) for r in runs if float(r["p"]) == p]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        window = int(runs[0].get("step_window", 1))
        ax.plot(np.arange(1, n + 1) * window, np.mean([c[:n] for c in curves], axis=0), label=f"p={p:g}")
    ax.set_yscale("log")
    ax.set(title=f"{arch}: mean over {len(runs) // max(1, len(ps))} seeds", xlabel="step", ylabel="train MSE")
    ax.legend()


def plot_compare(data: Mapping[str, Any], path: Path) -> bool:
    """scripts/compare_mtl.py summary: test AUC per head, mean ± std, one bar group per arch+weighting."""
    rows = [r for r in data.get("summary", []) if isinstance(r, dict)]
    heads = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "mean" in v})
    if not rows or not heads:
        return False
    fig, axes = plt.subplots(1, len(heads), figsize=(4.5 * len(heads), 3.6), squeeze=False)
    labels = [f"{r.get('arch')}\n{r.get('weighting')}" for r in rows]
    for ax, h in zip(axes[0], heads, strict=True):
        mean = np.array([r[h]["mean"] if h in r else np.nan for r in rows])
        std = np.array([r[h]["std"] if h in r else 0.0 for r in rows])
        ax.bar(range(len(rows)), mean, yerr=std, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        if np.isfinite(mean).any():  # a head with no finite AUC (e.g. one class in test) keeps auto limits
            ax.set_ylim(max(0.0, np.nanmin(mean - std) - 0.01), np.nanmax(mean + std) + 0.005)
        ax.set_title(f"test {h.replace('_', ' ')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def compare_table(data: Any) -> str:
    """scripts/compare_mtl.py results: ``summary`` rows of arch, weighting, ``<head>_auc`` mean/std/n."""
    rows = data.get("summary", []) if isinstance(data, dict) else []
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "mean" in v})
    out = [
        [r.get("arch"), r.get("weighting")]
        + [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f} (n={r[k]['n']})" if k in r else "-" for k in keys]
        for r in rows
    ]
    return html_table(out, ["arch", "weighting", *keys]) if out else ""


def sharing_cost_table(data: Any) -> str:
    """scripts/mmoe_synthetic.py --single-task: two-task loss / single-task loss per arch and p."""
    t = data.get("sharing_cost", {}).get("train_mse") if isinstance(data, dict) else None
    if not isinstance(t, dict) or not t.get("vs_single_task"):
        return ""
    by_arch: dict[str, Any] = t["vs_single_task"]

    def cell(c: Mapping[str, float]) -> str:
        return f"{c['ratio']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"

    rows = [[p, *(cell(by_arch[a][str(p)]) for a in by_arch)] for p in t["correlations"]]
    note = (
        f"<p>Cost of sharing, final training MSE over {t['n_seeds']} seeds: each architecture's two-task"
        " loss over the shared-bottom network fitted on each task alone (geometric mean, 95% CI)</p>"
    )
    return note + html_table(rows, ["task correlation p", *by_arch])


def write_section(
    reports: Path, name: str, title: str, body: str, plot: Callable[[Path], bool] | None = None
) -> Path:
    """``<reports>/experiments/<name>.html``: a section ``mtrank report`` includes as it is, with the
    figure ``plot`` draws into ``<name>.png`` beside it (when it draws one)."""
    folder = Path(reports) / EXPERIMENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    drawn = plot is not None and plot(folder / f"{name}.png")
    img = f'<img src="{EXPERIMENTS_DIR}/{name}.png">' if drawn else ""
    path = folder / f"{name}.html"
    path.write_text(f"<h2>{html.escape(title)}</h2>{body}{img}")
    return path
