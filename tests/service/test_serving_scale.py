"""Serving at scale: several worker processes behind one port (metrics across them, each reloading
on its own and converging on one version), and admission control (a fast 503 when full)."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from modelkit import service_settings, wait_for
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from model import read_latest
from service.app import create_app
from service.middleware import AdmissionMiddleware

REQUEST = {"user_id": 1, "candidates": list(range(10, 310)), "context": {"tab": 1, "hour": 8}}


def samples(url: str, name: str) -> list[Any]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def served_by_workers(url: str) -> dict[str, str]:
    """pid -> the version that worker serves (mtrank_model_info == 1)."""
    return {s.labels["pid"]: s.labels["version"] for s in samples(url, "mtrank_model_info") if s.value == 1}


@pytest.mark.slow
def test_workers_share_the_port_and_the_metrics_and_converge_on_a_new_version(
    serve_process: Any, artifacts_copy: Path, train_tiny: Any
) -> None:
    v0 = read_latest(artifacts_copy)
    env = {"MTRANK_ARTIFACTS": str(artifacts_copy), "MTRANK_RELOAD_INTERVAL_S": "0.2"}
    svc = serve_process(env=env, args=["--workers", "2"], timeout=180)
    wait_for(lambda: len(served_by_workers(svc.url)) == 2, 120, "both workers to serve")
    assert set(served_by_workers(svc.url).values()) == {v0}
    n = 24
    for _ in range(n):  # a new connection each: the kernel hands them to either worker
        r = httpx.post(svc.url + "/rank", json=REQUEST, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == v0
    # counters add up over the workers, whichever of them answers /metrics
    ok = [s.value for s in samples(svc.url, "mtrank_rank_requests_total") if s.labels["outcome"] == "ok"]
    assert ok == [n]
    v1 = train_tiny(artifacts_copy, seed=3)  # each worker reloads on its own ...
    wait_for(lambda: set(served_by_workers(svc.url).values()) == {v1}, 120, "both workers on the new version")
    assert len(served_by_workers(svc.url)) == 2  # ... and both converge on it
    for _ in range(6):
        assert httpx.post(svc.url + "/rank", json=REQUEST, timeout=30).json()["model_version"] == v1


def test_admission_control_answers_503_with_retry_after_at_once_when_full() -> None:
    """A request beyond the limit is refused before it reaches the app (nor its body is read)."""
    release = asyncio.Event()
    entered: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:  # holds /rank until released
        entered.append(scope["path"])
        if scope["path"] == "/rank":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    shed: list[int] = []
    gauge = Gauge("in_flight_test", "in flight", registry=CollectorRegistry())
    guarded = AdmissionMiddleware(app, limit=2, on_shed=lambda: shed.append(1), gauge=gauge)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/rank", content=b"{}")) for _ in range(2)]
            while len(entered) < 2:
                await asyncio.sleep(0.001)
            assert gauge._value.get() == 2
            r = await client.post("/rank", content=b"{}")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            assert (await client.get("/healthz")).status_code == 200  # other paths are not limited
            release.set()
            assert [(await t).status_code for t in held] == [200, 200]
            assert (await client.post("/rank", content=b"{}")).status_code == 200  # room again
        assert entered.count("/rank") == 3 and shed == [1] and gauge._value.get() == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_admission_control_sheds_while_the_oldest_request_in_flight_is_too_old() -> None:
    """A worker that has fallen behind (its oldest request in flight older than the limit) refuses
    new requests even below the count limit, and admits again once it caught up."""
    release = asyncio.Event()
    entered: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        entered.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = AdmissionMiddleware(app, limit=100, max_age_s=2.0, age_min_in_flight=2)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
            first = asyncio.create_task(client.post("/rank", content=b"{}"))
            while not entered:
                await asyncio.sleep(0.001)
            second = asyncio.create_task(client.post("/rank", content=b"{}"))  # the first is young
            while len(entered) < 2:
                await asyncio.sleep(0.001)
            await asyncio.sleep(2.2)  # now the oldest of the 2 in flight is older than max_age_s
            r = await client.post("/rank", content=b"{}")
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            release.set()
            assert [(await t).status_code for t in (first, second)] == [200, 200]
            assert (await client.post("/rank", content=b"{}")).status_code == 200  # caught up
        assert len(entered) == 3 and guarded.in_flight == 0

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# the tail: small requests scored inline, the heap frozen after every model switch


def test_small_requests_are_scored_inline_and_large_ones_in_the_forward_threads(artifacts_copy: Path) -> None:
    settings = service_settings(artifacts_copy, forward_in_thread=True, inline_max_candidates=128)
    with TestClient(create_app(settings)) as c:
        holder = c.app.state.holder

        def where(n: int) -> str:
            return str(c.portal.call(holder.run_scoring, n, lambda: threading.current_thread().name))

        loop_thread = c.portal.call(lambda: threading.current_thread().name)
        assert where(1) == where(128) == loop_thread
        assert where(129).startswith("mtrank-forward") and where(500).startswith("mtrank-forward")
        for n in (100, 300):  # and both paths answer /rank alike
            body = {**REQUEST, "candidates": REQUEST["candidates"][:n]}
            assert c.post("/rank", json=body).status_code == 200


def test_the_heap_is_frozen_after_every_model_switch(artifacts_copy: Path, train_tiny: Any) -> None:
    """The loaded app's objects leave the collector's generations (a full collection walked them
    all with the event loop stopped): at start-up and again after a reload to a new version."""
    gc.unfreeze()
    try:
        with TestClient(create_app(service_settings(artifacts_copy))) as c:
            assert gc.get_freeze_count() > 10_000
            gc.unfreeze()
            assert gc.get_freeze_count() == 0
            v1 = train_tiny(artifacts_copy, seed=4)
            c.portal.call(c.app.state.holder.check)  # one watcher round: LATEST moved
            assert c.post("/rank", json=REQUEST).json()["model_version"] == v1
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
