"""The ``mtrank`` console script: offline commands from ``model.cli`` plus the online ones."""

from __future__ import annotations

import typer

from model.cli import register, setup_logging

app = typer.Typer(help="mtrank: multi-task ranking — train, evaluate, serve.", no_args_is_help=True)
register(app)


@app.callback()
def _main(log_level: str = typer.Option("WARNING", "--log-level", envvar="MTRANK_LOG_LEVEL")) -> None:
    setup_logging(log_level.upper())
