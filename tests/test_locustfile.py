"""Tests of the /rank load test: the workload/validation functions in-process, the locustfile itself in
subprocesses (importing locust runs gevent's monkey.patch_all(), which must not leak into this pytest run),
including short headless runs against a stub /rank server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
WORKLOAD = ROOT / "loadtest" / "workload.py"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


wl = _load(WORKLOAD, "mtrank_loadtest_workload")


# --------------------------------------------------------------------------- request building


@pytest.fixture(scope="module")
def videos() -> Any:
    return wl.ZipfSampler(np.arange(1000, 3000), s=1.0)


def test_build_request_shape(videos: Any) -> None:
    rng = np.random.default_rng(1)
    users = np.array([7, 11, 13])
    req = wl.build_request(rng, users, videos, 250)
    assert set(req) == {"user_id", "candidates", "context"}
    assert req["user_id"] in {7, 11, 13} and type(req["user_id"]) is int
    cands = req["candidates"]
    assert len(cands) == 250 == len(set(cands))
    assert all(type(c) is int and 1000 <= c < 3000 for c in cands)
    assert 0 <= req["context"]["tab"] <= 14 and 0 <= req["context"]["hour"] <= 23
    json.dumps(req)  # plain Python types only: no numpy scalars
    assert wl.build_request(rng, users, videos, 10, top_k=5)["top_k"] == 5


def test_build_request_is_reproducible_and_varies(videos: Any) -> None:
    users = np.arange(100)
    a = wl.build_request(np.random.default_rng(5), users, videos, 100)
    b = wl.build_request(np.random.default_rng(5), users, videos, 100)
    assert a == b
    rng = np.random.default_rng(5)
    reqs = [wl.build_request(rng, users, videos, 100) for _ in range(50)]
    assert len({r["user_id"] for r in reqs}) > 20
    assert len({r["context"]["hour"] for r in reqs}) > 10
    assert len({tuple(r["candidates"]) for r in reqs}) == 50


def test_build_request_rejects_more_candidates_than_catalog(videos: Any) -> None:
    with pytest.raises(ValueError):
        wl.build_request(np.random.default_rng(0), [1], videos, len(videos) + 1)


def test_candidate_count() -> None:
    rng = np.random.default_rng(0)
    assert wl.candidate_count(rng, 300) == 300
    sizes = [wl.candidate_count(rng) for _ in range(2000)]
    assert min(sizes) >= 100 and max(sizes) <= 1000
    assert min(sizes) < 150 and max(sizes) > 950  # covers the whole range
    with pytest.raises(ValueError):
        wl.candidate_count(rng, 0)


def test_env_parsing() -> None:
    assert wl.env_int("X", {}) is None
    assert wl.env_int("X", {"X": " 250 "}) == 250
    assert wl.env_float("X", 100.0, {}) == 100.0
    assert wl.env_float("X", 100.0, {"X": "42.5"}) == 42.5
    with pytest.raises(ValueError, match="X"):
        wl.env_int("X", {"X": "many"})


# --------------------------------------------------------------------------- Zipf sampler


def test_zipf_popular_items_are_sampled_more_often() -> None:
    items = np.arange(500, 1500)  # popularity order: 500 is the head, 1499 the tail
    sampler = wl.ZipfSampler(items, s=1.0)
    rng = np.random.default_rng(0)
    counts: Counter[int] = Counter()
    for _ in range(400):
        draw = sampler.sample(rng, 100)
        assert len(set(draw.tolist())) == 100  # without replacement
        assert set(draw.tolist()) <= set(items.tolist())
        counts.update(draw.tolist())
    head = sum(counts[i] for i in range(500, 510))
    tail = sum(counts[i] for i in range(1490, 1500))
    assert counts[500] > 0.9 * 400  # the most popular video is in nearly every candidate list
    assert head > 10 * tail
    deciles = [sum(counts[i] for i in range(lo, lo + 100)) for lo in range(500, 1500, 100)]
    assert deciles == sorted(deciles, reverse=True)


def test_zipf_exponent_zero_is_uniform() -> None:
    sampler = wl.ZipfSampler(np.arange(100), s=0.0)
    rng = np.random.default_rng(0)
    counts = Counter(v for _ in range(2000) for v in sampler.sample(rng, 10).tolist())
    # 2000 draws of 10 from 100: each item expected 200 times (sd ~13.4); allow 4.5 sd
    assert len(counts) == 100 and all(140 <= c <= 260 for c in counts.values())
    head, tail = sum(counts[i] for i in range(10)), sum(counts[i] for i in range(90, 100))
    assert abs(head / tail - 1) < 0.15


def test_zipf_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        wl.ZipfSampler([], s=1.0)
    with pytest.raises(ValueError):
        wl.ZipfSampler([1, 2], s=-1.0)
    with pytest.raises(ValueError):
        wl.ZipfSampler([1, 2], s=1.0).sample(np.random.default_rng(0), 0)


# --------------------------------------------------------------------------- catalog


def test_load_catalog_from_real_data() -> None:
    data_dir = wl.resolve_data_dir()
    assert (data_dir / wl.VIDEO_TABLE).exists(), f"KuaiRand-Pure tables not found under {data_dir}"
    cat = wl.load_catalog(data_dir)
    assert len(cat.users) == wl.FALLBACK_NUM_USERS and len(set(cat.users.tolist())) == len(cat.users)
    assert len(cat.videos) == wl.FALLBACK_NUM_VIDEOS and len(set(cat.videos.tolist())) == len(cat.videos)
    assert str(data_dir) in cat.source
    # popularity order is a seeded permutation: stable per seed, unrelated to id order
    assert np.array_equal(cat.videos, wl.load_catalog(data_dir, seed=0).videos)
    assert not np.array_equal(cat.videos, np.sort(cat.videos))
    assert not np.array_equal(cat.videos, wl.load_catalog(data_dir, seed=1).videos)


def test_load_catalog_falls_back_to_id_ranges(tmp_path: Path) -> None:
    cat = wl.load_catalog(tmp_path)
    assert sorted(cat.users.tolist()) == list(range(27285))
    assert sorted(cat.videos.tolist()) == list(range(7583))
    assert "range(" in cat.source


def test_load_catalog_reads_csv_tables(tmp_path: Path) -> None:
    (tmp_path / wl.USER_TABLE).write_text("user_id,x\n5,a\n9,b\n5,c\n")
    (tmp_path / wl.VIDEO_TABLE).write_text("video_id,tag\n40,1\n41,\n42,3\n")
    cat = wl.load_catalog(tmp_path)
    assert cat.users.tolist() == [5, 9]
    assert sorted(cat.videos.tolist()) == [40, 41, 42]
    assert wl.resolve_data_dir({"MTRANK_DATA_DIR": str(tmp_path)}) == tmp_path


def test_load_catalog_ignores_table_without_id_column(tmp_path: Path) -> None:
    (tmp_path / wl.VIDEO_TABLE).write_text("vid,tag\n1,2\n")
    assert len(wl.load_catalog(tmp_path).videos) == wl.FALLBACK_NUM_VIDEOS


# --------------------------------------------------------------------------- response validation


def _response(req: dict[str, Any], order: list[Any] | None = None) -> dict[str, Any]:
    """A correct response: candidates scored, sorted descending, ranked 1..n."""
    ids = [c["video_id"] if isinstance(c, dict) else c for c in req["candidates"]]
    ids = sorted(ids, key=lambda v: -((int(v) * 7919) % 1000)) if order is None else order
    if req.get("top_k") is not None:
        ids = ids[: req["top_k"]]
    items = []
    for rank, vid in enumerate(ids, start=1):
        score = 1.0 - rank / (len(ids) + 1)
        items.append(
            {
                "video_id": vid,
                "rank": rank,
                "score": score,
                "heads": {"engagement": score, "satisfaction": 0.5},
            }
        )
    return {"model_version": "20250101-000000-abc", "items": items, "degraded": False}


REQ = {"user_id": 3, "candidates": [10, 11, 12, 13], "context": {"tab": 1, "hour": 18}}


def test_validate_accepts_correct_response() -> None:
    assert wl.validate_response(REQ, _response(REQ)) is None
    ties = _response(REQ)
    for item in ties["items"]:
        item["score"] = 0.5  # equal scores are still "sorted descending"
    assert wl.validate_response(REQ, ties) is None
    as_strings = _response(REQ)
    for item in as_strings["items"]:
        item["video_id"] = str(item["video_id"])
    assert wl.validate_response(REQ, as_strings) is None
    degraded = _response(REQ) | {"degraded": True}
    assert wl.validate_response(REQ, degraded) is None


def test_validate_accepts_candidates_with_features_and_top_k() -> None:
    req = {"user_id": "u1", "candidates": [{"video_id": v, "features": {"f": 1}} for v in (1, 2, 3, 4)]}
    assert wl.validate_response(req, _response(req)) is None
    req_k = {**REQ, "top_k": 2}
    assert wl.validate_response(req_k, _response(req_k)) is None
    req_big_k = {**REQ, "top_k": 10}  # top_k beyond the candidate count returns everything
    assert wl.validate_response(req_big_k, _response(req_big_k)) is None


def test_validate_rejects_unsorted() -> None:
    body = _response(REQ)
    body["items"][1]["score"], body["items"][2]["score"] = (
        body["items"][2]["score"],
        body["items"][1]["score"],
    )
    assert "not sorted" in wl.validate_response(REQ, body)


def test_validate_rejects_missing_extra_and_duplicate_ids() -> None:
    missing = _response(REQ, order=[10, 11, 12])
    assert "expected 4 items" in wl.validate_response(REQ, missing)
    swapped = _response(REQ, order=[10, 11, 12, 99])
    err = wl.validate_response(REQ, swapped)
    assert "missing=['13']" in err and "unexpected=['99']" in err
    dup = _response(REQ, order=[10, 11, 12, 12])
    assert "duplicated=['12']" in wl.validate_response(REQ, dup)
    req_k = {**REQ, "top_k": 2}
    assert "not candidates" in wl.validate_response(req_k, _response(req_k, order=[10, 77]))
    assert "duplicate" in wl.validate_response(req_k, _response(req_k, order=[10, 10]))
    assert "expected 2 items" in wl.validate_response(req_k, _response(REQ))


@pytest.mark.parametrize("ranks", [[0, 1, 2, 3], [1, 2, 2, 4], [1, 3, 2, 4], [1, 2, 3, "4"]])
def test_validate_rejects_bad_ranks(ranks: list[Any]) -> None:
    body = _response(REQ)
    for item, rank in zip(body["items"], ranks, strict=True):
        item["rank"] = rank
    assert "ranks are not 1..4" in wl.validate_response(REQ, body)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.pop("model_version"), "model_version"),
        (lambda b: b.update(model_version=""), "model_version"),
        (lambda b: b.pop("degraded"), "degraded"),
        (lambda b: b.update(items=None), "items"),
        (lambda b: b["items"][0].pop("video_id"), "video_id"),
        (lambda b: b["items"][0].update(score=float("nan")), "score"),
        (lambda b: b["items"][0].update(score="0.9"), "score"),
        (lambda b: b["items"][0].update(heads={"engagement": 0.1}), "heads"),
        (lambda b: b["items"][0].pop("heads"), "heads"),
    ],
)
def test_validate_rejects_malformed_bodies(mutate: Any, message: str) -> None:
    body = _response(REQ)
    mutate(body)
    err = wl.validate_response(REQ, body)
    assert err is not None and message in err


def test_validate_rejects_non_object() -> None:
    assert "not an object" in wl.validate_response(REQ, [1, 2])


def test_events_follow_the_top_items_with_labels_drawn_by_probability() -> None:
    labels = wl.parse_event_labels("long_view:0.5, is_like:0")
    assert labels == {"long_view": 0.5, "is_like": 0.0}
    for bad in ("long_view", "long_view:2", ":0.5", "x:y"):
        with pytest.raises(ValueError, match="label:probability"):
            wl.parse_event_labels(bad)
    rng = np.random.default_rng(0)
    ranked = _response(REQ)
    seen = Counter()
    for n in range(200):
        body = wl.build_events(rng, REQ, ranked, labels, 1.7e12, f"run-{n}")
        events = body["events"]
        assert 1 <= len(events) <= 3
        assert [e["video_id"] for e in events] == [it["video_id"] for it in ranked["items"][: len(events)]]
        assert all(e["user_id"] == 3 and e["labels"]["is_like"] == 0 for e in events)
        assert len({e["event_id"] for e in events}) == len(events)
        seen.update(e["labels"]["long_view"] for e in events)
        ok = {"accepted": len(events), "duplicates": 0, "appended": {"h": seen[1] and 1}}
        assert wl.validate_events_response(body, ok) is None
    assert 0.4 < seen[1] / sum(seen.values()) < 0.6
    body = wl.build_events(rng, REQ, ranked, labels, 1.7e12, "x")
    n = len(body["events"])
    assert "accepted" in wl.validate_events_response(body, {"accepted": 0, "duplicates": n, "appended": {}})
    assert "appended" in wl.validate_events_response(
        body, {"accepted": n, "duplicates": 0, "appended": {"h": -1}}
    )


def test_slo_violations() -> None:
    assert wl.slo_violations(100, 0.0, 80, 100) == []
    assert wl.slo_violations(100, 0.0, 100, 100) == []
    assert any("p99" in r for r in wl.slo_violations(100, 0.0, 101, 100))
    assert any("failure" in r for r in wl.slo_violations(100, 0.01, 10, 100))
    assert any("no requests" in r for r in wl.slo_violations(0, 0.0, 0, 100))


# --------------------------------------------------------------------------- the locustfile, in subprocesses


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_locustfile_imports_and_defines_a_fast_http_user() -> None:
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("locustfile", {str(LOCUSTFILE)!r})
mod = importlib.util.module_from_spec(spec)
sys.modules["locustfile"] = mod
spec.loader.exec_module(mod)
from locust import FastHttpUser
assert issubclass(mod.RankUser, FastHttpUser)
assert [t.__name__ for t in mod.RankUser.tasks] == ["rank"]
assert mod.DEFAULT_SLO_P99_MS == 75.0 and mod.FIXED_CANDIDATES == 120
print(len(mod.CATALOG.users), len(mod.VIDEOS))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",  # not the project root: the locustfile must find its helper module on its own
        env=_env(MTRANK_SLO_P99_MS="75", MTRANK_LOADTEST_CANDIDATES="120"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    users, videos = map(int, out.stdout.split())
    assert users > 0 and videos >= 120


class _StubRank(BaseHTTPRequestHandler):
    """A /rank following the API contract; `mode` breaks it on purpose."""

    protocol_version = "HTTP/1.1"
    mode = "ok"
    delay_s = 0.0

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.path == "/events":
            n = len(req["events"])
            body: dict[str, Any] = {"accepted": n, "duplicates": 0, "appended": {"recent": n}}
        else:
            body = _response(req)
        if self.mode == "unsorted":
            body["items"].reverse()
            for rank, item in enumerate(body["items"], start=1):
                item["rank"] = rank
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_server() -> Iterator[tuple[str, type[_StubRank]]]:
    handler = type("Handler", (_StubRank,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
    server.request_queue_size = 64  # every simulated user connects at once
    server.server_bind()
    server.server_activate()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _run_locust(host: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4"]
    cmd += ["-t", "3s", "--host", host, "--only-summary", *args]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=_env(MTRANK_LOADTEST_CANDIDATES="100", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_headless_run_passes_against_a_correct_server(stub_server: tuple[str, Any], tmp_path: Path) -> None:
    host, _ = stub_server
    summary, final = tmp_path / "summary.json", tmp_path / "locust.json"
    out = _run_locust(
        host,
        "--json-file",
        str(final.with_suffix("")),
        MTRANK_SLO_P99_MS="5000",
        MTRANK_LOADTEST_SUMMARY=str(summary),
        MTRANK_LOADTEST_EVENT_SHARE="0.5",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "load test passed" in out.stderr
    # the summary the scripts print holds the totals the verdict was taken on: locust's final stats
    got = json.loads(summary.read_text())
    entries = json.loads(final.read_text())
    assert got["requests"] == sum(e["num_requests"] for e in entries) > 0 and got["failures"] == 0
    # about half of the rankings were followed by events
    assert 0 < got["events_requests"] < got["rank_requests"] == got["requests"] - got["events_requests"]
    assert (
        0 < got["p50_ms"] <= got["p95_ms"] <= got["p99_ms"] <= got["max_ms"] + 1 and got["requests_per_s"] > 0
    )


@pytest.mark.slow
def test_headless_run_fails_on_invalid_responses(stub_server: tuple[str, Any]) -> None:
    host, handler = stub_server
    handler.mode = "unsorted"
    out = _run_locust(host, MTRANK_SLO_P99_MS="5000")
    assert out.returncode == 1
    assert "items not sorted by score" in out.stderr
    assert "load test FAILED" in out.stderr and "failure ratio" in out.stderr


@pytest.mark.slow
def test_headless_run_fails_when_p99_exceeds_slo(stub_server: tuple[str, Any]) -> None:
    host, handler = stub_server
    handler.delay_s = 0.05
    out = _run_locust(host, "--slo-p99-ms", "10", MTRANK_SLO_P99_MS="5000")  # the flag wins over the env
    assert out.returncode == 1, out.stderr[-3000:]
    assert "load test FAILED" in out.stderr and "> SLO 10 ms" in out.stderr
    assert "failure ratio" not in out.stderr
