"""FastAPI dependencies, as ``Annotated`` aliases. All async: no threadpool hop per request."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import NotFound, NotReady, Unauthorized
from service.metrics import Metrics
from service.reload import ModelHolder
from service.settings import Settings
from service.store import FeatureStore


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_model(request: Request) -> ModelHolder:
    holder: ModelHolder | None = getattr(request.app.state, "holder", None)
    if holder is None:  # the lifespan has not run (yet)
        raise NotReady("service is starting")
    return holder


async def get_store(request: Request) -> FeatureStore:
    store: FeatureStore | None = getattr(request.app.state, "store", None)
    if store is None:
        raise NotReady("service is starting")
    return store


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RankerDep = Annotated[ModelHolder, Depends(get_model)]
StoreDep = Annotated[FeatureStore, Depends(get_store)]

bearer = HTTPBearer(auto_error=False, description="the service's admin token (MTRANK_ADMIN_TOKEN)")


async def require_admin(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if settings.admin_token is None:
        raise NotFound("admin endpoints are disabled (no admin token configured)")
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not (given and secrets.compare_digest(given, expected)):
        raise Unauthorized()


AdminDep = Depends(require_admin)


async def require_events_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """POST /events: the events token when one is configured (MTRANK_EVENTS_TOKEN), else open."""
    if settings.events_token is None:
        return
    expected = settings.events_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not (given and secrets.compare_digest(given, expected)):
        raise Unauthorized()


EventsDep = Depends(require_events_token)
