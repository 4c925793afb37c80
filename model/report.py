"""``mtrank report``: PNG plots and one HTML page about the trained models.

Reads every checkpoint manifest under ``artifacts/models`` (training history, step log, test
metrics, expert utilisation, the fitted served combination and the heads' calibration), the saved
``mtrank replay`` reports (``artifacts/reports/replay-*.json``) and, when present, the experiment
results under ``artifacts/reports`` (``compare_mtl.json`` from scripts/compare_mtl.py,
``mmoe_synthetic.json`` from scripts/mmoe_synthetic.py), and writes ``artifacts/reports/report.html``
with its PNG figures.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from model.checkpoint import CheckpointError, list_versions, models_dir, read_manifest
from model.promotion import data_set_name, head_metric_keys

log = logging.getLogger(__name__)


def load_manifests(artifacts: Path) -> list[dict[str, Any]]:
    out = []
    for v in list_versions(artifacts):
        try:
            out.append(read_manifest(models_dir(artifacts) / v))
        except CheckpointError as e:
            log.warning("skipping %s: %s", v, e)
    return out


def _label(m: Mapping[str, Any]) -> str:
    cfg = m["config"]
    weighting = cfg.get("train", {}).get("weighting", "static")
    return f"{m['version']} ({cfg['model']['arch']}, {weighting})"


def plot_history(m: Mapping[str, Any], path: Path) -> bool:
    """Loss and per-task validation AUC per epoch."""
    hist: Sequence[Mapping[str, float]] = m.get("history") or []
    if not hist:
        return False
    epochs = [h["epoch"] for h in hist]
    tasks = [t["name"] for t in m["config"]["tasks"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, style in (("train/loss", "-"), ("valid/loss", "--")):
        if key in hist[0]:
            axes[0].plot(epochs, [h[key] for h in hist], style, marker="o", label=key)
    axes[0].set(title="weighted loss", xlabel="epoch")
    axes[0].legend()
    for t in tasks:
        for metric in ("auc", "rmse"):
            key = f"valid/{t}/{metric}"
            if key in hist[0]:
                axes[1].plot(epochs, [h[key] for h in hist], marker="o", label=key)
    axes[1].set(title="validation metric per task", xlabel="epoch")
    axes[1].legend(fontsize=8)
    best = m.get("metrics", {}).get("best_epoch")
    if best:
        for ax in axes:
            ax.axvline(best, color="grey", lw=0.8, ls=":")
    fig.suptitle(_label(m), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_steps(m: Mapping[str, Any], path: Path) -> bool:
    """The step log: task losses and task weights every ``train.log_every`` steps."""
    log_: Sequence[Mapping[str, float]] = m.get("step_log") or []
    if not log_:
        return False
    steps = [r["step"] for r in log_]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for kind, ax in (("loss", axes[0]), ("weight", axes[1])):
        keys = [k for k in log_[0] if (k.endswith("/loss") if kind == "loss" else k.startswith("weight/"))]
        for k in keys:
            ax.plot(steps, [r.get(k, np.nan) for r in log_], lw=1, label=k)
        ax.set(title=f"task {kind} per step", xlabel="step")
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_gates(m: Mapping[str, Any], path: Path) -> bool:
    """Heatmap of the mean gate probability per task (rows) and expert (columns)."""
    util: Mapping[str, Sequence[float]] | None = m.get("metrics", {}).get("expert_utilization")
    if not util:
        return False
    tasks = list(util)
    mat = np.array([util[t] for t in tasks])  # (T, E)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * mat.shape[1], 0.9 + 0.6 * len(tasks)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(mat.shape[1]), [f"e{i}" for i in range(mat.shape[1])])
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(f"gate utilisation {m['version']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_test_metrics(manifests: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Test AUC per head for every version, grouped by architecture + weighting."""
    rows = [m for m in manifests if any(k.endswith("/auc") for k in m.get("metrics", {}))]
    if not rows:
        return False
    tasks = sorted(
        {k.split("/")[1] for m in rows for k in m["metrics"] if k.startswith("test/") and k.endswith("/auc")}
    )
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(rows)), 3.6))
    width = 0.8 / max(len(tasks), 1)
    x = np.arange(len(rows))
    for i, t in enumerate(tasks):
        vals = [m["metrics"].get(f"test/{t}/auc", np.nan) for m in rows]
        ax.bar(x + i * width, vals, width, label=t)
    ax.set_xticks(
        x + width * (len(tasks) - 1) / 2, [_label(m).split(" ", 1)[1] for m in rows], rotation=30, fontsize=7
    )
    lo = np.nanmin([m["metrics"].get(f"test/{t}/auc", np.nan) for m in rows for t in tasks])
    ax.set_ylim(max(0.0, lo - 0.05), None)
    ax.set(title="test AUC per head", ylabel="AUC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


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


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def compare_table(data: Any) -> str:
    """scripts/compare_mtl.py results: ``summary`` rows of arch, weighting, ``<head>_auc`` mean/std/n."""
    rows = data.get("summary", []) if isinstance(data, dict) else []
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "mean" in v})
    out = [
        [r.get("arch"), r.get("weighting")]
        + [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f} (n={r[k]['n']})" if k in r else "-" for k in keys]
        for r in rows
    ]
    return _table(out, ["arch", "weighting", *keys]) if out else ""


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
    return note + _table(rows, ["task correlation p", *by_arch])


