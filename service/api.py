"""HTTP routes: /rank, health, model info, metrics; /admin/* (only with an admin token)."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from model import CheckpointNotFoundError, check_version_id
from service.deps import AdminDep, EventsDep, MetricsDep, RankerDep, SettingsDep, StoreDep
from service.errors import (
    Conflict,
    EventsNotRecorded,
    NotFound,
    NotReady,
    ServiceError,
    UnsupportedMediaType,
    ValidationFailed,
)
from service.events import parse_events_request, to_events
from service.latest import PointerError
from service.loader import ReloadError
from service.ranking import (
    apply_inline_features,
    parse_rank_request,
    plan_request,
    render_response,
    score_plan,
)
from service.schemas import (
    ADMIN_ERROR_RESPONSES,
    ERROR_RESPONSES,
    EVENTS_ERROR_RESPONSES,
    EventsResponse,
    Health,
    ModelStatus,
    ModelSwitch,
    RankResponse,
    RollbackRequest,
)
from service.store import StoreError

router = APIRouter()
admin_router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminDep], responses=ADMIN_ERROR_RESPONSES
)

RANK_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
    }
}


def _json_response(body: bytes, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type="application/json")


def _check_json(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        return  # lenient: a body without a content type is read as JSON
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(f"content type {media!r} is not supported: send application/json")


@router.post(
    "/rank",
    response_model=RankResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=RANK_BODY,
    summary="Rank candidate videos for a user",
    tags=["ranking"],
)
async def rank(
    request: Request, holder: RankerDep, store: StoreDep, settings: SettingsDep, metrics: MetricsDep
) -> Response:
    """Score every candidate with the served model and return them best first.

    Unknown users / videos get default features (counted in /metrics) and the response flags them
    (``unknown_user``, each item's ``unknown_video``, ``unseen_context``). When the feature store
    fails, or holds far less than it should, the response says ``"degraded": true`` and why.
    """
    t0 = time.perf_counter()
    outcome = "error"
    try:
        _check_json(request)
        req = parse_rank_request(await request.body(), settings.max_candidates)
        active = holder.current  # read once: a hot swap never changes the model mid-request
        if active is None:
            raise NotReady("no model loaded yet")
        plan = plan_request(req, active, settings)

        t1 = time.perf_counter()
        fetched = await store.fetch(plan.user_id, plan.ids, active.columns)
        metrics.feature_fetch_seconds.observe(time.perf_counter() - t1)
        if fetched.unknown_users:
            metrics.unknown_users.inc(fetched.unknown_users)
        if fetched.unknown_videos:
            metrics.unknown_videos.inc(fetched.unknown_videos)
        if fetched.degraded:
            metrics.degraded_requests.labels(fetched.degraded_reason or "error").inc()
        apply_inline_features(fetched.videos, plan, active.ranker.schema)

        scored = await holder.run_scoring(len(plan.ids), score_plan, active, fetched, plan, active.combine)
        metrics.model_forward_seconds.observe(scored.seconds)
        metrics.candidates_scored.inc(len(plan.ids))
        body = render_response(active, plan, scored, fetched)
        outcome = "ok"
        return _json_response(body)
    except ServiceError as e:
        outcome = "unavailable" if e.status_code == 503 else "invalid"
        raise
    finally:
        metrics.request_seconds.observe(time.perf_counter() - t0)
        metrics.rank_requests.labels(outcome).inc()


EVENTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventsRequest"}}},
    }
}


@router.post(
    "/events",
    response_model=EventsResponse,
    responses=EVENTS_ERROR_RESPONSES,
    openapi_extra=EVENTS_BODY,
    dependencies=[EventsDep],
    summary="Record feedback: appended to the user histories the next /rank reads",
    tags=["events"],
)
async def events(request: Request, store: StoreDep, settings: SettingsDep, metrics: MetricsDep) -> Response:
    """A batch of events (user, video, labels, timestamp). Each one enters the user histories
    whose label columns it has > 0, and the next ``/rank`` for that user sees it. Idempotent by
    ``event_id``: an id seen before changes nothing, so a batch can be retried as a whole. 503
    when the feature store cannot record them (nothing recorded: retry)."""
    outcome = "error"
    try:
        _check_json(request)
        req = parse_events_request(await request.body(), settings.max_events)
        try:
            result = await store.append_events(to_events(req))
        except StoreError as e:
            raise EventsNotRecorded(f"events not recorded: {e}") from None
        metrics.events.labels("accepted").inc(result.accepted)
        metrics.events.labels("duplicate").inc(result.duplicates)
        for name, n in result.appended.items():
            metrics.history_events.labels(name).inc(n)
        outcome = "ok"
        body = EventsResponse(
            accepted=result.accepted, duplicates=result.duplicates, appended=result.appended
        )
        return _json_response(body.model_dump_json().encode())
    except ServiceError as e:
        outcome = "unavailable" if e.status_code == 503 else "invalid"
        raise
    finally:
        metrics.events_requests.labels(outcome).inc()


@router.get(
    "/healthz", response_model=Health, response_model_exclude_none=True, tags=["ops"], summary="Liveness"
)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: ERROR_RESPONSES[503]}, tags=["ops"])
async def readyz(holder: RankerDep, store: StoreDep) -> Health:
    """Ready once a model is loaded, validated and warmed up, while the feature store holds its
    data (not ready when Redis was wiped or evicted: its meta key or sampled rows are gone)."""
    active = holder.current
    # why not is admin information (GET /admin/model): it names paths, keys and LATEST
    if active is None:
        raise NotReady("no model loaded yet")
    if store.problem is not None:
        raise NotReady(f"feature store {store.problem} (details: GET /admin/model)")
    return Health(status="ready", model_version=active.version)


@router.get("/model", response_model=ModelStatus, tags=["ops"], summary="The served model version")
async def model_info(holder: RankerDep) -> ModelStatus:
    """The version served and the status; the details are ``GET /admin/model`` (admin token)."""
    return ModelStatus(**holder.public())


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
async def prometheus(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


# -- admin --------------------------------------------------------------------------------------


def _reload_error(e: ReloadError, serving: str | None) -> ServiceError:
    if e.not_found:
        return NotFound(e.message)
    what = "the LATEST pointer" if isinstance(e, PointerError) else f"model {e.version}"
    still = "still serving the previous model" if serving is not None else "no model is being served"
    return Conflict(f"{what} rejected, {still}: {e.message}")


@admin_router.get("/model", summary="The served model: version, config, metrics, store, last rejection")
async def admin_model_info(holder: RankerDep) -> Response:
    return _json_response(orjson.dumps(holder.describe(), default=str))


@admin_router.post("/reload", response_model=ModelSwitch, summary="Load the version LATEST names now")
async def admin_reload(holder: RankerDep) -> ModelSwitch:
    try:
        active, previous = await holder.reload_latest()
    except ReloadError as e:
        raise _reload_error(e, holder.version_or_none) from None
    announced = await holder.announce(active.version)
    prev = previous.version if previous else None
    return ModelSwitch(
        version=active.version, previous=prev, changed=prev != active.version, announced=announced
    )


@admin_router.post("/rollback", response_model=ModelSwitch, summary="Serve an existing version (by id)")
async def admin_rollback(body: RollbackRequest, holder: RankerDep) -> ModelSwitch:
    try:
        version = check_version_id(body.version)
    except CheckpointNotFoundError:
        raise ValidationFailed(
            f"version: {body.version!r} is not a model version id (a plain name of letters, digits, "
            "'.', '_' and '-', as listed by `mtrank models`; never a path)"
        ) from None
    try:
        active, previous, updated = await holder.rollback(version)
    except ReloadError as e:
        raise _reload_error(e, holder.version_or_none) from None
    announced = await holder.announce(active.version)
    prev = previous.version if previous else None
    return ModelSwitch(
        version=active.version,
        previous=prev,
        changed=prev != active.version,
        latest_updated=updated,
        announced=announced,
    )
