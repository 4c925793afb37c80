"""The ``mtrank`` console script: offline commands from ``model.cli`` plus the online ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from model.cli import register, setup_logging

app = typer.Typer(
    help="mtrank: multi-task ranking — train, evaluate, serve.",
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts are plain: "[objective]" names a config table, not a style
)
register(app)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mtrank")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mtrank {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    log_level: str = typer.Option("WARNING", "--log-level", envvar="MTRANK_LOG_LEVEL"),
    _version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="print the version and exit"),
    ] = False,
) -> None:
    setup_logging(log_level.upper())


def _settings(**overrides: Any) -> Any:
    """Settings from MTRANK_* env vars, with the command-line options that were given on top."""
    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        typer.echo(f"error: invalid settings: {e}", err=True)
        raise typer.Exit(code=2) from None


@app.command("serve")
def serve_cmd(
    host: Annotated[str | None, typer.Option(help="bind address [MTRANK_HOST, default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [MTRANK_PORT, default 8000]")] = None,
    artifacts: Annotated[
        Path | None, typer.Option("--artifacts", "-a", help="artifacts dir [MTRANK_ARTIFACTS]")
    ] = None,
    feature_store: Annotated[
        str | None, typer.Option("--feature-store", help="embedded or redis [MTRANK_FEATURE_STORE]")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL [MTRANK_REDIS_URL]")] = None,
    redis_prefix: Annotated[str | None, typer.Option(help="Redis key prefix [MTRANK_REDIS_PREFIX]")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="embedded store: tables directory [MTRANK_DATA_DIR]")
    ] = None,
    torch_threads: Annotated[int | None, typer.Option(help="torch threads [MTRANK_TORCH_THREADS]")] = None,
    workers: Annotated[
        int | None, typer.Option(help="worker processes sharing the port [MTRANK_WORKERS, default 1]")
    ] = None,
    wait_for_model: Annotated[
        bool | None,
        typer.Option(
            "--wait/--no-wait",
            help="start (unready) even when no model exists yet, and serve the first one LATEST names "
            "[MTRANK_WAIT_FOR_MODEL, default: exit with an error]",
        ),
    ] = None,
) -> None:
    """Serve the ranking API (uvicorn; --workers processes). Every option also reads MTRANK_* env vars.

    Exits with code 1 at once when there is no model to serve (no models/LATEST under the artifacts
    dir), unless told to wait for one (--wait).
    """
    settings = _settings(**locals())  # every option is the Settings field of its name
    from model import CheckpointNotFoundError, read_latest
    from service.app import run_server

    if not settings.wait_for_model:
        try:
            read_latest(settings.artifacts)
        except CheckpointNotFoundError as e:
            typer.echo(
                f"error: nothing to serve, {e} (`mtrank train --config ... --artifacts "
                f"{settings.artifacts}`); or pass --wait (MTRANK_WAIT_FOR_MODEL=1) to start unready and "
                "serve the first model LATEST names.",
                err=True,
            )
            raise typer.Exit(code=1) from None
    run_server(settings)


@app.command("materialize")
def materialize_cmd(
    artifacts: Annotated[
        Path, typer.Option("--artifacts", "-a", envvar="MTRANK_ARTIFACTS", help="artifacts dir")
    ] = Path("artifacts"),
    version: Annotated[str | None, typer.Option(help="model version (default: LATEST)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL [MTRANK_REDIS_URL]")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="key prefix [MTRANK_REDIS_PREFIX]")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="tables directory (default: the model's data config / MTRANK_DATA_DIR)"),
    ] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="keys per MSET")] = 1000,
    replace: Annotated[
        bool, typer.Option("--replace", help="rewrite a prefix that holds another column layout")
    ] = False,
    cluster_buckets: Annotated[
        int, typer.Option(min=1, max=16384, help="Redis Cluster: hash-tag buckets of the keys")
    ] = 16,
) -> None:
    """Write the user and video feature rows of a model's tables into Redis (one key per entity;
    on a Redis Cluster, in hash-tag buckets so that a request reads few slots)."""
    from redis.exceptions import RedisError

    from model import CheckpointError
    from service.store import StoreError
    from service.store.redis_store import materialize, redact_url

    settings = _settings(redis_url=redis_url, redis_prefix=prefix)
    try:
        report = materialize(
            artifacts,
            redis_url=settings.redis_url,
            prefix=settings.redis_prefix,
            version=version,
            data_dir=data_dir,
            chunk_size=chunk_size,
            replace=replace,
            cluster=settings.redis_cluster,
            cluster_buckets=cluster_buckets,
        )
    except (CheckpointError, StoreError, RedisError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    counts = ", ".join(f"{n} {k}" for k, n in report.counts.items())
    typer.echo(
        f"materialized {counts} for model {report.version} into {redact_url(settings.redis_url)} "
        f"(prefix {report.prefix!r}, layout {report.layout.layout_id}) in {report.seconds:.1f}s"
        + (f"; {report.replicas[0]}/{report.replicas[1]} replicas in sync" if report.replicas[1] else "")
    )


@app.command("replay")
def replay_cmd(
    artifacts: Annotated[
        Path, typer.Option("--artifacts", "-a", envvar="MTRANK_ARTIFACTS", help="artifacts dir")
    ] = Path("artifacts"),
    version: Annotated[str | None, typer.Option(help="model version (default: LATEST)")] = None,
    url: Annotated[
        str | None,
        typer.Option(help="replay against a running server (http://host:port) instead of in process"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="read the log / objective from this config (default: the model's)")
    ] = None,
    split: Annotated[str, typer.Option(help="train, valid or test")] = "test",
    resamples: Annotated[int, typer.Option(min=100, help="bootstrap resamples (over lists)")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap, tie-break and random-policy seed")] = 0,
    max_lists: Annotated[int | None, typer.Option(min=1, help="replay only the first N lists")] = None,
    parity: Annotated[
        bool, typer.Option("--parity/--no-parity", help="compare served and offline scores row by row")
    ] = True,
    out: Annotated[
        Path | None,
        typer.Option(help="report JSON (default ARTIFACTS/reports/replay-<version>-<split>.json)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
) -> None:
    """Replay a split's logged impressions as /rank requests (one per list of the model's
    [objective], e.g. user x day x tab) through the service's own ranking path, and report NDCG@k,
    recall@k and the mean gain of the top k -- for the served default, each head alone, popularity
    and random -- with bootstrap intervals over lists. `mtrank report` shows the saved reports."""
    import json

    from rich.console import Console
    from rich.table import Table

    from model import CheckpointError, ConfigError, DataError, load_config
    from model.replay import table_header, table_rows
    from service.replay import ReplayError, run_replay

    settings = _settings(artifacts=artifacts)
    console = Console(stderr=True)

    def progress(done: int, total: int) -> None:
        console.print(f"replayed {done}/{total} lists", highlight=False)

    try:
        cfg = load_config(config) if config is not None else None
        rep = run_replay(
            artifacts=artifacts,
            version=version,
            url=url,
            config=cfg,
            settings=settings,
            split=split,
            resamples=resamples,
            seed=seed,
            max_lists=max_lists,
            check_parity=parity,
            progress=progress,
        )
    except (CheckpointError, ConfigError, DataError, ReplayError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    suffix = "-url" if url is not None else ""
    path = out or artifacts / "reports" / f"replay-{rep['version']}-{split}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=1))
    if as_json:
        typer.echo(json.dumps(rep, indent=1))
        return
    c = rep["counts"]
    table = Table(
        title=f"replay of model {rep['version']} ({rep['arch']}) on the {split} split: {c['lists']} lists, "
        f"{c['rows']} rows"
    )
    for col in table_header(rep):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for row in table_rows(rep):
        table.add_row(*row)
    Console().print(table)
    scoring = rep["served"]
    typer.echo(
        f"served: {scoring.get('combine')} of {scoring.get('weights')} ({scoring.get('weights_from')})"
    )
    if rep["parity"] is not None:
        par = rep["parity"]
        typer.echo(f"parity over {par['rows']} rows, max |served - offline|: {par['max_abs_diff']}")
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
