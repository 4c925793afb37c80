"""Service hardening (issue 20): hostile bodies, a hung LATEST, retried versions, HTTP limits of
``mtrank serve``, what the public endpoints show. Real servers where the HTTP layer matters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServiceProcess
from fastapi.testclient import TestClient
from modelkit import ROOT, metric, service_settings, wait_for

from model import read_latest, write_latest
from model.checkpoint import LATEST, WEIGHTS, models_dir
from service.app import create_app

TOKEN = "hardening-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NORMAL = {"user_id": 1, "candidates": list(range(10, 60)), "context": {"tab": 1, "hour": 8}}
Serve = Callable[..., ServiceProcess]


def serve_env(artifacts: Path, **extra: str) -> dict[str, str]:
    env = {
        "MTRANK_ARTIFACTS": str(artifacts),
        "MTRANK_FEATURE_STORE": "embedded",
        "MTRANK_WARMUP_BATCH": "16",
        "MTRANK_ADMIN_TOKEN": TOKEN,
    }
    return {**env, **extra}


# --------------------------------------------------------------------------------------------
# 1. hostile bodies


def _body(candidates: bytes, context: bytes = b"{}") -> bytes:
    return b'{"user_id": 1, "candidates": [' + candidates + b'], "context": ' + context + b"}"


def _bad_features(n: int, distinct: bool) -> bytes:
    return b",".join((b'"k%d":[]' % i) if distinct else b'"k":[]' for i in range(n))


# ~1 MB each (under the default max_body_bytes of 1 MiB), all schema-invalid
HOSTILE: dict[str, bytes] = {
    "300k empty objects as candidates": _body(b",".join([b"{}"] * 300_000)),
    "150k integer candidates": _body(b",".join(str(i).encode() for i in range(150_000))),
    "candidates with 256 invalid features each": _body(
        b",".join([b'{"video_id": 1, "features": {' + _bad_features(256, True) + b"}}"] * 400)
    ),
    "one candidate with 140k duplicate invalid features": _body(
        b'{"video_id": 1, "features": {' + _bad_features(140_000, False) + b"}}"
    ),
    "a context of 140k duplicate invalid keys": _body(b"1", b"{" + _bad_features(140_000, False) + b"}"),
    "a context of 85k distinct keys": _body(
        b"1", b"{" + b",".join(b'"c%d":1' % i for i in range(85_000)) + b"}"
    ),
}


@pytest.mark.slow
def test_hostile_bodies_are_refused_fast_while_normal_requests_keep_working(
    serve_process: Serve, trained_artifacts: Path
) -> None:
    svc = serve_process(env=serve_env(trained_artifacts))
    for raw in HOSTILE.values():
        assert 800_000 < len(raw) < 1 << 20
    normal: list[tuple[int, float]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                status = c.post("/rank", json=NORMAL).status_code
                normal.append((status, time.perf_counter() - t0))

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    seconds: dict[str, list[float]] = {}
    try:
        wait_for(lambda: len(normal) >= 5, what="normal traffic")
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            for name, raw in HOSTILE.items():
                for _ in range(3):
                    t0 = time.perf_counter()
                    r = c.post("/rank", content=raw, headers={"content-type": "application/json"})
                    seconds.setdefault(name, []).append(time.perf_counter() - t0)
                    assert r.status_code == 422, (name, r.status_code, r.text[:300])
                    assert r.json()["error"]["code"] == "validation_error"
        n = len(normal)
        wait_for(lambda: len(normal) >= n + 5, what="normal traffic after the hostile bodies")
    finally:
        stop.set()
        thread.join(timeout=30)
    # The bound: a hostile body is answered within 100 ms (each took 2-12 s on the event
    # loop before). Taken as the best of 3 tries per body: what the server needs, not what a busy
    # shared 2-core CI machine adds on top (the costliest body takes ~40 ms in-process; under a
    # full parallel test load its tries were seen at 100-125 ms). Any try above 1 s is a regression.
    for name, times in seconds.items():
        assert min(times) < 0.1 and max(times) < 1.0, (name, times)
    # Normal requests kept being answered, none failed; none waited behind a hostile body for
    # long (1 s: far above their ~10-30 ms here, far below the multi-second stalls of before).
    assert normal and all(status == 200 for status, _ in normal), normal[:5]
    assert max(t for _, t in normal) < 1.0, sorted(t for _, t in normal)[-5:]


@pytest.mark.slow
def test_every_request_list_and_dict_is_capped_in_the_schema(trained_artifacts: Path) -> None:
    settings = service_settings(trained_artifacts, max_candidates=123)
    with TestClient(create_app(settings)) as c:
        spec = c.get("/openapi.json").json()
        r = c.post("/rank", json={"user_id": 1, "candidates": list(range(124))})
        assert r.status_code == 422
        assert "candidates: too many" in r.json()["error"]["message"], r.text
        assert "at most 123" in r.json()["error"]["message"]
    schemas = spec["components"]["schemas"]
    body = schemas["RankRequest"]["properties"]
    assert body["candidates"]["maxItems"] == 123 and body["candidates"]["minItems"] == 1
    assert body["context"]["maxProperties"] == 256
    assert body["weights"]["anyOf"][0]["maxProperties"] == 64
    assert schemas["Candidate"]["properties"]["features"]["maxProperties"] == 256


def test_the_openapi_schema_documents_the_duplicate_id_rule(trained_artifacts: Path) -> None:
    with TestClient(create_app(service_settings(trained_artifacts))) as c:
        spec = c.get("/openapi.json").json()
        # two bodies that fit the schema's types but repeat an id: both are refused
        for cands in ([5, 5], [5, "5"], [5, {"video_id": 5}]):
            r = c.post("/rank", json={"user_id": 1, "candidates": cands})
            assert r.status_code == 422 and "duplicate" in r.json()["error"]["message"]
    cands = spec["components"]["schemas"]["RankRequest"]["properties"]["candidates"]
    assert cands["uniqueItems"] is True  # [5, 5] does not fit the schema
    # what uniqueItems cannot say: 5, "5" and {"video_id": 5} are one id
    assert 'integer 5, the string "5" and {"video_id": 5} are the same id' in cands["description"]


# --------------------------------------------------------------------------------------------
# 2. LATEST on a hung file system


@pytest.mark.slow
def test_a_latest_that_never_delivers_does_not_hang_the_service(
    serve_process: Serve, artifacts_copy: Path
) -> None:
    version = read_latest(artifacts_copy)
    svc = serve_process(
        env=serve_env(artifacts_copy, MTRANK_RELOAD_INTERVAL_S="0.2", MTRANK_LATEST_READ_TIMEOUT_S="0.5")
    )
    latest = models_dir(artifacts_copy) / LATEST
    fifo = latest.with_name(".LATEST.fifo")
    os.mkfifo(fifo)
    os.replace(fifo, latest)  # opening it for reading blocks until a writer comes: none will
    try:
        with httpx.Client(base_url=svc.url, timeout=3) as c:
            t_end = time.monotonic() + 3  # several watcher rounds, each blocked on the FIFO
            while time.monotonic() < t_end:
                assert c.get("/healthz").status_code == 200
                time.sleep(0.1)
            r = c.post("/rank", json=NORMAL)
            assert r.status_code == 200 and r.json()["model_version"] == version
            assert c.get("/readyz").status_code == 200
            err = c.get("/admin/model", headers=AUTH).json()["last_reload_error"]
            assert err is not None and "not a regular file (a FIFO)" in err["error"], err
            # an explicit reload says so too, at once
            r = c.post("/admin/reload", headers=AUTH)
            assert r.status_code == 409 and LATEST in r.json()["error"]["message"], r.text
            # LATEST fixed: picked up as usual
            latest.unlink()
            write_latest(artifacts_copy, version)
            assert c.post("/admin/reload", headers=AUTH).status_code == 200
            assert c.get("/healthz").status_code == 200
    finally:
        _release_fifo_readers(latest)


def test_a_read_that_never_returns_times_out_off_the_event_loop() -> None:
    """The LATEST reader's deadline, on a real read that blocks (a pipe nobody writes): the stand-in
    for a regular file on a hung network file system, which a FIFO no longer is (refused at once)."""
    from service.latest import BlockingIO  # here: the other tests of this file run on older code too

    r, w = os.pipe()
    io = BlockingIO("test-blocked-read")

    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await io.run(lambda: os.read(r, 1), timeout=0.3)
        assert time.monotonic() - t0 < 2.0
        assert ticks >= 5  # the event loop kept running while the read was blocked
        assert io.stuck_since() is not None
        with pytest.raises(TimeoutError):  # no second thread while the first is stuck
            await io.run(lambda: 1, timeout=5)
        os.write(w, b"x")  # the blocked read returns ...
        deadline = time.monotonic() + 5
        while io.stuck_since() is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await io.run(lambda: 42, timeout=5) == 42  # ... and reads work again
        with pytest.raises(ZeroDivisionError):  # errors reach the caller
            await io.run(lambda: 1 / 0, timeout=5)
        task.cancel()

    try:
        asyncio.run(main())
    finally:
        os.close(r)
        os.close(w)


def _release_fifo_readers(path: Path) -> None:
    """Open the FIFO for writing (if it is still there) so a reader blocked in open() returns."""
    with contextlib.suppress(OSError):
        if path.is_fifo():
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


# --------------------------------------------------------------------------------------------
# 4. versions published before their folder is complete


def _settings(artifacts: Path, **extra: Any) -> Any:
    base = {
        "reload_interval_s": 0.05,
        "reload_retry_initial_s": 0.1,
        "reload_retry_max_s": 0.4,
        "admin_token": TOKEN,
    }
    return service_settings(artifacts, **{**base, **extra})


def _details(c: TestClient) -> dict[str, Any]:
    r = c.get("/admin/model", headers=AUTH)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture(scope="module")
def staged_version(tmp_path_factory: pytest.TempPathFactory, train_tiny: Any) -> Path:
    """The folder of another real checkpoint, to be copied into an artifacts dir by a test."""
    artifacts = tmp_path_factory.mktemp("staging")
    return models_dir(artifacts) / train_tiny(artifacts, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["folder missing", "weights missing", "weights half copied"])
def test_a_version_published_before_its_files_is_retried(
    artifacts_copy: Path, staged_version: Path, stage: str
) -> None:
    old = read_latest(artifacts_copy)
    root = models_dir(artifacts_copy)
    new = staged_version.name
    with TestClient(create_app(_settings(artifacts_copy))) as c:
        errors0 = metric(c, "mtrank_model_reload_total", result="error")
        if stage != "folder missing":  # a copy in progress: the manifest is there, the weights not (all)
            (root / new).mkdir()
            shutil.copy(staged_version / "manifest.json", root / new / "manifest.json")
            if stage == "weights half copied":
                data = (staged_version / WEIGHTS).read_bytes()
                (root / new / WEIGHTS).write_bytes(data[: len(data) // 2])
        (root / LATEST).write_text(new + "\n")  # LATEST moved first
        wait_for(
            lambda: metric(c, "mtrank_model_reload_total", result="error") >= errors0 + 2, what="retries"
        )
        err = _details(c)["last_reload_error"]
        assert err["version"] == new and err["transient"] is True and err["next_retry_at"], err
        assert c.post("/rank", json=NORMAL).json()["model_version"] == old
        # the copy completes; LATEST is not touched again
        if (root / new).exists():
            shutil.copy(staged_version / WEIGHTS, root / new / WEIGHTS)
        else:
            shutil.copytree(staged_version, root / new)
        wait_for(lambda: c.post("/rank", json=NORMAL).json()["model_version"] == new, what="the retry")
        assert _details(c)["source"] == "latest"


@pytest.mark.slow
def test_a_permanently_bad_version_is_recorded_once_not_retried(
    artifacts_copy: Path, train_tiny: Any
) -> None:
    old = read_latest(artifacts_copy)
    root = models_dir(artifacts_copy)
    bad = "20991231-000000-bad777"
    shutil.copytree(root / old, root / bad)
    manifest = json.loads((root / bad / "manifest.json").read_text())
    manifest["version"] = bad
    manifest["feature_schema"]["features"][-1]["vocab"].reverse()  # no new digest: tampered
    (root / bad / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(_settings(artifacts_copy))) as c:
        errors0 = metric(c, "mtrank_model_reload_total", result="error")
        write_latest(artifacts_copy, bad)
        wait_for(
            lambda: metric(c, "mtrank_model_reload_total", result="error") == errors0 + 1, what="rejection"
        )
        err = _details(c)["last_reload_error"]
        assert "digest" in err["error"] and err["transient"] is False and err["next_retry_at"] is None, err
        time.sleep(1.0)  # 20 watcher rounds, several retry periods: not tried again
        assert metric(c, "mtrank_model_reload_total", result="error") == errors0 + 1
        assert c.post("/rank", json=NORMAL).json()["model_version"] == old
        new = train_tiny(artifacts_copy, seed=7)  # LATEST changes: acted on
        wait_for(lambda: c.post("/rank", json=NORMAL).json()["model_version"] == new, what="the new model")


# --------------------------------------------------------------------------------------------
# 5. HTTP limits of `mtrank serve`


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within ``seconds``, what it sent before)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


@pytest.mark.slow
def test_http_limits_of_mtrank_serve(serve_process: Serve, trained_artifacts: Path) -> None:
    svc = serve_process(
        env=serve_env(
            trained_artifacts,
            MTRANK_HTTP_HEADER_TIMEOUT_S="1",
            MTRANK_HTTP_BODY_TIMEOUT_S="1",
            MTRANK_HTTP_KEEP_ALIVE_S="1",
        )
    )
    # a 50 MB header is refused after the first max_http_header_bytes (16 KiB), not read in
    with _connect(svc.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, chunk = 0, b"a" * (1 << 20)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 50 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        closed, answer = _closed_within(s, 5)
    assert closed and sent < 50 << 20, sent
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")) or answer == b"", answer[:200]
    # a client that sends a header line and then nothing is dropped after the header timeout
    with _connect(svc.url) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed, _ = _closed_within(s, 10)
        assert closed and time.monotonic() - t0 < 5
    # ... and so is one that connects and sends nothing at all
    with _connect(svc.url) as s:
        t0 = time.monotonic()
        assert _closed_within(s, 10)[0] and time.monotonic() - t0 < 5
    # a body announced but never sent in full: dropped after the body timeout
    with _connect(svc.url) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        closed, answer = _closed_within(s, 10)
        assert closed and time.monotonic() - t0 < 5, answer
    # an idle keep-alive connection is closed after http_keep_alive_s
    with _connect(svc.url) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert _closed_within(s, 10)[0] and time.monotonic() - t0 < 5
    # a normal request still works, and the server is still well
    assert httpx.post(svc.url + "/rank", json=NORMAL, timeout=10).status_code == 200
    log = svc.output()
    assert "client disconnected before sending the body of POST /rank" in log  # the dropped body
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


@pytest.mark.slow
def test_connections_beyond_the_limit_get_503(serve_process: Serve, trained_artifacts: Path) -> None:
    svc = serve_process(env=serve_env(trained_artifacts, MTRANK_HTTP_MAX_CONNECTIONS="4"))
    held = [_connect(svc.url) for _ in range(4)]
    try:
        time.sleep(0.3)  # let the server accept them
        r = httpx.get(svc.url + "/healthz", timeout=10)
        assert r.status_code == 503, r.text
    finally:
        for s in held:
            s.close()
    wait_for(lambda: httpx.get(svc.url + "/healthz", timeout=10).status_code == 200, what="capacity back")


# --------------------------------------------------------------------------------------------
# 6. what the public endpoints show; stale temp entries


@pytest.mark.slow
def test_public_endpoints_show_no_deployment_details(trained_artifacts: Path, tmp_path: Path) -> None:
    """Public: the version, the status and the request contract (heads, feature names, weights);
    paths, the store's address and what LATEST named only in /admin/model."""
    version = read_latest(trained_artifacts)
    with TestClient(create_app(service_settings(trained_artifacts, admin_token=TOKEN))) as c:
        assert c.get("/readyz").json() == {"status": "ready", "model_version": version}
        public = c.get("/model").json()
        assert set(public) == {"version", "status", "heads", "features", "scoring"}, public
        assert public["version"] == version and public["status"] == "ready"
        assert public["heads"] == ["engagement", "satisfaction"]
        assert "video_duration" in public["features"]["video"] and "tab" in public["features"]["context"]
        assert set(public["scoring"]) == {"combine", "weights", "weights_from", "weight_bounds", "fitted"}
        assert set(public["scoring"]["fitted"]) == {"method", "weights", "objective", "validation"}
        assert str(ROOT.parent) not in json.dumps(public) and "/" not in json.dumps(public["features"])
        details = _details(c)
        assert details["version"] == version and details["config"]["model"]["arch"] == "mmoe"
        assert details["feature_store"]["kind"] == "embedded"
        assert c.get("/admin/model").status_code == 401
    with TestClient(create_app(service_settings(trained_artifacts))) as c:
        assert c.get("/model").json()["version"] == version
        assert c.get("/admin/model", headers=AUTH).status_code == 404  # no token: no admin routes
    # not ready, with a LATEST that names a missing folder: nothing about paths or LATEST leaks
    artifacts = tmp_path / "art"
    models_dir(artifacts).mkdir(parents=True)
    (models_dir(artifacts) / LATEST).write_text("20990101-000000-gone00\n")
    with TestClient(create_app(service_settings(artifacts, admin_token=TOKEN))) as c:
        for path in ("/readyz", "/model"):
            text = c.get(path).text
            assert str(tmp_path) not in text and "gone00" not in text and LATEST not in text, text
        assert c.get("/model").json() == {
            "version": None,
            "status": "not_ready",
            "heads": [],
            "features": {},
            "scoring": None,
        }
        assert "gone00" in json.dumps(_details(c)["last_reload_error"])


@pytest.mark.slow
def test_stale_temp_entries_are_removed_at_start(artifacts_copy: Path) -> None:
    root = models_dir(artifacts_copy)
    old = time.time() - 2 * 3600
    stale, fresh = root / ".tmp-20260101-000000-aaaaaa-1234abcd", root / ".LATEST.deadbeef.tmp"
    stale.mkdir()
    (stale / WEIGHTS).write_bytes(b"half")
    fresh.write_text("x\n")
    young = root / ".tmp-20260101-000000-bbbbbb-5678abcd"
    young.mkdir()
    for p in (stale, fresh):
        os.utime(p, (old, old))
    with TestClient(create_app(service_settings(artifacts_copy))) as c:
        assert c.get("/readyz").status_code == 200
        wait_for(lambda: not stale.exists() and not fresh.exists(), what="the cleanup")
        assert young.is_dir()  # maybe a write in progress
    with TestClient(create_app(service_settings(artifacts_copy, stale_temp_age_s=0))) as c:
        wait_for(lambda: not young.exists(), what="the cleanup with age 0")
