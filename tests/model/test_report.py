import sys

import pytest
from modelkit import ROOT, tiny_config

from model.report import write_report
from model.train import train

sys.path.insert(0, str(ROOT))
from scripts.experiments import (  # the experiment scripts' sections, as they write them
    SINGLE_TASK,
    compare_table,
    plot_compare,
    plot_mmoe_synthetic,
    sharing_cost,
    sharing_cost_table,
    write_section,
)
from scripts.experiments import summarize_mmoe_benchmark as summarize


@pytest.mark.slow
def test_report_writes_html_and_figures(tmp_path):
    res = train(tiny_config(epochs=2), tmp_path)
    (tmp_path / "reports").mkdir(exist_ok=True)
    runs = [
        {
            "p": p,
            "seed": s,
            "arch": a,
            "train_mse": 0.01 * (s + 1) * (1.5 if p == 0 and a == "shared_bottom" else 1),
        }
        for s in range(3)
        for p in (1.0, 0.0)
        for a in ("shared_bottom", "mmoe")
    ]
    runs += [
        {"p": p, "seed": s, "arch": SINGLE_TASK, "train_mse": 0.01 * (s + 1)}
        for s in range(3)
        for p in (1.0, 0.0)
    ]
    for r in runs:
        r["test_mse"] = r["train_mse"]
    cost = {"train_mse": sharing_cost(runs)}
    synthetic = {"runs": runs, "summary": {"train_mse": summarize(runs)}, "sharing_cost": cost}
    compare = {
        "summary": [
            {"arch": "ple", "weighting": "uncertainty", "engagement_auc": {"mean": 0.7, "std": 0.01, "n": 3}}
        ]
    }
    reports = tmp_path / "reports"
    write_section(
        reports,
        "mmoe_synthetic",
        "Synthetic",
        sharing_cost_table(synthetic),
        lambda png: plot_mmoe_synthetic(synthetic, png),
    )
    body = "<p><code>train.weighting.gradnorm.reference=&quot;initial&quot;</code></p>" + compare_table(
        compare
    )
    write_section(reports, "compare_mtl", "Architectures", body, lambda png: plot_compare(compare, png))
    page = write_report(tmp_path)
    text = page.read_text()
    v = res.checkpoint.name
    for png in (
        f"history_{v}.png",
        f"gates_{v}.png",
        f"steps_{v}.png",
        "test_auc.png",
        "experiments/mmoe_synthetic.png",
        "experiments/compare_mtl.png",
    ):
        assert f'src="{png}"' in text
        assert (page.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert v in text and "mmoe" in text
    assert "<td>ple</td><td>uncertainty</td><td>0.7000 ± 0.0100 (n=3)</td>" in text
    # shared-bottom is 1.5x the single-task fits at p = 0 on every seed, 1x at p = 1
    assert (
        "Cost of sharing" in text
        and "<td>0.0</td><td>1.50 [1.50, 1.50]</td><td>1.00 [1.00, 1.00]</td>" in text
    )
    assert (
        "<code>train.weighting.gradnorm.reference=&quot;initial&quot;</code>" in text
    )  # what the runs changed
    # written elsewhere (--out), the page carries the sections' figures along
    other = write_report(tmp_path, tmp_path / "elsewhere")
    assert (other.parent / "experiments" / "compare_mtl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plot_survives_a_head_without_finite_auc(tmp_path):
    """A head whose AUC is undefined in every run (one class in the test split) is drawn empty,
    not a crash of the whole report."""
    nan = float("nan")
    data = {
        "summary": [
            {
                "arch": a,
                "weighting": "static",
                "engagement_auc": {"mean": 0.7, "std": 0.01, "n": 3},
                "satisfaction_auc": {"mean": nan, "std": nan, "n": 3},
            }
            for a in ("mmoe", "ple")
        ]
    }
    assert plot_compare(data, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_report_writes_the_page(artifacts_copy, tmp_path):
    from typer.testing import CliRunner

    from model import read_latest
    from service.cli import app

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["report", "--artifacts", str(artifacts_copy), "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out / "report.html"
    text = page.read_text()
    version = read_latest(artifacts_copy)
    assert "<h1>mtrank report</h1>" in text
    assert version in text and "1 model version(s)" in text
    pngs = [f"history_{version}.png", "test_auc.png"]
    for png in pngs:
        assert f'src="{png}"' in text
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (artifacts_copy / "reports").exists()  # --out is where it goes