def models_table(manifests: Sequence[Mapping[str, Any]]) -> str:
    """One row per version: its data set and objective, each head's primary test metric (AUC for
    binary heads, RMSE for regression ones; the heads are the manifests' own), NDCG@10, best epoch."""
    heads: dict[str, str] = {}  # "<head>/<metric>" -> test metric key, over every manifest
    for m in manifests:
        heads.update(head_metric_keys(m["config"].get("tasks", [])))
    rows = []
    for m in manifests:
        mt, cfg = m.get("metrics", {}), m["config"]
        rows.append(
            [
                m["version"],
                cfg["model"]["arch"],
                cfg.get("train", {}).get("weighting", "static"),
                data_set_name(cfg, m.get("data_fingerprint") or {}),
            ]
            + [_fmt(mt.get(key)) for key in heads.values()]
            + [_fmt(mt.get("test/ndcg@10")), mt.get("best_epoch", "-")]
        )
    labels = [f"{h.split('/')[0]} {h.split('/')[1].upper()}" for h in heads]
    return _table(rows, ["version", "arch", "weighting", "data set", *labels, "NDCG@10", "best epoch"])


def ranking_table(manifests: Sequence[Mapping[str, Any]]) -> str:
    """One row per version with a fitted combination (``model.combination``): the combination, its
    validation NDCG@k against every weight 1, and each binary head's validation ECE (and whether a
    Platt scaling was applied)."""
    rows = []
    for m in manifests:
        r = m.get("ranking")
        if not isinstance(r, dict) or not isinstance(r.get("combination"), dict):
            continue
        c, v, k = r["combination"], r.get("validation") or {}, (r.get("objective") or {}).get("k", 10)
        weights = ", ".join(f"{h} {w:.3g}" for h, w in c.get("weights", {}).items())
        cal = []
        for head, e in (r.get("calibration") or {}).items():
            if isinstance(e, dict) and isinstance(e.get("served"), dict):
                mark = " (Platt applied)" if e.get("applied") else ""
                cal.append(f"{head} {e['served'].get('ece', float('nan')):.4f}{mark}")
        rows.append(
            [
                m["version"],
                m["config"]["model"]["arch"],
                f"{c.get('method')}: {weights}",
                _fmt(v.get(f"ndcg@{k}")),
                _fmt(v.get(f"default_ndcg@{k}")),
                v.get("lists", "-"),
                "; ".join(cal) or "-",
            ]
        )
    header = ["version", "arch", "served combination", "valid NDCG", "every weight 1", "lists", "valid ECE"]
    return _table(rows, header) if rows else ""


