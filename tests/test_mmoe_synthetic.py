"""scripts/mmoe_synthetic.py: the paired trend statistics on constructed runs, and one tiny real run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.experiments import (  # noqa: E402
    MIN_SEEDS_FOR_VERDICT,
    SINGLE_TASK,
    add_budget_losses,
    budget_keys,
    plot_mmoe_synthetic,
    sharing_cost,
    summarize_mmoe_benchmark,
    window_means,
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mmoe_synthetic", ROOT / "scripts" / "mmoe_synthetic.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(sb_factor: float, mmoe_factor: float, seeds: int = 20) -> list[dict]:
    """Losses whose level varies 10x between seeds (the target function), times a factor at p = 0
    and a little per-run noise: what the benchmark's runs look like."""
    rng = np.random.default_rng(0)
    runs = []
    for s in range(seeds):
        level = rng.lognormal(-3.5, 1.0)
        for p, arch, f in [
            (1.0, "shared_bottom", 1.0),
            (1.0, "mmoe", 1.0),
            (0.0, "shared_bottom", sb_factor),
            (0.0, "mmoe", mmoe_factor),
        ]:
            loss = level * f * np.exp(rng.normal(0, 0.1))
            runs.append({"p": p, "seed": s, "arch": arch, "train_mse": loss, "test_mse": loss * 1.1})
    return runs


def test_summary_finds_the_papers_trend():
    t = summarize_mmoe_benchmark(_runs(sb_factor=1.4, mmoe_factor=1.0))
    sb = t["archs"]["shared_bottom"]["0.0"]["ratio_vs_top"]
    mm = t["archs"]["mmoe"]["0.0"]["ratio_vs_top"]
    assert 1.25 < sb["ratio"] < 1.55 and sb["low"] > 1.0
    assert mm["low"] < 1.0 < mm["high"]
    assert t["sb_over_mmoe_degradation"]["0.0"]["low"] > 1.0
    assert t["trend_reproduced"] is True
    assert t["stalled_share"] == {"shared_bottom": 0.0, "mmoe": 0.0}  # 1.4x is not a stall
    side = t["mmoe_over_shared_bottom"]  # MMoE / shared-bottom per seed: equal at p = 1, 1/1.4 at p = 0
    assert side["1.0"]["low"] < 1.0 < side["1.0"]["high"]
    assert side["0.0"]["ratio"] == pytest.approx(1 / 1.4, rel=0.1) and side["0.0"]["high"] < 1.0
    assert side["0.0"]["frac_higher"] < 0.1  # MMoE lower on (nearly) every seed


def test_summary_reports_the_ratio_of_means_beside_the_geometric_one():
    runs = _runs(1.0, 1.0)
    t = summarize_mmoe_benchmark(runs)
    sb = t["archs"]["shared_bottom"]
    assert sb["1.0"]["mean_ratio_vs_top"] is None
    m = sb["0.0"]["mean_ratio_vs_top"]
    assert m["ratio"] == pytest.approx(sb["0.0"]["mean"] / sb["1.0"]["mean"])
    assert m["low"] <= m["ratio"] <= m["high"]


def test_window_means():
    assert window_means([1, 2, 3, 4, 5], 2) == [1.5, 3.5, 5.0]
    assert window_means([], 3) == []
    with pytest.raises(ValueError, match="window"):
        window_means([1.0], 0)


def test_budget_losses_read_the_curve_and_summarise_like_the_final_loss():
    runs = _runs(1.4, 1.0)
    for r in runs:  # an early epoch where the shared-bottom's p = 0 runs are 2x worse, not 1.4x
        worse = r["arch"] == "shared_bottom" and r["p"] == 0.0
        r["train_curve"] = [r["train_mse"] * (4 if not worse else 5.7), r["train_mse"] * 2, r["train_mse"]]
    out = add_budget_losses(runs, [1, 2])
    assert budget_keys([1, 2]) == ["train_mse@ep1", "train_mse@ep2", "train_mse_curve_mean", "train_mse"]
    r = out[0]
    assert r["train_mse@ep1"] == r["train_curve"][0] and r["train_mse@ep2"] == r["train_curve"][1]
    assert r["train_mse_curve_mean"] == pytest.approx(np.mean(r["train_curve"]))
    assert "train_mse@ep1" not in runs[0]  # copies, the input is untouched
    early = summarize_mmoe_benchmark(out, "train_mse@ep1")["archs"]["shared_bottom"]["0.0"]["ratio_vs_top"]
    final = summarize_mmoe_benchmark(out, "train_mse")["archs"]["shared_bottom"]["0.0"]["ratio_vs_top"]
    assert early["ratio"] == pytest.approx(final["ratio"] * 5.7 / 4)
    with pytest.raises(ValueError, match="budgets ask for 5"):
        add_budget_losses(runs, [5])


