"""The application factory: ``create_app(settings)``. Nothing is built at import time.

The lifespan sets torch's thread count, opens the feature store, loads + validates + warms the
model (``ModelHolder.start``; the service starts unready rather than failing when there is no
usable model yet), starts the reload watcher, and closes everything on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from service.api import admin_router, router
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware
from service.reload import ModelHolder
from service.schemas import rank_request_model
from service.settings import Settings
from service.store import open_store

log = logging.getLogger(__name__)

API_VERSION = "1"
DOCS_ASSETS = "/docs-assets"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    torch.set_num_threads(settings.torch_threads)
    store = open_store(settings)
    holder = ModelHolder(settings, store, app.state.metrics)
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
        await store.close()
        app.state.holder = app.state.store = None


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

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, on_reject=rejected)
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


def run_server(settings: Settings | None = None) -> None:
    """Serve ``create_app(settings)`` with uvicorn (one worker, blocking) on settings.host:port,
    with the settings' HTTP limits (service.server)."""
    import uvicorn

    from service.server import uvicorn_options

    settings = settings if settings is not None else Settings()
    logging.getLogger("service").setLevel(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
        **uvicorn_options(settings),
    )
