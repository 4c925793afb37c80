"""One error hierarchy for the service, mapped to HTTP responses in one place.

Every error response has the same JSON body::

    {"error": {"code": "validation_error", "message": "candidates[3]: ...", "details": [...]}}

``install_error_handlers(app)`` registers the mapping for ``ServiceError`` subclasses, FastAPI's
``RequestValidationError``, Starlette's ``HTTPException`` (unknown route, wrong method) and, as a
last resort, any other exception (500, logged; the input is never echoed back).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

log = logging.getLogger(__name__)

MAX_DETAILS = 20
MAX_MESSAGE_PARTS = 3


class ServiceError(StarletteHTTPException):
    """Base of every error the service maps to an HTTP response.

    A Starlette ``HTTPException`` so that framework code re-raises it untouched (e.g. the body
    limit tripping while FastAPI reads a body); its own handler below takes precedence.
    """

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        details: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(self.http_status, message, dict(headers) if headers else None)
        self.message = message
        self.details = list(details) if details else None


class BadRequest(ServiceError):
    """The request is well-formed HTTP but its content cannot be used."""

    http_status = 422
    code = "bad_request"


class ValidationFailed(BadRequest):
    code = "validation_error"


class Unauthorized(ServiceError):
    http_status = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    http_status = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request was valid but the model it names cannot be activated."""

    http_status = 409
    code = "model_rejected"


class PayloadTooLarge(ServiceError):
    http_status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    http_status = 415
    code = "unsupported_media_type"


class NotReady(ServiceError):
    http_status = 503
    code = "not_ready"


class EventsNotRecorded(ServiceError):
    """The feature store could not record a batch of events (nothing recorded: retry)."""

    http_status = 503
    code = "events_not_recorded"


class Overloaded(ServiceError):
    """Admission control: the worker already has as many /rank requests in flight as it may."""

    http_status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


# --------------------------------------------------------------------------------------------
# responses


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = list(details)[:MAX_DETAILS]
    body = orjson.dumps({"error": error}, option=orjson.OPT_NON_STR_KEYS, default=str)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def service_error_response(exc: ServiceError) -> Response:
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    503: "not_ready",
}


def install_error_handlers(app: FastAPI) -> None:
    """The one place errors become HTTP responses."""

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return service_error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, details = describe_validation_errors(exc.errors())
        return error_response(422, ValidationFailed.code, message, details)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, headers=exc.headers)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        # the client went away (or was dropped by the server's body deadline) mid-body: no one
        # reads this answer, and it is no server error
        log.info("client disconnected before sending the body of %s %s", request.method, request.url.path)
        return error_response(400, "client_disconnected", "the client disconnected before sending the body")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnect, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)


# --------------------------------------------------------------------------------------------
# pydantic errors -> one clear message

# Location segments pydantic adds for the members of a union ("candidates", 3, "constrained-int").
_TAG_NAMES = frozenset({"int", "str", "float", "bool", "bytes", "none", "list", "dict"})
_TAG_PREFIXES = (
    "constrained-",
    "function-",
    "lax-",
    "json-or-python",
    "nullable[",
    "list[",
    "dict[",
    "tagged-union",
)


def _is_tag(seg: object, model_tags: frozenset[str]) -> bool:
    return isinstance(seg, str) and (seg in _TAG_NAMES or seg in model_tags or seg.startswith(_TAG_PREFIXES))


MAX_LOC_SEGMENT = 64


def render_loc(loc: Sequence[Any]) -> str:
    """("body", "candidates", 3, "video_id") -> "candidates[3].video_id".

    A segment can be a key the client sent (``context.<key>``): long ones are cut short, so an
    error never echoes a huge key back.
    """
    out = ""
    for seg in loc:
        if seg == "body" and out == "":
            continue
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            name = str(seg)
            if len(name) > MAX_LOC_SEGMENT:
                name = name[: MAX_LOC_SEGMENT - 3] + "..."
            out += ("." if out else "") + name
    return out or "body"


def _hint(loc: Sequence[Any], hints: Mapping[str, str]) -> str | None:
    """The hint whose pattern matches ``loc``: "[*]" matches any index, "*" any key or field name."""
    tokens = ["[*]" if isinstance(seg, int) else str(seg) for seg in loc]
    if tokens[:1] == ["body"]:
        tokens = tokens[1:]
    for pattern, hint in hints.items():
        parts = re.findall(r"\[\*\]|[^.\[\]]+", pattern)
        if len(parts) == len(tokens) and all(
            p == t or (p == "*" and t != "[*]") for p, t in zip(parts, tokens, strict=True)
        ):
            return hint
    return None


def describe_validation_errors(
    errors: Sequence[Mapping[str, Any]],
    *,
    hints: Mapping[str, str] | None = None,
    model_tags: frozenset[str] = frozenset(),
) -> tuple[str, list[dict[str, Any]]]:
    """Pydantic errors -> (one-line message, details). Never includes the offending input.

    A value that fits no member of a union makes pydantic report one error per member; those are
    merged into one entry, with ``hints[pattern]`` (e.g. ``"candidates[*]"``) as its message when
    given. When the value went deeper into one member (an object with a bad field) only those
    deeper errors are kept.
    """
    hints = hints or {}
    merged: list[dict[str, Any]] = []
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    order: list[tuple[Any, ...]] = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        cut = next((i for i, seg in enumerate(loc) if _is_tag(seg, model_tags)), None)
        if cut is None:
            merged.append(_entry(loc, e))
            continue
        site = loc[:cut]
        if site not in groups:
            groups[site] = []
            order.append(site)
        groups[site].append({**e, "loc": loc})
    for site in order:
        errs = groups[site]
        deep = [e for e in errs if len(e["loc"]) > len(site) + 1]
        if deep:
            # the input took one branch (e.g. an object): report inside it, dropping the tag
            inner = [{**e, "loc": site + tuple(e["loc"][len(site) + 1 :])} for e in deep]
            merged.extend(describe_validation_errors(inner, hints=hints, model_tags=model_tags)[1])
        else:
            hint = _hint(site, hints)
            msgs = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in errs))
            merged.append(
                {
                    "loc": render_loc(site),
                    "type": "invalid_type" if hint else str(errs[0].get("type", "value_error")),
                    "msg": hint or " or ".join(msgs),
                }
            )
    parts = [
        f"{d['loc']}: {d['msg']}" if d["loc"] != "body" else d["msg"] for d in merged[:MAX_MESSAGE_PARTS]
    ]
    message = "; ".join(parts) or "invalid request"
    if len(merged) > MAX_MESSAGE_PARTS:
        message += f" (and {len(merged) - MAX_MESSAGE_PARTS} more errors)"
    return message, merged[:MAX_DETAILS]


def _entry(loc: tuple[Any, ...], e: Mapping[str, Any]) -> dict[str, Any]:
    kind = str(e.get("type", "value_error"))
    msg = str(e.get("msg", "invalid value"))
    if kind == "json_invalid":
        ctx = e.get("ctx") or {}
        msg = f"request body is not valid JSON: {ctx.get('error', msg)}"
        loc = loc[:1]  # FastAPI appends the character position, not a location in the body
    elif kind in ("model_type", "model_attributes_type", "dict_type") and all(s == "body" for s in loc):
        msg = "request body must be a JSON object"
    elif kind == "missing" and all(s == "body" for s in loc):
        msg = "request body is required: send a JSON object"
    return {"loc": render_loc(loc), "type": kind, "msg": msg}