def test_summary_counts_stalled_runs():
    runs = _runs(1.0, 1.0)
    for r in runs:
        if r["arch"] == "shared_bottom" and r["seed"] < 5 and r["p"] == 1.0:
            r["train_mse"] *= 3  # 5 of the 40 shared-bottom runs stall
    assert summarize_mmoe_benchmark(runs)["stalled_share"] == {"shared_bottom": 5 / 40, "mmoe": 0.0}


@pytest.mark.parametrize(("sb", "mmoe"), [(1.0, 1.0), (1.4, 1.4), (1.0, 1.4)])
def test_summary_rejects_no_trend_or_equal_degradation(sb, mmoe):
    assert summarize_mmoe_benchmark(_runs(sb_factor=sb, mmoe_factor=mmoe))["trend_reproduced"] is False


def test_summary_gives_no_verdict_on_few_seeds():
    assert (
        summarize_mmoe_benchmark(_runs(1.4, 1.0, seeds=MIN_SEEDS_FOR_VERDICT - 1))["trend_reproduced"] is None
    )


def test_summary_refuses_an_incomplete_grid():
    runs = _runs(1.4, 1.0)
    with pytest.raises(ValueError, match="incomplete grid"):
        summarize_mmoe_benchmark(runs[:-1])
    with pytest.raises(ValueError, match="two or more correlations"):
        summarize_mmoe_benchmark([r for r in runs if r["p"] == 1.0])


def test_sharing_cost_against_single_task_fits():
    """Negative transfer as the paper means it: shared-bottom's two-task loss over the single-task
    fits rises as p falls (here 1.05 -> 1.5); MMoE's does not (0.9 at both)."""
    rng = np.random.default_rng(1)
    runs = []
    for s in range(20):
        level = rng.lognormal(-3.5, 1.0)
        for p, sb, mm in [(1.0, 1.05, 0.9), (0.0, 1.5, 0.9)]:
            for arch, f in [(SINGLE_TASK, 1.0), ("shared_bottom", sb), ("mmoe", mm)]:
                loss = level * f * np.exp(rng.normal(0, 0.02))
                runs.append({"p": p, "seed": s, "arch": arch, "train_mse": loss})
    t = sharing_cost(runs)
    assert t["correlations"] == [1.0, 0.0] and t["n_seeds"] == 20
    sb, mm = t["vs_single_task"]["shared_bottom"], t["vs_single_task"]["mmoe"]
    assert sb["1.0"]["ratio"] == pytest.approx(1.05, rel=0.03)
    assert sb["0.0"]["ratio"] == pytest.approx(1.5, rel=0.03)
    assert sb["0.0"]["low"] > sb["1.0"]["high"]  # the cost grows as the tasks decorrelate
    assert mm["0.0"]["high"] < 1.0 and mm["1.0"]["high"] < 1.0
    # the two-task summary ignores the baseline runs
    assert set(summarize_mmoe_benchmark(runs)["archs"]) == {"shared_bottom", "mmoe"}
    with pytest.raises(ValueError, match="incomplete grid"):
        sharing_cost(runs[1:])
    with pytest.raises(ValueError, match="no single_task runs"):
        sharing_cost([r for r in runs if r["arch"] != SINGLE_TASK])


def test_arch_sizes_match_parameters_as_the_paper_does(bench):
    assert bench.arch_sizes() == {
        "shared_bottom": {"bottom_dims": [113]},  # the paper's 113
        "mmoe": {"n_experts": 8, "expert_dims": [16]},
    }
    # narrower experts: the bottom shrinks with them, parameters still matched to within one unit
    small = bench.arch_sizes(4)
    h = small["shared_bottom"]["bottom_dims"][0]
    experts_and_towers = 100 * 4 * 8 + 4 * 8 * 2
    assert h == 28 and abs((100 * h + h * 8 * 2) - experts_and_towers) <= 116 / 2


