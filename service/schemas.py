"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any

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


class Candidate(BaseModel):
    """A candidate with inline features; they override the feature store's values for it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    video_id: EntityId = Field(validation_alias=AliasChoices("video_id", "id"))
    features: dict[Annotated[str, Field(max_length=128)], RawValue] = Field(
        default_factory=dict,
        max_length=256,
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
        description="video ids, or objects with inline features; at most max_candidates, no duplicates",
    )
    context: dict[Annotated[str, Field(max_length=128)], RawValue] = Field(
        default_factory=dict,
        max_length=256,
        description="raw values of the model's context features (GET /model lists them)",
    )
    top_k: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="return the best k (1..number of candidates); default: all"
    )
    weights: dict[Annotated[str, Field(max_length=128)], Number] | None = Field(
        default=None,
        max_length=64,
        description="per-head weights (the served model's heads) overriding the service's, within its bounds",
    )


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
        description="timeout, connection, breaker_open, error, layout_mismatch, meta_missing, evicted "
        "or unknown_rate; null when not degraded"
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
