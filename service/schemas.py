"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
)

# ids: KuaiRand's are ints; any non-empty string works too. Internally both are strings (str(int)).
IntId = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
StrId = Annotated[StrictStr, Field(min_length=1, max_length=256)]
EntityId = IntId | StrId
# a finite JSON number (ints accepted), never a numeric string
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]


def _within_float_range(v: int) -> int:
    """Integers a numeric feature can hold: float(v) must not overflow (|v| < ~1.8e308)."""
    try:
        float(v)
    except OverflowError:
        raise ValueError("integer beyond the float range") from None
    return v


# an integer feature value: kept exact (categoricals hash its digits), but convertible to a float
RawInt = Annotated[StrictInt, AfterValidator(_within_float_range)]
# a raw feature value: what a table cell could hold
RawValue = StrictStr | RawInt | Number | StrictBool | None

ID_HINT = "must be an integer id or a non-empty string id (at most 256 characters)"
CANDIDATE_HINT = (
    'must be a video id (integer or non-empty string) or an object {"video_id": <id>, "features": {...}}'
)
VALUE_HINT = "must be a string, a finite number (within the float range), a boolean or null"

# Every list and dict of a request is capped (candidates: at the settings' max_candidates), and
# validated fail-fast: the first bad item ends validation. A body of invalid items (up to
# max_body_bytes of them) would otherwise build one error per item and union member: seconds of
# CPU on the event loop for a 1 MB body. The cost of a body is thus bounded by its size, which
# max_body_bytes bounds.
MAX_FEATURES = 256  # inline features per candidate; context features
MAX_KEY_CHARS = 128  # a feature name
MAX_WEIGHTS = 64  # per-head weight overrides
DEFAULT_MAX_CANDIDATES = 2000  # Settings.max_candidates' default; create_app builds the app's cap
CANDIDATES_DESCRIPTION = (
    "video ids, or objects with inline features; at most max_candidates. Every video id at most "
    'once: ids compare as strings, so the integer 5, the string "5" and {"video_id": 5} are the '
    "same id (a repeated id is a 422)"
)
FeatureName = Annotated[str, Field(max_length=MAX_KEY_CHARS)]