@pytest.mark.slow
def test_tiny_real_run_writes_runs_summary_and_a_plot(bench, tmp_path, monkeypatch):
    out = tmp_path / "syn.json"
    args = ["--seeds", "2", "--rows", "2000", "--epochs", "1", "--correlations", "1", "0", "--out", str(out)]
    script = str(ROOT / "scripts" / "mmoe_synthetic.py")
    done = subprocess.run([sys.executable, script, *args, "--jobs", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no verdict below" in done.stdout
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 * 2 * 2  # seeds x correlations x archs
    assert {(r["p"], r["seed"], r["arch"]) for r in data["runs"]} == {
        (p, s, a) for p in (1.0, 0.0) for s in (0, 1) for a in ("shared_bottom", "mmoe")
    }
    for r in data["runs"]:
        assert len(r["train_curve"]) == 1 and r["train_mse"] == r["train_curve"][-1] > 0
        assert r["expert_units"] == 16
        # one epoch of 6 steps is one window of the per-step curve: the mean over the same steps
        assert r["step_window"] == 50 and r["step_curve"] == [pytest.approx(r["train_curve"][0], rel=1e-5)]
    assert set(data["summary"]) == {"train_mse", "train_mse_curve_mean", "test_mse"}
    # in-process (--jobs 1) training is the same computation: same seeds, same losses
    one = tmp_path / "one.json"
    monkeypatch.setattr(sys, "argv", ["x", *args[:-1], str(one), "--jobs", "1"])
    bench.main()
    by_key = {(r["p"], r["seed"], r["arch"]): r["train_mse"] for r in data["runs"]}
    for r in json.loads(one.read_text())["runs"]:
        assert r["train_mse"] == pytest.approx(by_key[(r["p"], r["seed"], r["arch"])], rel=1e-5)
    # the summary is recomputable from the stored runs
    again = tmp_path / "again.json"
    monkeypatch.setattr(sys, "argv", ["x", "--from-runs", str(out), "--out", str(again)])
    bench.main()
    assert json.loads(again.read_text())["summary"] == data["summary"]
    assert plot_mmoe_synthetic(data, tmp_path / "syn.png")
    assert (tmp_path / "syn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_single_task_baseline_fits_each_task_alone(bench, tmp_path, monkeypatch):
    """--single-task adds the shared-bottom net fitted on y1 alone and y2 alone. y1 does not depend
    on p for a fixed seed (w1 = c u1), so its single-task fit is the same at p = 1 and p = 0; in
    the two-task fits it is not (y2 differs), which shows the baseline saw no second task."""
    out = tmp_path / "single.json"
    argv = ["x", "--seeds", "2", "--rows", "2000", "--epochs", "2", "--correlations", "1", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--single-task", "--jobs", "1", "--out", str(out)])
    bench.main()
    data = json.loads(out.read_text())
    runs = {(r["p"], r["seed"], r["arch"]): r for r in data["runs"]}
    assert len(runs) == 2 * 2 * 3
    for s in (0, 1):
        one, zero = runs[(1.0, s, SINGLE_TASK)], runs[(0.0, s, SINGLE_TASK)]
        assert one["train_mse_by_task"]["y1"] == pytest.approx(zero["train_mse_by_task"]["y1"], rel=1e-6)
        assert one["train_mse_by_task"]["y2"] != pytest.approx(zero["train_mse_by_task"]["y2"], rel=1e-3)
        assert one["train_mse"] == pytest.approx(sum(one["train_mse_by_task"].values()) / 2, rel=1e-6)
        assert len(one["train_curve"]) == 2 and one["step_curve"]
        sb1, sb0 = runs[(1.0, s, "shared_bottom")], runs[(0.0, s, "shared_bottom")]
        assert sb1["train_mse_by_task"]["y1"] != pytest.approx(sb0["train_mse_by_task"]["y1"], rel=1e-5)
    assert set(data["sharing_cost"]) == {"train_mse", "test_mse"}
    assert set(data["sharing_cost"]["train_mse"]["vs_single_task"]) == {"shared_bottom", "mmoe"}
