"""Fuzzing the HTTP API: no generated request may get a 5xx, and every 4xx says clearly why.

Three layers, all in-process against a tiny real checkpoint and the embedded feature store:

* schemathesis: requests generated from the app's own OpenAPI document (positive and negative
  data) for every operation, admin routes included; each response is checked for 5xx, for a
  documented status code, content type and headers, and against its documented schema;
* hypothesis: raw /rank bodies (valid-ish and malformed JSON, NaN/Infinity literals, huge ints,
  unicode and surrogate ids, invalid UTF-8, truncated or deeply nested JSON, wrong content
  types) and random paths and methods;
* explicit edge cases: 50 MB bodies, 100k candidates, NaN weights, huge ids, bad top_k, ...

Everything is derandomized (fixed seeds, no example database), so CI sees the same requests.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from modelkit import metric
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from model import read_latest
from service.app import create_app
from service.settings import Settings


def _undo_schemathesis_hypothesis_patches() -> None:
    """Importing schemathesis (its pytest plugin does, at startup) patches Hypothesis globals for
    the whole process: an example printer that prints nothing and a 4x example buffer. Every other
    Hypothesis test of the session would then report its falsifying example as ``arg=,``. Put
    Hypothesis' own objects back; schemathesis does not patch twice, its strategies work either way.
    """
    from hypothesis import core as hypothesis_core
    from hypothesis.internal import reflection
    from hypothesis.internal.conjecture import engine
    from hypothesis.strategies._internal import collections as hypothesis_collections
    from hypothesis.strategies._internal import core as strategies_core
    from hypothesis.vendor import pretty
    from schemathesis.core import INTERNAL_BUFFER_SIZE
    from schemathesis.generation.hypothesis import setup

    setup()  # apply its patches now (once), so that nothing re-applies them after this
    hypothesis_core.RepresentationPrinter = pretty.RepresentationPrinter  # type: ignore[misc]
    strategies_core.is_first_param_referenced_in_function = reflection.is_first_param_referenced_in_function
    for module in (hypothesis_core, engine, hypothesis_collections):
        if getattr(module, "BUFFER_SIZE", None) == INTERNAL_BUFFER_SIZE:
            module.BUFFER_SIZE = 8 * 1024  # Hypothesis' default


_undo_schemathesis_hypothesis_patches()

TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
MAX_BODY = 1 << 20  # the default max_body_bytes
MAX_CANDIDATES = 2000
VIDEOS = list(range(10, 60))  # in video_features_basic_pure.csv
HEADS = ("engagement", "satisfaction")

# deterministic and bounded: same examples on every run, nothing read from or written to a database
FUZZ = hsettings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def fuzz(max_examples: int) -> hsettings:
    return hsettings(FUZZ, max_examples=max_examples)


# A finite inline value beyond float32 (1e300) becomes +-inf in the canonical rows, which encoding
# treats as missing; numpy warns about the cast. That is the model's documented behaviour.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# generated requests per test, summed up in the terminal summary (run with -s to see it)
REQUESTS: Counter[str] = Counter()


def fuzz_settings(artifacts: Path) -> Settings:
    return Settings(
        artifacts=artifacts,
        feature_store="embedded",
        reload_interval_s=30.0,
        warmup_batch=16,
        admin_token=TOKEN,
        max_candidates=MAX_CANDIDATES,
        max_body_bytes=MAX_BODY,
        forward_workers=1,
    )


def private_artifacts(trained_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy: /admin/rollback rewrites LATEST (to the same version, but still)."""
    dst = tmp_path_factory.mktemp("fuzz") / "artifacts"
    shutil.copytree(trained_artifacts, dst)
    return dst