class Candidate(BaseModel):
    """A candidate with inline features; they override the feature store's values for it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    video_id: EntityId = Field(validation_alias=AliasChoices("video_id", "id"))
    features: dict[FeatureName, RawValue] = Field(
        default_factory=dict,
        max_length=MAX_FEATURES,
        fail_fast=True,
        description="raw values of the model's video features (GET /model lists them)",
    )


class RankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": 0, "candidates": [1, 2, 3], "top_k": 2},
                {"user_id": "u42", "candidates": ["v1", {"video_id": "v2", "features": {}}], "context": {}},
            ]
        },
    )

    user_id: EntityId
    candidates: list[EntityId | Candidate] = Field(
        min_length=1,
        max_length=DEFAULT_MAX_CANDIDATES,
        fail_fast=True,
        json_schema_extra={"uniqueItems": True},
        description=CANDIDATES_DESCRIPTION,
    )
    context: dict[FeatureName, RawValue] = Field(
        default_factory=dict,
        max_length=MAX_FEATURES,
        fail_fast=True,
        description="raw values of the model's context features (GET /model lists them)",
    )
    top_k: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="return the best k (1..number of candidates); default: all"
    )
    weights: dict[FeatureName, Number] | None = Field(
        default=None,
        max_length=MAX_WEIGHTS,
        fail_fast=True,
        description="per-head weights (the served model's heads) overriding the service's, within its bounds",
    )


@functools.cache
def rank_request_model(max_candidates: int) -> type[RankRequest]:
    """RankRequest with ``candidates`` capped at ``max_candidates`` (a service's setting): a longer
    list is refused by the parser itself, before any item is validated."""
    if max_candidates == DEFAULT_MAX_CANDIDATES:
        return RankRequest
    field = RankRequest.model_fields["candidates"]
    capped: type[RankRequest] = create_model(
        "RankRequest",
        __base__=RankRequest,
        candidates=(
            list[EntityId | Candidate],
            Field(
                min_length=1,
                max_length=max_candidates,
                fail_fast=True,
                json_schema_extra=field.json_schema_extra,
                description=field.description,
            ),
        ),
    )
    return capped


# hints for describe_validation_errors: a value that fits no member of a union
RANK_ERROR_HINTS = {
    "user_id": ID_HINT,
    "candidates[*]": CANDIDATE_HINT,
    "candidates[*].video_id": ID_HINT,
    "candidates[*].features.*": VALUE_HINT,
    "context.*": VALUE_HINT,
    "top_k": "must be a positive integer",
}
RANK_MODEL_TAGS = frozenset({"Candidate"})


class EventIn(BaseModel):
    """One piece of feedback: the user engaged with the video at ``timestamp``."""

    model_config = ConfigDict(extra="forbid")

    event_id: EntityId = Field(description="unique per event: an id seen before changes nothing (retries)")
    user_id: EntityId
    video_id: EntityId
    timestamp: Number = Field(description="when, in the unit of the log's time column (KuaiRand: ms)")
    labels: dict[FeatureName, Number | StrictBool] = Field(
        default_factory=dict,
        max_length=MAX_FEATURES,
        fail_fast=True,
        description='label columns and their values, e.g. {"long_view": 1}; an event enters the '
        "histories whose label columns it has > 0",
    )
    features: dict[FeatureName, RawValue] = Field(
        default_factory=dict,
        max_length=MAX_FEATURES,
        fail_fast=True,
        description="raw video features of the event, overriding the feature store's (history side features)",
    )


class EventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "event_id": "91-6435-1651461680240",
                            "user_id": 91,
                            "video_id": 6435,
                            "timestamp": 1651461680240,
                            "labels": {"long_view": 1, "is_like": 0},
                        }
                    ]
                }
            ]
        },
    )

    events: list[EventIn] = Field(min_length=1, max_length=100_000, fail_fast=True)


class EventsResponse(BaseModel):
    accepted: int = Field(description="events recorded (ids not seen before)")
    duplicates: int = Field(description="events whose id was seen before: nothing changed")
    appended: dict[str, int] = Field(description="per user history the store keeps: events added to it")


EVENTS_ERROR_HINTS = {
    "events[*].event_id": ID_HINT,
    "events[*].user_id": ID_HINT,
    "events[*].video_id": ID_HINT,
    "events[*].features.*": VALUE_HINT,
    "events[*].labels.*": "must be a finite number or a boolean",
}


class RankedItem(BaseModel):
    video_id: int | str
    rank: int
    score: float
    heads: dict[str, float] = Field(description="per-head scores, one per head of the served model")
    unknown_video: bool | None = Field(
        description="the feature store has no row for this video (scored with default features, or "
        "the inline ones); null when the store did not answer"
    )


class RankResponse(BaseModel):
    model_version: str
    items: list[RankedItem]
    degraded: bool = Field(
        description="true when the feature store failed (defaults were used) or holds far less than "
        "it should (wiped, evicted, unknown rate far above the expected)"
    )
    degraded_reason: str | None = Field(
        description="timeout, connection, breaker_open, error, layout_mismatch, meta_missing, evicted, "
        "unknown_rate, history_malformed or history_missing; null when not degraded"
    )
    unknown_user: bool | None = Field(
        description="the feature store has no row for the user; null when the store did not answer"
    )
    unseen_context: list[str] = Field(
        description="context features whose (categorical) value training never saw: valid, scored "
        "as the unknown value"
    )


class ErrorDetail(BaseModel):
    loc: str
    type: str
    msg: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: str
    model_version: str | None = None


class FittedCombination(BaseModel):
    """The head combination fitted for the model's [objective] after training."""

    method: str = Field(description="product or sum")
    weights: dict[str, float] = Field(description="the fitted weight of each head (the largest 1)")
    objective: dict[str, Any] | None = Field(
        default=None, description="what it was fitted for: gain (column weights), group_by (the lists), k"
    )
    validation: dict[str, Any] | None = Field(
        default=None,
        description="on the validation lists: its ndcg@k, every weight 1's (default_ndcg@k), each head's "
        "alone, which was chosen (the searched weights or a simple combination) and the search's result",
    )


class Scoring(BaseModel):
    combine: str = Field(description="product or sum")
    weights: dict[str, float] = Field(description="the default weight of each head")
    weights_from: Literal["fitted", "settings", "default"] = Field(
        description="fitted: the model's fitted combination; settings: MTRANK_WEIGHTS; default: 1 per head"
    )
    weight_bounds: tuple[float, float] = Field(description="the range every weight must lie in")
    fitted: FittedCombination | None = Field(
        default=None, description="the combination fitted after training (null: the model has none)"
    )


class ModelStatus(BaseModel):
    """What a client may know of the served model: its version and the request contract (the heads
    ``weights`` may name, the features ``candidates[].features`` and ``context`` may carry)."""

    version: str | None = Field(description="the served model version; null while none is served")
    status: Literal["ready", "not_ready"]
    heads: list[str] = Field(description="the heads each item is scored by (empty while none is served)")
    features: dict[str, list[str]] = Field(
        description="feature names a request may send inline, by group: video, context"
    )
    scoring: Scoring | None = Field(description="how the heads are combined (null while none is served)")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Annotated[StrictStr, Field(min_length=1, max_length=200)] = Field(
        description="a model version id (a plain name as listed by `mtrank models`), never a path"
    )


class ModelSwitch(BaseModel):
    version: str
    previous: str | None
    changed: bool
    latest_updated: bool | None = Field(default=None, description="rollback: LATEST now names this version")
    announced: bool | None = Field(default=None, description="Redis mode: model:current set and published")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        413: "Body larger than max_body_bytes",
        415: "Body is not JSON",
        422: "Invalid request",
        503: "No model loaded yet",
    }.items()
}

EVENTS_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        401: "Missing or invalid bearer token (when MTRANK_EVENTS_TOKEN is set)",
        413: "Body larger than max_body_bytes",
        415: "Body is not JSON",
        422: "Invalid request",
        503: "The feature store cannot record events now (nothing recorded: retry)",
    }.items()
}

ADMIN_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Body could not be parsed",
        401: "Missing or invalid bearer token",
        404: "No such model version (or LATEST missing)",
        409: "Model version (or an unusable LATEST) rejected; the previous model keeps serving",
        413: "Body larger than max_body_bytes",
        422: "Invalid request",
        503: "Service starting",
    }.items()
}
