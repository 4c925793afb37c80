"""Offline commands: ``train``, ``evaluate``, ``models``, ``data synth``.

``register(app)`` adds them to a Typer app; the ``mtrank`` console script (``service.cli``) adds
the online commands beside them. Console output (rich) is allowed here, not in library modules.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors import SafetensorError

from model.checkpoint import (
    CheckpointError,
    io_error_reason,
    list_versions,
    load_checkpoint,
    read_latest,
    read_manifest,
    resolve_checkpoint,
    write_latest,
)
from model.config import ConfigError, load_config, weighting_name
from model.data import DataError, load_dataset, prepare_data
from model.data.loader import sharded
from model.features import FeatureError
from model.scaffold import ScaffoldError
from model.tune import TuneError

console = Console(stderr=True)
P = ParamSpec("P")
R = TypeVar("R")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML config file", exists=False)]
ArtifactsOpt = Annotated[
    Path, typer.Option("--artifacts", "-a", envvar="MTRANK_ARTIFACTS", help="artifacts dir")
]


def _fail(msg: str) -> typer.Exit:
    # the message is text, not markup (it may hold "[data]" or paths); one line however narrow the
    # terminal, so that it can be grepped from a log
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    return typer.Exit(code=2)


# what bad input raises: a command answers each with one "error: ..." line and exit code 2
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    FeatureError,
    CheckpointError,
    ScaffoldError,
    TuneError,
    OSError,
)


def _clean_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A command whose bad-input exceptions become an error line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise _fail(_describe(e)) from None

    return run


def _describe(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def _metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
        elif isinstance(v, int | str):
            table.add_row(k, str(v))
    return table


def train_cmd(
    config: ConfigOpt,
    artifacts: ArtifactsOpt = Path("artifacts"),
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    arch: Annotated[
        str | None, typer.Option(help="override model.arch (starting from its default [model.<arch>] keys)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override any config key: section.key=value (TOML value), repeatable"),
    ] = None,
    no_latest: Annotated[bool, typer.Option("--no-latest", help="write the checkpoint, keep LATEST")] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="move LATEST to the new version even if the promotion gate says no"),
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option("--init-from", help="fine-tune from a checkpoint folder or version (or LATEST)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue this config's interrupted run after its last epoch")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="override train.device: auto (a GPU when present), cpu, cuda, cuda:1")
    ] = None,
) -> None:
    """Fit a model from a config and write a versioned checkpoint; LATEST moves to it if it passes the
    promotion gate against the current LATEST ([promotion] in the config; --force overrides)."""
    from model.config import apply_overrides
    from model.train import train

    try:
        cfg = load_config(config)
        sets = [f"train.seed={seed}"] if seed is not None else []
        sets += [f"train.epochs={epochs}"] if epochs is not None else []
        sets += [f'model.arch="{arch}"'] if arch is not None else []
        sets += [f'train.device="{device}"'] if device is not None else []
        if sets or set_:
            cfg = apply_overrides(cfg, sets + list(set_ or []))
    except ConfigError as e:
        raise _fail(str(e)) from None

    started = time.perf_counter()
    with Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=None, epoch=0, epochs=cfg.train.epochs, loss=0.0, eta="")

        def progress(kind: str, info: Mapping[str, Any]) -> None:
            if kind == "data":
                rows = {k: info[f"{k}_rows"] for k in ("train", "valid", "test")}
                unused = int(info.get("rows_unused", 0))
                bar.console.print(
                    f"data: train={rows['train']} valid={rows['valid']} test={rows['test']} rows"
                    f" ({info.get('duplicates_dropped', 0)} duplicates dropped"
                    + (f", {unused} rows outside the splits" if unused else "")
                    + ")"
                )
            elif kind == "step" and (info["step"] % 10 == 0 or info["step"] == info["steps"]):
                bar.update(
                    task,
                    completed=info["step"],
                    total=info["steps"],
                    epoch=info["epoch"],
                    epochs=info["epochs"],
                    loss=info["loss"],
                )
            elif kind == "epoch":
                epoch, total, spent = int(info["epoch"]), int(info["epochs"]), float(info["seconds"])
                left = spent / epoch * (total - epoch)
                eta = f"ETA <= {left:.0f}s (early stopping may end sooner)" if epoch < total else ""
                bar.update(task, eta=eta)
                shown = {k: round(v, 4) for k, v in info.items() if k.endswith(("loss", "auc"))}
                bar.console.print(f"epoch {epoch}/{total} ({spent:.1f}s training): {shown}")

        try:
            result = train(
                cfg,
                artifacts,
                progress,
                init_from=init_from,
                resume=resume,
                set_latest=not no_latest,
                force=force,
            )
        except (ConfigError, DataError, FeatureError, CheckpointError) as e:
            raise _fail(str(e)) from None
        except (OSError, SafetensorError) as e:  # e.g. a full disk under the data cache or run state
            raise _fail(f"training stopped by an I/O error: {io_error_reason(e)}") from None
    path = result.checkpoint
    assert path is not None
    console.print(
        _metrics_table({k: v for k, v in result.metrics.items() if k.startswith("test/")}, "test metrics")
    )
    console.print(
        f"training samples/s: {result.samples_per_sec:,.0f}   best epoch: {result.best_epoch}   "
        f"wall time: {time.perf_counter() - started:.1f}s"
    )
    decision = read_manifest(path).get("promotion")
    if no_latest or not isinstance(decision, dict):
        console.print(f"wrote [bold]{path}[/] (LATEST unchanged: --no-latest)")
    elif decision.get("promoted"):
        console.print(f"wrote [bold]{path}[/] (LATEST): {decision.get('reason')}")
    else:
        console.print(
            f"wrote [bold]{path}[/] but [bold yellow]did not promote it[/]: LATEST stays "
            f"{decision.get('against')}. {decision.get('reason')}\n"
            f"(`mtrank rollback {path.name}` or `mtrank train --force` promotes it anyway)"
        )


def evaluate_cmd(
    artifacts: ArtifactsOpt = Path("artifacts"),
    version: Annotated[str | None, typer.Option(help="model version (default: LATEST)")] = None,
    config: Annotated[Path | None, typer.Option(help="evaluate on this config's test split instead")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print metrics as JSON on stdout")] = False,
) -> None:
    """Per-task AUC / GAUC / logloss (RMSE / MAE for regression) and NDCG@10 on the test split."""
    from model.train import evaluate_split

    try:
        ckpt = load_checkpoint(resolve_checkpoint(artifacts, version))
        cfg = load_config(config) if config else ckpt.config
        # encoded with the checkpoint's own fitted schema (vocabularies, statistics), streamed from
        # the data cache under artifacts
        ds = sharded(prepare_data(cfg, artifacts, schema=ckpt.schema))
    except (CheckpointError, ConfigError, DataError, FeatureError) as e:
        raise _fail(str(e)) from None
    metrics = evaluate_split(ckpt.model, ds.test, ckpt.config.tasks, "test/", grouped=ds.grouped)
    if as_json:
        typer.echo(json.dumps({"version": ckpt.version, "metrics": metrics}, indent=1))
    else:
        console.print(_metrics_table(metrics, f"model {ckpt.version}"))


def model_rows(artifacts: Path) -> list[dict[str, Any]]:
    """One summary per version (oldest first): what `mtrank models` prints."""
    from model.promotion import data_set_name, head_metric_keys

    try:
        latest = read_latest(artifacts)
    except CheckpointError:
        latest = None
    rows: list[dict[str, Any]] = []
    for v in list_versions(artifacts):
        row: dict[str, Any] = {"version": v, "latest": v == latest}
        try:
            m = read_manifest(resolve_checkpoint(artifacts, v))
        except CheckpointError as e:  # one bad folder does not hide the others
            rows.append({**row, "error": str(e)})
            continue
        cfg, mt = m["config"], m.get("metrics", {})  # read_manifest checked the JSON types
        tasks = [t for t in cfg.get("tasks", []) if isinstance(t, dict) and "name" in t]
        train = cfg.get("train", {})
        decision = m.get("promotion") if isinstance(m.get("promotion"), dict) else None
        row.update(
            {
                "created_at": m.get("created_at"),
                "arch": str(cfg.get("model", {}).get("arch", "?")),
                "heads": [str(t["name"]) for t in tasks],
                "data_set": data_set_name(cfg, m.get("data_fingerprint") or {}),
                "objective": str(mt.get("weighting") or weighting_name(train)),
                "monitor": mt.get("monitor") or train.get("monitor"),
                "best_monitor": _num(mt.get("best_monitor")),
                "test_metrics": {k: _num(mt.get(key)) for k, key in head_metric_keys(tasks).items()},
                "promoted": decision.get("promoted") if decision else None,
                "promotion": decision.get("reason") if decision else None,
            }
        )
        rows.append(row)
    return rows


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


MODEL_COLUMNS = ("version", "arch", "heads", "data set", "objective", "monitor (best)", "test metrics", "")


def _model_cells(r: Mapping[str, Any]) -> list[str]:
    mark = "LATEST" if r["latest"] else ("not promoted" if r.get("promoted") is False else "")
    if "error" in r:
        return [r["version"], f"unreadable: {r['error']}", "-", "-", "-", "-", "-", mark]
    metrics = " ".join(f"{k} {_fmt(v)}" for k, v in r["test_metrics"].items())
    monitor = f"{r['monitor']} {_fmt(r['best_monitor'])}" if r["monitor"] else "-"
    heads = ",".join(r["heads"])
    return [r["version"], r["arch"], heads, r["data_set"], r["objective"], monitor, metrics or "-", mark]


def models_cmd(
    artifacts: ArtifactsOpt = Path("artifacts"),
    as_json: Annotated[bool, typer.Option("--json", help="print the list as JSON")] = False,
) -> None:
    """List model versions (LATEST marked): heads, data set, objective, monitor and test metrics.

    Prints to stdout: a table on a terminal, tab-separated lines when piped, JSON with --json.
    """
    if not artifacts.is_dir():
        raise _fail(f"no artifacts directory {artifacts}")
    rows = model_rows(artifacts)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not sys.stdout.isatty():
        for cells in [[*MODEL_COLUMNS[:-1], "status"], *map(_model_cells, rows)]:
            typer.echo("\t".join(cells))
        return
    table = Table(title=str(artifacts))
    # version ids are what rollback takes: never shortened, however narrow the terminal
    width = max((len(r["version"]) for r in rows), default=7)
    table.add_column(MODEL_COLUMNS[0], no_wrap=True, min_width=width)
    for col in MODEL_COLUMNS[1:]:
        table.add_column(col)
    for r in rows:
        cells = _model_cells(r)
        if "error" in r:
            cells[1] = f"[red]{cells[1]}[/]"
        table.add_row(*cells)
    Console().print(table)


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "-"


def rollback_cmd(version: str, artifacts: ArtifactsOpt = Path("artifacts")) -> None:
    """Point LATEST at an existing version (a running service picks it up)."""
    try:
        load_checkpoint(resolve_checkpoint(artifacts, version))  # never point LATEST at a bad model
        write_latest(artifacts, version)
    except CheckpointError as e:
        raise _fail(str(e)) from None
    console.print(f"LATEST -> {version}")


def synth_cmd(
    kind: Annotated[
        str, typer.Argument(help="mmoe (task-correlation benchmark) or youtube (impression log)")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="output dir (default artifacts/synth/KIND)")
    ] = None,
    seed: int = 0,
    correlation: Annotated[float, typer.Option(help="mmoe: task correlation in [-1, 1]")] = 0.5,
    rows: Annotated[int | None, typer.Option(help="rows (mmoe) / impressions (youtube)")] = None,
) -> None:
    """Write a synthetic data set (files in the generic tables layout)."""
    from model import synth

    out = out or Path("artifacts/synth") / kind
    if kind not in synth.SYNTH_KINDS:
        raise _fail(f"unknown synthetic data kind {kind!r} ({' or '.join(synth.SYNTH_KINDS)})")
    try:
        if kind == "mmoe":
            paths = synth.make_mmoe_benchmark(
                out, correlation=correlation, seed=seed, **({"n_rows": rows} if rows is not None else {})
            )
        else:
            paths = synth.SYNTH_KINDS[kind](
                out, seed=seed, **({"n_impressions": rows} if rows is not None else {})
            )
    except ValueError as e:  # the generators' parameter checks
        raise _fail(str(e)) from None
    for name, p in paths.items():
        console.print(f"{name}: {p}")


def scale_cmd(
    rows: Annotated[int, typer.Option(help="log rows to write")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output dir")],
    source: Annotated[Path, typer.Option(envvar="MTRANK_DATA_DIR", help="the KuaiRand-Pure folder")] = Path(
        "../shared/data/kuairand-pure"
    ),
    seed: int = 0,
    file_rows: Annotated[int, typer.Option(help="log rows per Parquet file")] = 1 << 20,
) -> None:
    """KuaiRand-Pure replicated to ROWS log rows with fresh user ids (Parquet), for scale benchmarks."""
    from model.scaledata import scale_kuairand

    try:
        paths = scale_kuairand(source, out, rows, seed=seed, file_rows=file_rows)
    except (OSError, ValueError) as e:
        raise _fail(str(e)) from None
    for name, p in paths.items():
        console.print(f"{name}: {p}")


def report_cmd(
    artifacts: ArtifactsOpt = Path("artifacts"),
    out: Annotated[Path | None, typer.Option(help="output dir (default ARTIFACTS/reports)")] = None,
) -> None:
    """Write PNG plots and an HTML page: training curves, test metrics, gate utilisation, experiments."""
    from model.report import write_report

    if not artifacts.is_dir():
        raise _fail(f"no artifacts directory {artifacts}")
    console.print(f"wrote [bold]{escape(str(write_report(artifacts, out)))}[/]")


def tune_cmd(
    config: ConfigOpt,
    trials: Annotated[int, typer.Option(help="Optuna trials")] = 10,
    folds: Annotated[int, typer.Option(help="cross-validation folds")] = 3,
    cv: Annotated[
        str, typer.Option(help="time: forward chaining over the log's time; user: folds grouped by user")
    ] = "time",
    param: Annotated[
        list[str] | None,
        typer.Option(help="search only this one (repeatable); default: the whole space"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs per fit")] = None,
    out: Annotated[Path, typer.Option(help="results JSON")] = Path("artifacts/reports/tune.json"),
) -> None:
    """k-fold cross-validated hyperparameter search (Optuna TPE) on the train split."""
    from model import tune

    if cv not in tune.CVS:
        raise _fail(f"--cv must be one of {', '.join(tune.CVS)}, got {cv!r}")
    if folds < 2:
        raise _fail(f"--folds must be >= 2, got {folds}")
    bad = sorted(set(param or ()) - set(tune.SPACE))
    if bad:
        raise _fail(f"--param {', '.join(bad)}: not searchable; choose from {', '.join(tune.SPACE)}")
    if trials < 1:
        raise _fail(f"--trials must be >= 1, got {trials}")
    cfg = load_config(config)
    if epochs is not None:
        if epochs < 1:
            raise _fail(f"--epochs must be >= 1, got {epochs}")
        cfg.train.epochs = epochs
    ds = load_dataset(cfg)

    def show(t: Mapping[str, Any]) -> None:
        console.print(
            f"trial {t['trial']}: {cfg.monitor}={t['value']:.4f} "
            + json.dumps({k: v for k, v in t.items() if k not in ("trial", "value", "folds")})
        )

    res = tune.tune(
        cfg,
        ds,
        n_trials=trials,
        k=folds,
        seed=cfg.train.seed,
        on_trial=show,
        cv=cv,  # type: ignore[arg-type]  # checked against tune.CVS above
        params=param,
    )
    tune.save(res, out)
    console.print(f"best {res.monitor}={res.best_value:.4f} with {res.best_params}; wrote {out}")


def init_cmd(
    log: Annotated[
        Path, typer.Option("--log", help="the log: one row per impression (CSV, CSV.gz, Parquet)")
    ],
    users: Annotated[Path | None, typer.Option("--users", help="users table (one row per user)")] = None,
    videos: Annotated[Path | None, typer.Option("--videos", help="videos table (one row per item)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="config file to write")] = Path("config.toml"),
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="a label column (repeatable): 0/1 or numeric, or COLUMN=VALUE for text; default: every "
            "0/1 column of the log",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="config name (default: the log's file name)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite --out if it exists")] = False,
) -> None:
    """Write a starting config from the files' schema: keys, labels, features, split, each explained
    by a comment. Train it with `mtrank train --config OUT`."""
    from model.scaffold import scaffold, write_config

    result = scaffold(log, users, videos, labels=label or (), name=name)
    write_config(result.text, out, force=force)
    feats = ", ".join(f"{len(v)} {g}" for g, v in result.features.items() if v)
    console.print(
        f"wrote [bold]{escape(str(out))}[/]: heads {', '.join(result.tasks)}; features {feats}; "
        f"{result.split} split"
        + (
            f"; keys {', '.join(k for k in (result.user_key, result.video_key) if k)}"
            if result.user_key or result.video_key
            else ""
        )
        + f"\nread its comments, then `mtrank train --config {escape(str(out))}`",
        soft_wrap=True,
    )


def predict_cmd(
    input: Annotated[Path, typer.Option("--input", "-i", help="rows to score (CSV, CSV.gz, Parquet)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="scores file (.parquet, .csv, .csv.gz)")],
    artifacts: ArtifactsOpt = Path("artifacts"),
    version: Annotated[str | None, typer.Option(help="model version (default: LATEST)")] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option("--keep", help="input column to copy to the output (repeatable; default: all)"),
    ] = None,
    weight: Annotated[
        list[str] | None,
        typer.Option(
            "--weight",
            help="HEAD=W weight of a head in the combined score (repeatable; default: the fitted ones)",
        ),
    ] = None,
    combine: Annotated[
        str | None,
        typer.Option(help="product or sum (default: the fitted one, else product when every head is binary)"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="users / videos tables' folder (default: the model's data config)")
    ] = None,
    batch_rows: Annotated[int, typer.Option(help="rows per batch read, scored and written")] = 1 << 16,
) -> None:
    """Score a file offline: per-head scores and the combined score of every row, as /rank scores it
    (entity features joined from the model's tables by key, the other features from the file)."""
    from model.batch import predict_file
    from model.scoring import Ranker

    if combine not in (None, "product", "sum"):
        raise _fail(f"--combine must be product or sum, got {combine!r}")
    weights: dict[str, float] | None = None
    if weight:
        weights = {}
        for w in weight:
            head, sep, value = w.partition("=")
            try:
                weights[head.strip()] = float(value)
            except ValueError:
                raise _fail(f"--weight {w!r}: want HEAD=NUMBER") from None
            if not sep or not math.isfinite(weights[head.strip()]) or weights[head.strip()] < 0:
                raise _fail(f"--weight {w!r}: want HEAD=NUMBER (a finite number >= 0)")
    if not input.exists() and not glob.has_magic(str(input)):
        raise _fail(f"--input {input}: no such file")
    ranker = Ranker(load_checkpoint(resolve_checkpoint(artifacts, version)))
    report = predict_file(
        ranker,
        input,
        output,
        keep=keep,
        weights=weights,
        combine=combine,  # type: ignore[arg-type]  # checked above
        batch_rows=batch_rows,
        data_dir=data_dir,
    )
    if report.missing:
        console.print(
            f"[yellow]warning:[/] {input.name} lacks feature column(s) {escape(', '.join(report.missing))}:"
            " scored as missing values",
            soft_wrap=True,
        )
    for g, n in report.unknown_keys.items():
        console.print(
            f"{n} of {report.rows} rows have a {g} key the {g}s table lacks (default {g} features)",
            soft_wrap=True,
        )
    console.print(
        f"scored {report.rows} rows with model {ranker.version} "
        f"({', '.join(report.heads)}; score = {report.combine}) into [bold]{escape(str(output))}[/] "
        f"in {report.seconds:.1f}s",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    for name, cmd in (
        ("init", init_cmd),
        ("train", train_cmd),
        ("evaluate", evaluate_cmd),
        ("predict", predict_cmd),
        ("models", models_cmd),
        ("rollback", rollback_cmd),
        ("report", report_cmd),
        ("tune", tune_cmd),
    ):
        app.command(name)(_clean_errors(cmd))
    data = typer.Typer(help="data utilities", no_args_is_help=True, rich_markup_mode=None)
    data.command("synth")(_clean_errors(synth_cmd))
    data.command("scale")(_clean_errors(scale_cmd))
    app.add_typer(data, name="data")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
