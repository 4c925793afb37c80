"""The application factory: ``create_app(settings)``. Nothing is built at import time.

The lifespan sets torch's thread count, opens the feature store, loads + validates + warms the
model (``ModelHolder.start``; the service starts unready rather than failing when there is no
usable model yet), starts the reload watcher, and closes everything on shutdown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from service.api import admin_router, router
from service.errors import install_error_handlers
from service.metrics import MULTIPROC_ENV, Metrics, multiprocess_dir
from service.middleware import AdmissionMiddleware, BodyLimitMiddleware
from service.pointers import open_pointer
from service.reload import ModelHolder
from service.schemas import rank_request_model
from service.settings import Settings
from service.store import open_store

log = logging.getLogger(__name__)

API_VERSION = "1"
WORKER_HEALTHCHECK_S = 60
DOCS_ASSETS = "/docs-assets"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    torch.set_num_threads(settings.torch_threads)
    store = open_store(settings)
    fleet = open_pointer(settings, store)
    holder = ModelHolder(settings, store, app.state.metrics, fleet)
    app.state.store, app.state.holder = store, holder
    log.info(
        "mtrank starting: artifacts=%s store=%s torch_threads=%d",
        settings.artifacts,
        settings.feature_store,
        settings.torch_threads,
    )
    try:
        await holder.start()
        yield
    finally:
        await holder.stop()
        if fleet is not None:
            await fleet.close()
        await store.close()
        app.state.holder = app.state.store = None
        app.state.metrics.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    # FastAPI's own recipe for self-hosted docs assets (/docs and /redoc load no CDN): the Swagger UI
    # and ReDoc files ship in the fastapi-offline package and are served under DOCS_ASSETS
    app = FastAPIOffline(
        title="mtrank",
        summary="Multi-task (MMoE) ranking of candidate videos",
        version=API_VERSION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    metrics = app.state.metrics

    def rejected(path: str) -> None:  # a /rank body refused by its declared size: invalid, as in the route
        if path == "/rank":
            metrics.rank_requests.labels("invalid").inc()

    def shed() -> None:
        metrics.rank_requests.labels("shed").inc()

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, on_reject=rejected)
    # outermost: a shed request costs no body read and no route
    app.add_middleware(
        AdmissionMiddleware,
        limit=settings.max_in_flight,
        max_age_s=settings.max_in_flight_age_ms / 1000 or None,
        on_shed=shed,
        gauge=metrics.in_flight,
    )
    app.include_router(router)
    if settings.admin_token is not None:
        app.include_router(admin_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            # /rank parses its body itself (one pydantic JSON pass); publish the schema it enforces
            model = rank_request_model(settings.max_candidates)
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["RankRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def worker_app() -> FastAPI:
    """The app of one ``mtrank serve --workers N`` worker process: settings from the MTRANK_*
    environment ``run_server`` exported, logging as in the parent."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)


def export_settings(settings: Settings) -> None:
    """Put every setting into this process's MTRANK_* environment, which the worker processes
    inherit and read (``worker_app``): they run with exactly these settings."""
    for name, value in settings.model_dump(mode="json").items():
        key = f"MTRANK_{name.upper()}"
        if name == "admin_token" and settings.admin_token is not None:
            value = settings.admin_token.get_secret_value()
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value if isinstance(value, str) else json.dumps(value)


def run_server(settings: Settings | None = None) -> None:
    """Serve on settings.host:port with uvicorn, blocking: ``create_app(settings)`` in this process
    for one worker; for ``workers`` > 1, uvicorn's supervisor with that many worker processes
    sharing the socket (each loads and reloads the model on its own; a dead one is replaced), and
    the metrics in prometheus_client's multiprocess mode (service.metrics). Either way with the
    settings' HTTP limits (service.server)."""
    import uvicorn

    from service.server import WorkerH11Protocol, uvicorn_options

    settings = settings if settings is not None else Settings()
    logging.getLogger("service").setLevel(settings.log_level)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 10,
    }
    options = uvicorn_options(settings)  # the HTTP limits (service.server)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common, **options)
        return
    # uvicorn pickles its config to the worker processes: a protocol class importable by name,
    # which reads its deadlines from the settings exported below
    options["http"] = WorkerH11Protocol
    export_settings(settings)
    with contextlib.ExitStack() as stack:
        shared = multiprocess_dir()
        if shared is None:
            shared = stack.enter_context(tempfile.TemporaryDirectory(prefix="mtrank-metrics-"))
            os.environ[MULTIPROC_ENV] = shared
        else:  # values of an earlier run must not add up with this one's
            for stale in Path(shared).glob("*.db"):
                stale.unlink()
        log.info("mtrank: %d worker processes, metrics in %s", settings.workers, shared)
        if settings.feature_store == "embedded":
            log.warning(
                "embedded feature store with %d workers: each worker keeps its own user histories, and "
                "a POST /events reaches one of them; use the Redis store when events must reach every "
                "worker",
                settings.workers,
            )
        # a worker busy importing torch and loading its model can miss uvicorn's 5 s health ping
        # (dlopen holds the GIL): give it WORKER_HEALTHCHECK_S before it is taken for hung
        uvicorn.run(
            "service.app:worker_app",
            factory=True,
            workers=settings.workers,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            **common,
            **options,
        )