@pytest.fixture(scope="module")
def client(trained_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(fuzz_settings(private_artifacts(trained_artifacts, tmp_path_factory)))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def api_schema(
    trained_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[schemathesis.BaseSchema]:
    """The app's OpenAPI document; schemathesis calls the app in-process (it runs the lifespan)."""
    app = create_app(fuzz_settings(private_artifacts(trained_artifacts, tmp_path_factory)))
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        schemathesis_asgi.shutdown_lifespans()


@pytest.fixture(scope="module", autouse=True)
def report_request_count() -> Iterator[None]:
    yield
    if REQUESTS:
        lines = "\n".join(f"  {n:6d}  {name}" for name, n in sorted(REQUESTS.items()))
        print(f"\nfuzzed requests: {sum(REQUESTS.values())}\n{lines}")


def assert_clear_error(status: int, content: bytes, content_type: str | None) -> None:
    """Never a 5xx; any 4xx is the service's JSON error body with a code and a message."""
    assert status < 500, (status, content[:500])
    if status < 400:
        return
    assert (content_type or "").startswith("application/json"), (status, content_type, content[:300])
    error = json.loads(content)["error"]
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"].strip(), error


def post_rank(client: TestClient, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    r = client.post("/rank", content=raw, headers=JSON)
    assert_clear_error(r.status_code, r.content, r.headers.get("content-type"))
    out: dict[str, Any] = r.json()
    return r.status_code, out


def rank_error(client: TestClient, body: Any, status: int = 422) -> str:
    code, out = post_rank(client, body)
    assert code == status, out
    message: str = out["error"]["message"]
    return message


# --------------------------------------------------------------------------------------------
# schemathesis: requests generated from the OpenAPI document

SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Not checked: positive_data_acceptance. The document cannot say everything /rank enforces: ids
# are strict JSON integers (JSON Schema calls 5.0 an integer), candidate ids are unique as strings
# (uniqueItems cannot say that 5 and "5" are one id; the description does), top_k is at
# most the number of candidates, weights name this model's heads; version ids match a pattern.
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
SCHEMA_RUNS = [
    ("POST", "/rank", POSITIVE, 350),
    ("POST", "/rank", NEGATIVE, 350),
    ("POST", "/events", POSITIVE, 150),
    ("POST", "/events", NEGATIVE, 150),
    ("POST", "/admin/rollback", POSITIVE, 100),
    ("POST", "/admin/rollback", NEGATIVE, 100),
    ("POST", "/admin/reload", POSITIVE, 10),
    ("POST", "/admin/reload", NEGATIVE, 50),
    # no parameters: one request each
    ("GET", "/healthz", POSITIVE, 5),
    ("GET", "/readyz", POSITIVE, 5),
    ("GET", "/model", POSITIVE, 5),
    ("GET", "/admin/model", POSITIVE, 5),
    ("GET", "/metrics", POSITIVE, 5),
]


def test_the_schema_runs_cover_every_operation(api_schema: schemathesis.BaseSchema) -> None:
    ops = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert ops == {(m, p) for m, p, _, _ in SCHEMA_RUNS}


@pytest.mark.parametrize(
    ("method", "path", "mode", "examples"),
    SCHEMA_RUNS,
    ids=[f"{m} {p} {mode.value}" for m, p, mode, _ in SCHEMA_RUNS],
)
@pytest.mark.slow
def test_schema_generated_requests(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode, examples: int
) -> None:
    operation = api_schema[path][method]
    statuses: Counter[int] = Counter()
    checks = SCHEMA_CHECKS + ([negative_data_rejection] if mode is NEGATIVE else [])

    @fuzz(examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTH)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks)
        ctype = next((v[0] for k, v in response.headers.items() if k.lower() == "content-type" and v), None)
        assert_clear_error(response.status_code, response.content, ctype)

    run()
    REQUESTS[f"schemathesis {method} {path} {mode.value}"] += statuses.total()
    assert not any(code >= 500 for code in statuses), statuses
    if path == "/rank":
        assert statuses.total() >= examples * 0.9, statuses
        if mode is POSITIVE:  # the generator gets past validation into scoring, not only 422s
            assert statuses[200] >= examples * 0.05, statuses


# --------------------------------------------------------------------------------------------
# hypothesis: raw /rank bodies

BIG_INTS = [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, 10**308, 10**309, -(10**400)]
WEIRD_TEXT = ["", " ", "视频🙂", "\x00", "\ud800", "\udfff", "\u202e", "e\u0301", "a" * 256, "a" * 257]
WEIRD_TEXT += ["🙂" * 256, "NaN", "null", "1", "-0", "1e999", "\\", '"', "\ufeff"]
FEATURES = ["video_duration", "music_type", "author_id", "video_type", "upload_type", "tab", "hour"]

ints = st.one_of(
    st.integers(-5, 100),
    st.integers(),
    st.integers(2**62, 2**65) | st.integers(-(2**65), -(2**62)),
    st.sampled_from(BIG_INTS),
)
floats = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 1.0, 2.5])
texts = st.text(max_size=10) | st.sampled_from(WEIRD_TEXT)
scalars = st.none() | st.booleans() | ints | floats | texts
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)
ids = ints | texts | garbage
# values at the edges of what a feature can hold (a numeric feature goes through float())
EDGE_VALUES = [*BIG_INTS, 2**1023, 2**1024, 1e308, -1e308, 5e-324, "1e400", "nan", "-inf", "12000", True]
VALID_TEXT = [t for t in WEIRD_TEXT if t not in ("\ud800", "\udfff")]  # lone surrogates: not JSON
feature_values = st.sampled_from(EDGE_VALUES) | st.sampled_from(EDGE_VALUES) | st.sampled_from(VALID_TEXT)
feature_values |= st.none() | st.booleans() | ints | floats | st.text(max_size=10)
feature_maps = st.dictionaries(st.sampled_from(FEATURES) | texts, scalars | garbage, max_size=4)
candidate = st.one_of(
    ids,
    st.fixed_dictionaries({"video_id": ids}, optional={"features": feature_maps | garbage, "x": garbage}),
    st.fixed_dictionaries({"id": ids}, optional={"video_id": ids}),
)
malformed_bodies = st.fixed_dictionaries(
    {},
    optional={
        "user_id": ids,
        "candidates": st.lists(candidate, max_size=6) | garbage,
        "context": st.dictionaries(st.sampled_from(["tab", "hour"]) | texts, scalars | garbage, max_size=3)
        | garbage,
        "top_k": ints | garbage,
        "weights": st.dictionaries(st.sampled_from(HEADS) | texts, floats | ints | garbage, max_size=3)
        | garbage,
        "extra": garbage,
    },
)


