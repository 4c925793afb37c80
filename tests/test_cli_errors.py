"""Every `mtrank` command answers broken input with one clear error line and its documented exit code
(2 for bad input; `serve` without a model: 1), never a traceback.

Each case builds its broken input for real (missing, empty and header-only files, invalid TOML, a
text column where numbers belong, a one-user table for `tune --cv user`, ...) and runs the command
through the console script's Typer app.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import free_port
from modelkit import DATA_DIR, FIXTURE_LOG, ROOT
from typer.testing import CliRunner

from service.cli import app as cli

GOOD_TOML = """
name = "t"
[data]
source = "tables"
data_dir = "{dir}"
log = "{log}"
users = ""
videos = ""
user_key = ""
video_key = ""
split = "random"
[[data.features]]
name = "grade"
group = "context"
kind = "categorical"
[[data.features]]
name = "temp"
group = "context"
kind = "numeric"
[[tasks]]
name = "y"
label = "{label}"
[train]
epochs = 1
batch_size = 64
"""


def table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "grade": rng.choice(["a", "b", "c"], n),
            "temp": rng.normal(size=n).round(3),
            "outcome": rng.choice(["won", "lost"], n),
            "y": rng.integers(0, 2, n),
        }
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("broken")
    table().to_csv(d / "t.csv", index=False)
    table().head(0).to_csv(d / "header_only.csv", index=False)
    (d / "empty.csv").write_bytes(b"")
    (d / "notes.txt").write_text("grade,temp\na,1\n")
    (d / "repeated.csv").write_text("grade,temp,grade,y\na,1,b,0\n")
    table().assign(temp=lambda df: df["temp"].astype(str).where(df.index != 7, "warm")).to_csv(
        d / "text_temp.csv", index=False
    )
    pd.DataFrame({"id": range(5), "age": 30}).to_csv(d / "strangers.csv", index=False)

    def toml(
        name: str, log: str = "t.csv", label: str = "y", edit: Callable[[str], str] = lambda s: s
    ) -> None:
        (d / name).write_text(edit(GOOD_TOML.format(dir=d, log=log, label=label)))

    toml("good.toml")
    toml("bad.toml", edit=lambda s: s.replace('name = "t"', 'name = "t'))
    toml("unknown_key.toml", edit=lambda s: s.replace("[train]", "[train]\nepoch = 3"))
    toml("flat_key.toml", edit=lambda s: s + '[model]\narch = "mmoe"\nn_experts = 2\n')
    toml("arch_table.toml", edit=lambda s: s + '[model]\narch = "ple"\n[model.mmoe]\nn_experts = 2\n')
    toml("no_data.toml", log="nowhere.csv")
    toml("text_label.toml", label="outcome")
    toml("text_numeric.toml", log="text_temp.csv")
    toml("header_only.toml", log="header_only.csv")
    toml("empty_log.toml", log="empty.csv")
    toml("monitor.toml", edit=lambda s: s + 'monitor = "valid/engagement/auc"\n')
    toml(
        "no_features.toml",
        edit=lambda s: s.split("[[data.features]]")[0] + "[[tasks]]" + s.split("[[tasks]]")[1],
    )
    log = pd.read_csv(DATA_DIR / FIXTURE_LOG).head(50)
    log.to_csv(d / "rows.csv", index=False)
    # no video key: the video features are read from the file's columns, and one is not a number
    log.drop(columns=["video_id"]).assign(video_duration="long").to_csv(d / "rows_text.csv", index=False)
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_csv(d / "unrelated.csv", index=False)
    (d / "empty_artifacts").mkdir()
    return d


NO_MODEL = "20990101-000000000-abcdef"

# (id, arguments with {f} = the files dir and {a} = a trained artifacts dir, exit code, message)
CASES: list[tuple[str, list[str], int, str]] = [
    # init
    ("init-missing-log", ["init", "--log", "{f}/missing.csv"], 2, r"file not found: .*missing.csv"),
    (
        "init-empty-log",
        ["init", "--log", "{f}/empty.csv", "--out", "{f}/x.toml"],
        2,
        r"cannot read .*empty.csv",
    ),
    ("init-header-only", ["init", "--log", "{f}/header_only.csv", "--out", "{f}/x.toml"], 2, r"has no rows"),
    ("init-not-a-table", ["init", "--log", "{f}/notes.txt"], 2, r"unsupported log file type"),
    ("init-repeated-column", ["init", "--log", "{f}/repeated.csv"], 2, r"\['grade'\] appear more than once"),
    (
        "init-no-key",
        ["init", "--log", "{f}/t.csv", "--users", "{f}/strangers.csv"],
        2,
        r"cannot tell the user key",
    ),
    ("init-no-dir", ["init", "--log", "{f}/t.csv", "--out", "{f}/no/such/x.toml"], 2, r"no such directory"),
    (
        "init-bad-label",
        ["init", "--log", "{f}/t.csv", "--label", "nope"],
        2,
        r"--label 'nope': no such column",
    ),
    # train
    ("train-no-config", ["train", "--config", "{f}/missing.toml"], 2, r"config file not found"),
    ("train-bad-toml", ["train", "--config", "{f}/bad.toml"], 2, r"invalid TOML"),
    (
        "train-unknown-key",
        ["train", "--config", "{f}/unknown_key.toml"],
        2,
        r"\[train\] unknown keys: \['epoch'\]",
    ),
    ("train-no-data", ["train", "--config", "{f}/no_data.toml"], 2, r"data file not found: .*nowhere.csv"),
    (
        "train-text-label",
        ["train", "--config", "{f}/text_label.toml"],
        2,
        r"label column 'outcome' holds .*equals",
    ),
    (
        "train-text-numeric",
        ["train", "--config", "{f}/text_numeric.toml"],
        2,
        r"'temp' holds 'warm' .*not a number",
    ),
    (
        "train-header-only",
        ["train", "--config", "{f}/header_only.toml"],
        2,
        r"no observed label in the train split",
    ),
    ("train-empty-log", ["train", "--config", "{f}/empty_log.toml"], 2, r"cannot read .*empty.csv"),
    ("train-no-features", ["train", "--config", "{f}/no_features.toml"], 2, r"no features declared"),
    ("train-monitor", ["train", "--config", "{f}/monitor.toml"], 2, r"names no metric of this config"),
    ("train-bad-set", ["train", "--config", "{f}/good.toml", "--set", "nope"], 2, r"want section.key=value"),
    (
        "train-flat-key",
        ["train", "--config", "{f}/flat_key.toml"],
        2,
        r"\[model\] n_experts is now \[model\.mmoe\] n_experts",
    ),
    (
        "train-arch-and-table",
        ["train", "--config", "{f}/arch_table.toml"],
        2,
        r"\[model\] arch = 'ple' but the table is \[model\.mmoe\]",
    ),
    (
        "train-flat-set",
        ["train", "--config", "{f}/good.toml", "--set", "model.n_experts=2"],
        2,
        r"\[model\] n_experts is now \[model\.mmoe\] n_experts",
    ),
    (
        "train-bad-arch-set",
        ["train", "--config", "{f}/good.toml", "--set", "model.mmoe.n_experts=0"],
        2,
        r"model\.mmoe: n_experts must be >= 1",
    ),
    (
        "train-zero-epochs",
        ["train", "--config", "{f}/good.toml", "--epochs", "0"],
        2,
        r"train.epochs must be >= 1, got 0",
    ),
    # evaluate
    ("evaluate-no-model", ["evaluate", "--artifacts", "{f}/empty_artifacts"], 2, r"no LATEST"),
    ("evaluate-no-version", ["evaluate", "--artifacts", "{a}", "--version", NO_MODEL], 2, r"not found"),
    (
        "evaluate-bad-config",
        ["evaluate", "--artifacts", "{a}", "--config", "{f}/bad.toml"],
        2,
        r"invalid TOML",
    ),
    # tune
    (
        "tune-one-user",
        ["tune", "--config", "{f}/good.toml", "--cv", "user", "--folds", "2"],
        2,
        r"at least 2 users",
    ),
    (
        "tune-no-time",
        ["tune", "--config", "{f}/good.toml", "--folds", "2"],
        2,
        r"--cv time needs the rows' times",
    ),
    ("tune-zero-trials", ["tune", "--config", "{f}/good.toml", "--trials", "0"], 2, r"--trials must be >= 1"),
    ("tune-no-config", ["tune", "--config", "{f}/missing.toml"], 2, r"config file not found"),
    # predict
    (
        "predict-no-input",
        ["predict", "-i", "{f}/missing.csv", "-o", "{f}/o.csv", "-a", "{a}"],
        2,
        r"no such file",
    ),
    (
        "predict-bad-output",
        ["predict", "-i", "{f}/rows.csv", "-o", "{f}/o.json", "-a", "{a}"],
        2,
        r"unsupported file type",
    ),
    (
        "predict-unrelated",
        ["predict", "-i", "{f}/unrelated.csv", "-o", "{f}/o.csv", "-a", "{a}"],
        2,
        r"none of the model's feature columns",
    ),
    (
        "predict-text-numeric",
        ["predict", "-i", "{f}/rows_text.csv", "-o", "{f}/o.csv", "-a", "{a}"],
        2,
        r"'video_duration' holds 'long' in row 1",
    ),
    (
        "predict-empty",
        ["predict", "-i", "{f}/empty.csv", "-o", "{f}/o.csv", "-a", "{a}"],
        2,
        r"cannot read .*empty.csv",
    ),
    (
        "predict-no-model",
        ["predict", "-i", "{f}/rows.csv", "-o", "{f}/o.csv", "-a", "{f}/empty_artifacts"],
        2,
        r"no LATEST",
    ),
    (
        "predict-bad-weight",
        ["predict", "-i", "{f}/rows.csv", "-o", "{f}/o.csv", "-a", "{a}", "--weight", "nope=1"],
        2,
        r"unknown head",
    ),
    (
        "predict-bad-keep",
        ["predict", "-i", "{f}/rows.csv", "-o", "{f}/o.csv", "-a", "{a}", "--keep", "nope"],
        2,
        r"--keep: .*no column",
    ),
    (
        "predict-same-file",
        ["predict", "-i", "{f}/rows.csv", "-o", "{f}/rows.csv", "-a", "{a}"],
        2,
        r"must not be the input",
    ),
    # models, rollback, report
    ("models-no-dir", ["models", "--artifacts", "{f}/nowhere"], 2, r"no artifacts directory"),
    ("rollback-no-version", ["rollback", NO_MODEL, "--artifacts", "{a}"], 2, r"not found"),
    ("rollback-bad-id", ["rollback", "../x", "--artifacts", "{a}"], 2, r"invalid model version id"),
    ("report-no-dir", ["report", "--artifacts", "{f}/nowhere"], 2, r"no artifacts directory"),
    # data synth
    ("synth-unknown", ["data", "synth", "nope", "--out", "{f}/s"], 2, r"unknown synthetic data kind"),
    (
        "synth-correlation",
        ["data", "synth", "mmoe", "--correlation", "2", "--out", "{f}/s"],
        2,
        r"correlation must be in",
    ),
    (
        "synth-zero-rows",
        ["data", "synth", "youtube", "--rows", "0", "--out", "{f}/s"],
        2,
        r"n_impressions must be >= 1",
    ),
    ("synth-out-is-a-file", ["data", "synth", "mmoe", "--out", "{f}/t.csv"], 2, r"t.csv: File exists"),
    ("scale-zero-rows", ["data", "scale", "--rows", "0", "--out", "{f}/sc"], 2, r"rows must be >= 1"),
    (
        "scale-no-source",
        ["data", "scale", "--rows", "9", "--out", "{f}/sc", "--source", "{f}/nowhere"],
        2,
        r"No such file",
    ),
    # replay
    ("replay-no-model", ["replay", "--artifacts", "{f}/empty_artifacts"], 2, r"no LATEST"),
    ("replay-bad-split", ["replay", "--artifacts", "{a}", "--split", "later"], 2, r"split must be one of"),
    (
        "replay-no-server",
        ["replay", "--artifacts", "{a}", "--url", "http://127.0.0.1:9"],  # nothing listens on port 9
        2,
        r"GET /model: .*(refused|connect)",
    ),
    ("replay-bad-url", ["replay", "--artifacts", "{a}", "--url", "localhost:8000"], 2, r"--url must be http"),
    # serve, materialize
    ("serve-no-model", ["serve", "--artifacts", "{f}/empty_artifacts"], 1, r"nothing to serve"),
    ("serve-bad-settings", ["serve", "--feature-store", "nope"], 2, r"invalid settings"),
    (
        "materialize-no-model",
        ["materialize", "--artifacts", "{f}/empty_artifacts", "--redis-url", "{redis}"],
        2,
        r"no LATEST",
    ),
    (
        "materialize-no-redis",
        ["materialize", "--artifacts", "{a}", "--redis-url", "{redis}"],
        2,
        r"error: .*(refused|connect)",
    ),
]


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize(("args", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_input_gets_an_error_line_not_a_traceback(
    files: Path, trained_artifacts: Path, args: list[str], code: int, message: str
) -> None:
    redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    argv = [a.format(f=files, a=trained_artifacts, redis=redis) for a in args]
    result = invoke(argv)
    text = " ".join(result.output.split())  # one line, whatever the terminal width
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # exited, did not raise
    assert "Traceback" not in result.output
    assert text.startswith("error:"), result.output
    assert re.search(message, text), result.output


def test_every_command_has_a_broken_input_case() -> None:
    import typer

    def leaves(cmd: Any, prefix: tuple[str, ...]) -> set[str]:
        subs = getattr(cmd, "commands", None)
        if isinstance(subs, dict):
            return {leaf for name, sub in subs.items() for leaf in leaves(sub, (*prefix, name))}
        return {" ".join(prefix)}

    commands = leaves(typer.main.get_command(cli), ())
    covered = {c for c in commands if any(args[: len(c.split())] == c.split() for _, args, _, _ in CASES)}
    assert commands <= covered, sorted(commands - covered)


@pytest.mark.parametrize(
    "args",
    [
        ["init", "--log", "{f}/empty.csv", "--out", "{f}/y.toml"],
        ["train", "--config", "{f}/text_numeric.toml"],
    ],
)
@pytest.mark.slow
def test_the_console_script_prints_no_traceback(files: Path, args: list[str]) -> None:
    """The real process (its stderr as a terminal user sees it, not CliRunner's capture)."""
    argv = [sys.executable, "-m", "service.cli", *(a.format(f=files) for a in args)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line