def plot_reliability(m: Mapping[str, Any], path: Path) -> bool:
    """Reliability curves of the binary heads on the validation split (as trained)."""
    cal = (m.get("ranking") or {}).get("calibration") or {}
    curves = {
        h: e["served"]["reliability"]
        for h, e in cal.items()
        if isinstance(e, dict) and isinstance(e.get("served"), dict) and e["served"].get("reliability")
    }
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.6), squeeze=False)
    for ax, (head, curve) in zip(axes[0], curves.items(), strict=True):
        x = [b["mean_prediction"] for b in curve]
        y = [b["positive_rate"] for b in curve]
        top = max(max(x), max(y)) * 1.05
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
        ax.plot(x, y, marker="o", label="as trained")
        title = f"{head}: ECE {cal[head]['served']['ece']:.4f}"
        after = (cal[head].get("applied") or {}).get("calibrated") or {}
        if after.get("reliability"):
            xs = [b["mean_prediction"] for b in after["reliability"]]
            ys = [b["positive_rate"] for b in after["reliability"]]
            ax.plot(xs, ys, marker=".", label="Platt-scaled (fitted on these rows)")
            ax.legend(fontsize=7)
            title += f" -> {after['ece']:.4f}"
        ax.set(title=title, xlabel="mean prediction", ylabel="rate")
    fig.suptitle(f"{_label(m)}: reliability on the validation split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def replay_section(artifacts: Path) -> list[str]:
    """The saved ``mtrank replay`` reports (``reports/replay-*.json``): one table each."""
    from model.replay import table_header, table_rows

    parts = []
    for p in sorted((artifacts / "reports").glob("replay-*.json")):
        try:
            rep = json.loads(p.read_text())
            rows, header = table_rows(rep), table_header(rep)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping %s: %s", p, e)
            continue
        c, obj = rep.get("counts", {}), rep.get("objective", {})
        gain = " + ".join(f"{w:g}·{col}" for col, w in obj.get("gain", {}).items())
        served = rep.get("served") or {}
        par = rep.get("parity")
        parts.append(
            f"<h3>{html.escape(str(rep.get('version')))} ({html.escape(str(rep.get('arch')))}), "
            f"{html.escape(str(rep.get('split')))} split</h3>"
            f"<p>{c.get('lists')} lists ({html.escape(' x '.join(obj.get('group_by', [])))}), "
            f"{c.get('rows')} rows; "
            f"gain {html.escape(gain)}; via {html.escape(str(rep.get('via')))}; served "
            f"{html.escape(str(served.get('combine')))} of {html.escape(str(served.get('weights')))} "
            f"({html.escape(str(served.get('weights_from')))})"
            + (f"; parity max |served - offline| {html.escape(str(par.get('max_abs_diff')))}" if par else "")
            + "</p>"
        )
        parts.append(_table(rows, header))
    return parts


def write_report(artifacts: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write all figures and ``report.html``; returns the HTML path."""
    artifacts = Path(artifacts)
    out = Path(out_dir) if out_dir else artifacts / "reports"
    out.mkdir(parents=True, exist_ok=True)
    manifests = load_manifests(artifacts)
    parts = [
        "<h1>mtrank report</h1>",
        f"<p>{len(manifests)} model version(s) under {html.escape(str(artifacts))}</p>",
    ]

    parts += ["<h2>Models</h2>", models_table(manifests)]
    if plot_test_metrics(manifests, out / "test_auc.png"):
        parts.append('<img src="test_auc.png">')
    if ranking := ranking_table(manifests):
        parts += ["<h2>Served combination and calibration (validation split)</h2>", ranking]
        for m in manifests:
            if plot_reliability(m, out / f"reliability_{m['version']}.png"):
                parts.append(f'<img src="reliability_{m["version"]}.png">')
    if replay := replay_section(artifacts):
        parts += ["<h2>Served order replayed (mtrank replay)</h2>", *replay]

    for name, title, plot in (
        ("compare_mtl.json", "Architectures x task weighting (KuaiRand-Pure)", None),
        ("mmoe_synthetic.json", "Synthetic task-correlation benchmark", plot_mmoe_synthetic),
    ):
        p = artifacts / "reports" / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            log.warning("skipping %s: %s", p, e)
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if plot is None:
            if isinstance(data, dict) and data.get("overrides"):
                given = ", ".join(f"<code>{html.escape(str(o))}</code>" for o in data["overrides"])
                parts.append(f"<p>settings over the config: {given}</p>")
            parts.append(compare_table(data))
            if plot_compare(data, out / "compare_mtl.png"):
                parts.append('<img src="compare_mtl.png">')
        else:
            if plot(data, out / (p.stem + ".png")):
                parts.append(f'<img src="{p.stem}.png">')
            parts.append(sharing_cost_table(data))

    parts.append("<h2>Training curves and gate utilisation</h2>")
    for m in manifests:
        v = m["version"]
        if plot_history(m, out / f"history_{v}.png"):
            parts.append(f'<h3>{html.escape(_label(m))}</h3><img src="history_{v}.png">')
        if plot_steps(m, out / f"steps_{v}.png"):
            parts.append(f'<img src="steps_{v}.png">')
        if plot_gates(m, out / f"gates_{v}.png"):
            parts.append(f'<img src="gates_{v}.png">')
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mtrank report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    log.info("wrote %s", path)
    return path