@st.composite
def valid_ish_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid requests (known and unknown videos, inline features), with the odd bad value."""
    n = draw(st.integers(1, 12))
    vids: list[Any] = draw(
        st.lists(st.sampled_from(VIDEOS) | st.integers(10**6, 10**7), min_size=n, max_size=n, unique=True)
    )
    cands: list[Any] = []
    for v in vids:
        kind = draw(st.sampled_from(["int", "str", "object", "features", "features"]))
        if kind == "str":
            cands.append(str(v) + draw(st.sampled_from(["", "视频🙂", "\x00"])))
        elif kind == "object":
            cands.append({"video_id": v})
        elif kind == "features":
            feats = st.dictionaries(st.sampled_from(FEATURES), feature_values, min_size=1, max_size=3)
            cands.append({"id": v, "features": draw(feats)})
        else:
            cands.append(v)
    body: dict[str, Any] = {
        "user_id": draw(st.sampled_from([1, 2, 987654321]) | st.integers(0, 30) | ids),
        "candidates": cands,
    }
    if draw(st.booleans()):
        body["context"] = {
            "tab": draw(st.integers(0, 10) | feature_values),
            "hour": draw(st.integers(0, 23) | feature_values),
        }
    if draw(st.booleans()):
        body["top_k"] = draw(st.integers(1, n) | st.integers(1, n) | ints)
    if draw(st.booleans()):
        body["weights"] = draw(st.dictionaries(st.sampled_from(HEADS), st.floats(0, 10) | floats, min_size=1))
    return body


JSON_TYPES = [
    None,  # lenient: read as JSON
    "application/json",
    "application/json; charset=utf-8",
    "application/problem+json",
    "APPLICATION/JSON",
]
OTHER_TYPES = [
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "",
    "application/jsonx",
]


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, str | None]:
    # weighted towards bodies that get past the JSON and schema checks: the deeper paths matter most
    body = draw(st.sampled_from([valid_ish_bodies()] * 2 + [malformed_bodies, garbage]).flatmap(lambda s: s))
    text = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8
    mutation = draw(st.sampled_from(["none"] * 18 + ["truncate", "insert", "replace", "nest", "wrap", "bom"]))
    if mutation == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif mutation in ("insert", "replace"):
        at = draw(st.integers(0, len(raw)))
        junk = draw(
            st.binary(min_size=1, max_size=4) | st.sampled_from([b"\xff", b"\xc3", b"NaN", b"[", b"}"])
        )
        raw = raw[:at] + junk + raw[at + (len(junk) if mutation == "replace" else 0) :]
    elif mutation == "nest":
        depth = draw(st.sampled_from([100, 1000, 20_000]))
        raw = b'{"user_id": 1, "candidates": [1], "context": {"tab": ' + b"[" * depth + b"]" * depth + b"}}"
    elif mutation == "wrap":
        raw = b"[" + raw + b"]"
    elif mutation == "bom":
        raw = b"\xef\xbb\xbf" + raw
    ctype = draw(st.sampled_from(JSON_TYPES * 3 + OTHER_TYPES))
    return raw, ctype


@pytest.mark.slow
@fuzz(500)
@given(request=raw_requests())
def test_raw_rank_bodies_get_200_or_a_clear_4xx(
    client: TestClient, request: tuple[bytes, str | None]
) -> None:
    raw, ctype = request
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.post("/rank", content=raw, headers=headers)
    REQUESTS["hypothesis raw POST /rank"] += 1
    assert_clear_error(r.status_code, r.content, r.headers.get("content-type"))
    assert r.status_code in (200, 415, 422), (r.status_code, raw[:300], r.text[:300])
    if r.status_code == 415:
        assert ctype is not None and "application/json" in r.json()["error"]["message"]
    if r.status_code == 200:
        sent = json.loads(raw)
        items = r.json()["items"]
        assert len(items) == (sent.get("top_k") or len(sent["candidates"]))
        assert [i["rank"] for i in items] == list(range(1, len(items) + 1))
        assert all(math.isfinite(i["score"]) and set(i["heads"]) == set(HEADS) for i in items)
        assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
        sent_ids = set()  # ids come back exactly as sent (int or string)
        for c in sent["candidates"]:
            keys = [c.get("video_id"), c.get("id")] if isinstance(c, dict) else [c]
            sent_ids.update(json.dumps(k) for k in keys)
        assert {json.dumps(i["video_id"]) for i in items} <= sent_ids


EDGE_TARGETS = {
    "numeric feature": "video_duration",
    "categorical feature": "music_type",
    "unknown feature": "not_a_feature",  # undeclared: 422 whatever its value (strict_features)
    "context": "tab",
}


@pytest.mark.parametrize("where", list(EDGE_TARGETS))
def test_every_edge_value_gets_200_or_a_422_naming_the_feature(client: TestClient, where: str) -> None:
    name = EDGE_TARGETS[where]
    outcomes: Counter[int] = Counter()
    for value in [*EDGE_VALUES, *VALID_TEXT, math.nan, math.inf, -0.0, [], {}, [1], {"a": None}]:
        body: dict[str, Any] = {"user_id": 1, "candidates": [10, {"video_id": 11, "features": {name: value}}]}
        if where == "context":
            body = {"user_id": 1, "candidates": [10, 11], "context": {name: value}}
        code, out = post_rank(client, body)
        outcomes[code] += 1
        if code == 422:
            message = out["error"]["message"]
            assert name in message and ("context" if where == "context" else "candidates[1]") in message, (
                message
            )
        else:
            assert code == 200 and all(math.isfinite(i["score"]) for i in out["items"]), out
    if where == "unknown feature":
        assert set(outcomes) == {422}, outcomes
    else:
        assert outcomes[200] and outcomes[422], outcomes
    REQUESTS["edge values"] += outcomes.total()


@fuzz(200)
@given(
    features=st.dictionaries(
        st.sampled_from([*FEATURES, "user_active_degree", "not_a_feature"]),
        feature_values,
        min_size=1,
        max_size=4,
    ),
    context=st.dictionaries(st.sampled_from(["tab", "hour", "not_a_feature"]), feature_values, max_size=2),
    pos=st.integers(0, 4),
)
@pytest.mark.slow
def test_edge_feature_values_get_200_or_a_422_naming_the_feature(
    client: TestClient, features: dict[str, Any], context: dict[str, Any], pos: int
) -> None:
    """An otherwise valid request with edge feature values: scored, or a 422 saying which feature."""
    cands: list[Any] = list(VIDEOS[:5])
    cands[pos] = {"video_id": cands[pos], "features": features}
    code, out = post_rank(client, {"user_id": 1, "candidates": cands, "context": context})
    REQUESTS["hypothesis edge feature values"] += 1
    if code == 422:
        message = out["error"]["message"]
        assert any(f"candidates[{pos}]" in message and name in message for name in features) or any(
            "context" in message and name in message for name in context
        ), message
    else:
        assert code == 200, out
        assert all(math.isfinite(i["score"]) for i in out["items"])


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
PATHS = [
    "/rank",
    "/healthz",
    "/readyz",
    "/model",
    "/metrics",
    "/admin/model",
    "/admin/reload",
    "/admin/rollback",
    "/docs",
]
ADMIN_ROUTES = {"/admin/model": "GET", "/admin/reload": "POST", "/admin/rollback": "POST"}
path_segments = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8).map(
    lambda seg: quote(seg, safe="")
)


@fuzz(150)
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(PATHS)
    | st.lists(path_segments, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)),
    query=st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3),
    token=st.sampled_from([None, TOKEN, "wrong", ""]),
    body=st.none() | st.binary(max_size=64),
)
def test_random_routes_methods_and_tokens_never_500(
    client: TestClient, method: str, path: str, query: dict[str, str], token: str | None, body: bytes | None
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    r = client.request(method, path, params=query, headers=headers, content=body)
    REQUESTS["hypothesis random routes"] += 1
    if method == "HEAD":
        assert r.status_code < 500
        return
    if r.status_code >= 400 or path.startswith("/admin"):
        assert_clear_error(r.status_code, r.content, r.headers.get("content-type"))
    assert r.status_code < 500, (method, path, r.text[:300])
    if ADMIN_ROUTES.get(path) == method and token != TOKEN:
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


# --------------------------------------------------------------------------------------------
# explicit edge cases

FIFTY_MB = 50 * 1024 * 1024
CHUNK = 64 * 1024


def asgi_post(client: TestClient, path: str, total: int, headers: dict[str, str]) -> tuple[int, Any, int]:
    """POST ``total`` bytes to the running app as a server would: 64 KiB ``http.request`` messages
    pulled one at a time (the TestClient reads a streamed body whole before sending it).
    Returns (status, JSON body, number of body messages the app pulled)."""
    pulled = 0
    block = b" " * CHUNK  # JSON whitespace: only the size can be wrong
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        sent = pulled * CHUNK
        if sent >= total:
            return {"type": "http.disconnect"}
        pulled += 1
        n = min(CHUNK, total - sent)
        return {"type": "http.request", "body": block[:n], "more_body": sent + n < total}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None  # the TestClient's event loop, where the app's lifespan runs
    client.portal.call(client.app, scope, receive, send)
    return int(out["status"]), json.loads(out["body"]), pulled


# what a request that reached the feature store, the model or the model loader leaves in /metrics
WORK_METRICS: list[tuple[str, dict[str, str]]] = [
    ("mtrank_feature_fetch_seconds_count", {}),
    ("mtrank_model_forward_seconds_count", {}),
    ("mtrank_candidates_scored_total", {}),
    ("mtrank_unknown_users_total", {}),
    ("mtrank_unknown_videos_total", {}),
    ("mtrank_model_reload_total", {"result": "ok"}),
    ("mtrank_model_reload_total", {"result": "error"}),
]


def work_done(client: TestClient) -> dict[str, float]:
    """Counters of fetches, forwards, scored candidates and model (re)loads so far."""
    return {name + str(labels): metric(client, name, **labels) for name, labels in WORK_METRICS}


@pytest.mark.parametrize("path", ["/rank", "/admin/rollback"])
def test_50mb_body_with_content_length_is_413_before_reading_it(client: TestClient, path: str) -> None:
    work0, invalid0 = work_done(client), metric(client, "mtrank_rank_requests_total", outcome="invalid")
    headers = {**JSON, **AUTH, "content-length": str(FIFTY_MB)}
    status, body, pulled = asgi_post(client, path, FIFTY_MB, headers)
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large" and "max_body_bytes" in body["error"]["message"]
    assert pulled == 0  # rejected on the header alone
    # the same through the test client
    r = client.post(path, content=b"{" + b" " * MAX_BODY + b"}", headers={**JSON, **AUTH})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert work_done(client) == work0  # nothing was fetched, scored or loaded
    # a /rank refused by the middleware counts as invalid, as one the route refuses does
    invalid = metric(client, "mtrank_rank_requests_total", outcome="invalid")
    assert invalid == invalid0 + (2 if path == "/rank" else 0)


@pytest.mark.parametrize("path", ["/rank", "/admin/rollback"])
def test_50mb_streamed_body_without_content_length_is_413_after_the_limit(
    client: TestClient, path: str
) -> None:
    work0, invalid0 = work_done(client), metric(client, "mtrank_rank_requests_total", outcome="invalid")
    headers = {**JSON, **AUTH, "transfer-encoding": "chunked"}
    status, body, pulled = asgi_post(client, path, FIFTY_MB, headers)
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large"
    # stopped reading just past max_body_bytes: the 50 MB are never buffered
    assert pulled == MAX_BODY // CHUNK + 1
    assert work_done(client) == work0  # nothing was fetched, scored or loaded
    if path == "/rank":  # refused inside the route while streaming: counted there
        assert metric(client, "mtrank_rank_requests_total", outcome="invalid") == invalid0 + 1


def test_body_just_under_the_limit_is_parsed(client: TestClient) -> None:
    raw = b'{"user_id": 1, "candidates": [10, 11]}'
    raw += b" " * (MAX_BODY - len(raw))
    assert post_rank(client, raw)[0] == 200
    assert rank_error(client, raw + b" ", 413)


def test_100k_candidates_are_a_422_before_any_fetch_or_scoring(client: TestClient) -> None:
    raw = json.dumps({"user_id": 1, "candidates": list(range(100_000))}).encode()
    assert len(raw) < MAX_BODY  # reaches the candidate check, not the body limit
    work0, invalid0 = work_done(client), metric(client, "mtrank_rank_requests_total", outcome="invalid")
    message = rank_error(client, raw)
    assert f"candidates: too many (more than {MAX_CANDIDATES}); at most {MAX_CANDIDATES}" in message
    assert metric(client, "mtrank_rank_requests_total", outcome="invalid") == invalid0 + 1
    # as objects the same list is larger than max_body_bytes: 413
    assert rank_error(client, {"user_id": 1, "candidates": [{"id": i} for i in range(100_000)]}, 413)
    assert work_done(client) == work0  # rejected before the feature store and the model
    # the counters do move for a request that is scored
    assert post_rank(client, {"user_id": 1, "candidates": VIDEOS[:3]})[0] == 200
    work1 = work_done(client)
    assert work1["mtrank_candidates_scored_total{}"] == work0["mtrank_candidates_scored_total{}"] + 3
    assert work1["mtrank_feature_fetch_seconds_count{}"] == work0["mtrank_feature_fetch_seconds_count{}"] + 1


NAN_BODIES = [
    ("user_id", b'{"user_id": NaN, "candidates": [1]}', "user_id"),
    ("candidate", b'{"user_id": 1, "candidates": [1, Infinity]}', "candidates[1]"),
    ("top_k", b'{"user_id": 1, "candidates": [1], "top_k": NaN}', "top_k"),
    (
        "weights NaN",
        b'{"user_id": 1, "candidates": [1], "weights": {"engagement": NaN}}',
        "weights.engagement",
    ),
    (
        "weights -Infinity",
        b'{"user_id": 1, "candidates": [1], "weights": {"satisfaction": -Infinity}}',
        "finite",
    ),
    ("context", b'{"user_id": 1, "candidates": [1], "context": {"tab": Infinity}}', "context.tab"),
    (
        "feature NaN",
        b'{"user_id": 1, "candidates": [{"video_id": 10, "features": {"video_duration": NaN}}]}',
        "candidates[0].features.video_duration",
    ),
    (
        "feature Infinity",
        b'{"user_id": 1, "candidates": [10, {"video_id": 11, "features": {"video_duration": Infinity}}]}',
        "candidates[1].features.video_duration",
    ),
    ("1e999 weight", b'{"user_id": 1, "candidates": [1], "weights": {"engagement": 1e999}}', "weights"),
]


@pytest.mark.parametrize(("name", "raw", "where"), NAN_BODIES, ids=[b[0] for b in NAN_BODIES])
def test_nan_and_infinity_literals_are_422(client: TestClient, name: str, raw: bytes, where: str) -> None:
    assert where in rank_error(client, raw)


UNICODE_IDS = ["视频🙂", "\x00", "\u202eevil", "e\u0301", "\ufeff", "🙂" * 256, " ", "\\u0000", "null"]


def test_unicode_ids_are_ranked_with_default_features(client: TestClient) -> None:
    code, out = post_rank(client, {"user_id": "视频🙂\x00", "candidates": [*UNICODE_IDS, 10]})
    assert code == 200, out
    assert sorted(i["video_id"] for i in out["items"] if isinstance(i["video_id"], str)) == sorted(
        UNICODE_IDS
    )
    # raw UTF-8 on the wire (not \u escapes) means the same
    raw = json.dumps({"user_id": 1, "candidates": ["视频🙂", "\x00"]}, ensure_ascii=False).encode()
    code, out = post_rank(client, raw)
    assert code == 200 and {i["video_id"] for i in out["items"]} == {"视频🙂", "\x00"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"user_id": "\\ud800", "candidates": [1]}', "not valid JSON"),  # lone surrogate escape
        ('{"user_id": 1, "candidates": ["\ud800"]}'.encode("utf-8", "surrogatepass"), ""),
        (b'{"user_id": 1, "candidates": ["\xff\xfe"]}', ""),
        (b'{"user_id": 1, "candidates": [""]}', "candidates[0]: must be a video id"),
        (('{"user_id": "' + "🙂" * 257 + '", "candidates": [1]}').encode(), "at most 256 characters"),
    ],
    ids=["escaped lone surrogate", "raw lone surrogate", "invalid utf-8", "empty id", "257 emoji"],
)
def test_malformed_unicode_ids_are_422(client: TestClient, raw: bytes, message: str) -> None:
    assert message in rank_error(client, raw)


@pytest.mark.parametrize(
    "user_id", [10**30, 2**63, -(2**63) - 1, -(10**400)], ids=["1e30", "2^63", "-2^63-1", "-1e400"]
)
def test_user_ids_outside_int64_are_422(client: TestClient, user_id: int) -> None:
    assert "user_id: must be an integer id" in rank_error(client, {"user_id": user_id, "candidates": [10]})


@pytest.mark.parametrize("user_id", [2**63 - 1, -(2**63), 0, "10" * 128])
def test_user_ids_at_the_limits_are_accepted(client: TestClient, user_id: int | str) -> None:
    assert post_rank(client, {"user_id": user_id, "candidates": [10, 11]})[0] == 200


@pytest.mark.parametrize(
    "context",
    [
        {"tab": {"a": 1}},
        {"tab": [1, 2]},
        {"hour": {"nested": {"deeper": [1]}}},
        {"tab": []},
        {"tab": 10**400},
    ],
    ids=["object", "list", "deep", "empty list", "huge int"],
)
def test_nested_context_values_are_a_clear_422(client: TestClient, context: dict[str, Any]) -> None:
    (key,) = context
    message = rank_error(client, {"user_id": 1, "candidates": [10], "context": context})
    assert message.startswith(f"context.{key}: must be a string, a finite number"), message


TOP_KS: list[Any] = [0, -1, 10**20, 10**400, -(10**20), True, 1.0, 1.5, "1", [1], {"k": 1}, math.nan]


@pytest.mark.parametrize("top_k", TOP_KS, ids=[f"top_k={str(k)[:12]}" for k in TOP_KS])
def test_bad_top_k_is_422(client: TestClient, top_k: Any) -> None:
    assert "top_k" in rank_error(client, {"user_id": 1, "candidates": [10, 11], "top_k": top_k})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("long", "video feature 'video_duration' must be a number, got 'long'"),
        ("1e400", "video feature 'video_duration' must be finite"),
        (True, "video feature 'video_duration' must be a number, got bool"),
        ("nan", "video feature 'video_duration' must be finite"),
        ([1], "candidates[1].features.video_duration: must be a string, a finite number"),
        ({"a": 1}, "candidates[1].features.video_duration: must be a string, a finite number"),
        (10**400, "candidates[1].features.video_duration: must be a string, a finite number"),
        (-(2**1100), "candidates[1].features.video_duration: must be a string, a finite number"),
    ],
    ids=["word", "string 1e400", "bool", "string nan", "list", "object", "huge int", "huge negative int"],
)
def test_bad_inline_numeric_features_are_422_naming_the_feature(
    client: TestClient, value: Any, message: str
) -> None:
    cands = [10, {"video_id": 11, "features": {"video_duration": value}}]
    assert message in rank_error(client, {"user_id": 1, "candidates": cands})


EXTREME: list[Any] = [10**30, -(10**30), 3e38, 0, -0.0, 5e-324, None, "12000", "-1e30"]


@pytest.mark.parametrize("value", EXTREME, ids=[f"{type(v).__name__}:{str(v)[:12]}" for v in EXTREME])
def test_extreme_but_finite_inline_features_are_scored(client: TestClient, value: Any) -> None:
    cands = [10, {"video_id": 11, "features": {"video_duration": value, "music_type": value}}]
    code, out = post_rank(client, {"user_id": 1, "candidates": cands})
    assert code == 200, out
    assert all(math.isfinite(i["score"]) for i in out["items"])


BEYOND_FLOAT32: list[Any] = [1e300, -1e39, 2**1000, "-1e300"]


@pytest.mark.parametrize(
    "value", BEYOND_FLOAT32, ids=[f"{type(v).__name__}:{str(v)[:12]}" for v in BEYOND_FLOAT32]
)
def test_numeric_features_beyond_float32_are_422_not_silently_missing(client: TestClient, value: Any) -> None:
    cands = [10, {"video_id": 11, "features": {"video_duration": value}}]
    message = rank_error(client, {"user_id": 1, "candidates": cands})
    assert "video_duration" in message and "out of range" in message


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"user_id": 1, "candidates": [1], "context": {"tab": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}",
        b'{"user_id": 1, "candidates": [1], "context": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_001,
        b'{"user_id": 1, "candidates": [' + b"[" * 100_000,  # unterminated as well
    ],
    ids=["10k lists", "10k lists in context", "10k objects", "100k unterminated"],
)
def test_deeply_nested_json_is_422_not_a_recursion_crash(client: TestClient, raw: bytes) -> None:
    assert "not valid JSON" in rank_error(client, raw)


def test_deeply_nested_json_on_admin_rollback_is_a_clear_4xx(client: TestClient) -> None:
    r = client.post("/admin/rollback", content=b"[" * 10_000 + b"]" * 10_000, headers={**JSON, **AUTH})
    assert 400 <= r.status_code < 500
    assert_clear_error(r.status_code, r.content, r.headers.get("content-type"))


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/xml", "multipart/form-data; boundary=x", "", "application/jsonx"]
)
def test_wrong_content_types_are_415(client: TestClient, ctype: str) -> None:
    r = client.post("/rank", content=b'{"user_id": 1, "candidates": [10]}', headers={"content-type": ctype})
    assert r.status_code == 415 and "send application/json" in r.json()["error"]["message"]


def test_duplicate_and_extra_keys(client: TestClient) -> None:
    cands = [10, "10", {"video_id": 10}]
    assert "duplicate video ids '10'" in rank_error(client, {"user_id": 1, "candidates": cands})
    assert "foo: Extra inputs" in rank_error(client, {"user_id": 1, "candidates": [10], "foo": [None]})
    long_key = "h" * 100_000  # keys are at most 128 characters, and not echoed back whole
    message = rank_error(client, {"user_id": 1, "candidates": [10], "weights": {long_key: 1.0}})
    assert message.startswith("weights.hhh") and "at most 128 characters" in message and len(message) < 500
    message = rank_error(client, {"user_id": 1, "candidates": [10], "context": {long_key: 1}})
    assert message.startswith("context.hhh") and len(message) < 500


def test_admin_requests_with_bad_tokens_or_bodies(client: TestClient, trained_artifacts: Path) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": ""},
    ):
        r = client.post("/admin/reload", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
    version = read_latest(trained_artifacts)
    cases: list[tuple[bytes, int, str]] = [
        (json.dumps({"version": version}).encode(), 200, ""),
        (b'{"version": "no-such-version"}', 404, "not found"),
        (b'{"version": "../../etc"}', 422, "never a path"),
        (b'{"version": "\\u0000"}', 422, "not a model version id"),
        (b'{"version": "\\ud800"}', 422, "version: Input should be a valid string"),
        (b'{"version": 1}', 422, "version"),
        (b"", 422, "request body is required"),
        (b"{", 422, "request body is not valid JSON"),
        (b"\xff\xfe", 422, "request body is not valid JSON"),
    ]
    for raw, status, message in cases:
        r = client.post("/admin/rollback", content=raw, headers={**JSON, **AUTH})
        assert r.status_code == status, (raw, r.text)
        assert_clear_error(r.status_code, r.content, r.headers.get("content-type"))
        if status != 200:
            assert message in r.json()["error"]["message"], r.text
    assert client.post("/admin/reload", headers=AUTH).json()["changed"] is False
