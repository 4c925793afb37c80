"""``mtrank report``: PNG plots and one HTML page about the trained models.

Reads every checkpoint manifest under ``artifacts/models`` (training history, step log, test
metrics, expert utilisation, the fitted served combination and the heads' calibration), the saved
``mtrank replay`` reports (``artifacts/reports/replay-*.json``) and the sections experiment scripts
left in ``artifacts/reports/experiments/`` (HTML + PNG, included as they are), and writes
``artifacts/reports/report.html`` with its PNG figures.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from model.checkpoint import CheckpointError, list_versions, models_dir, read_manifest
from model.config import weighting_name
from model.promotion import data_set_name, head_metric_keys

log = logging.getLogger(__name__)

EXPERIMENTS_DIR = "experiments"  # under reports/: HTML sections (and figures) the experiment scripts write


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
    weighting = weighting_name(cfg.get("train", {}))
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


def html_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


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
                weighting_name(cfg.get("train", {})),
                data_set_name(cfg, m.get("data_fingerprint") or {}),
            ]
            + [_fmt(mt.get(key)) for key in heads.values()]
            + [_fmt(mt.get("test/ndcg@10")), mt.get("best_epoch", "-")]
        )
    labels = [f"{h.split('/')[0]} {h.split('/')[1].upper()}" for h in heads]
    return html_table(rows, ["version", "arch", "weighting", "data set", *labels, "NDCG@10", "best epoch"])


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
    return html_table(rows, header) if rows else ""


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
        parts.append(html_table(rows, header))
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

    sections = out / EXPERIMENTS_DIR
    experiments = artifacts / "reports" / EXPERIMENTS_DIR
    for section in sorted(experiments.glob("*.html")) if experiments.is_dir() else []:
        parts.append(section.read_text())  # written by the experiment scripts (scripts/experiments.py)
        figure = section.with_suffix(".png")
        if figure.is_file() and sections != experiments:
            sections.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(figure, sections / figure.name)

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
