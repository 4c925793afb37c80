"""Hot reload: retrain under load with zero failed requests; bad checkpoints rejected; admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from modelkit import copy_version, model_details, wait_for
from prometheus_client.parser import text_string_to_metric_families

from model import load_checkpoint, read_latest, write_latest
from model.checkpoint import LATEST, WEIGHTS, list_versions, models_dir, save_checkpoint, seal_manifest
from model.config import Config, FeatureDecl
from service.app import create_app
from service.metrics import Metrics
from service.reload import ModelHolder
from service.settings import Settings
from service.store import open_store

REQUEST = {"user_id": 1, "candidates": list(range(10, 210)), "context": {"tab": 1, "hour": 8}}
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(artifacts: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "artifacts": artifacts,
        "feature_store": "embedded",
        "reload_interval_s": 0.1,
        "warmup_batch": 16,
        "admin_token": None,
    }
    return Settings(**{**base, **overrides})


def reload_errors(client: TestClient) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "mtrank_model_reload_total" and s.labels.get("result") == "error":
                return float(s.value)
    raise AssertionError("mtrank_model_reload_total not exposed")


def put_latest(artifacts: Path, raw: bytes) -> None:
    """Replace models/LATEST with ``raw`` atomically (so a poll never sees a half-written file)."""
    path = models_dir(artifacts) / LATEST
    tmp = path.with_name(".LATEST.test.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


Result = tuple[int, str | None]  # (status, model version or error text)


def swap_under_load(
    ranker: Callable[[], contextlib.AbstractContextManager[Callable[[], Result]]],
    switch: Callable[[], str],
    old: str,
    timeout: float = 30.0,
) -> tuple[str, int]:
    """Two threads POST /rank (each through its own ``ranker()``) while ``switch()`` moves LATEST
    and returns the new version: zero failed requests, and one clean swap old -> new per client.
    Returns (the new version, how many requests were made)."""
    stop = threading.Event()
    seen: list[list[Result]] = [[], []]

    def hammer(out: list[Result]) -> None:
        with ranker() as rank_once:
            while not stop.is_set():
                out.append(rank_once())

    threads = [threading.Thread(target=hammer, args=(out,), daemon=True) for out in seen]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(out) >= 3 for out in seen), what="the first responses")
        new = switch()
        assert new != old
        wait_for(lambda: all(out[-1][1] == new for out in seen), timeout=timeout, what="the new version")
        n = [len(out) for out in seen]
        wait_for(lambda: all(len(out) >= k + 3 for out, k in zip(seen, n, strict=True)), what="more")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    failures = [r for out in seen for r in out if r[0] != 200]
    assert not failures, failures[:5]
    for out in seen:
        versions = [v for _, v in out]
        # one swap: once a client saw the new model it never sees the old one again
        first_new = versions.index(new)
        assert set(versions[:first_new]) == {old} and set(versions[first_new:]) == {new}
    return new, sum(len(out) for out in seen)


def version_of(r: httpx.Response) -> Result:
    return r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text


# --------------------------------------------------------------------------------------------
# a real server, retrained under load


@pytest.mark.slow
def test_retrain_under_load_swaps_with_zero_failed_requests(
    serve_process: Callable[..., Any], artifacts_copy: Path, train_tiny: Any
) -> None:
    old = read_latest(artifacts_copy)
    svc = serve_process(
        env={
            "MTRANK_ARTIFACTS": str(artifacts_copy),
            "MTRANK_FEATURE_STORE": "embedded",
            "MTRANK_RELOAD_INTERVAL_S": "0.2",
            "MTRANK_WARMUP_BATCH": "64",
            "MTRANK_ADMIN_TOKEN": "",
        }
    )

    @contextlib.contextmanager
    def ranker() -> Iterator[Callable[[], Result]]:
        with httpx.Client(base_url=svc.url, timeout=10) as c:

            def rank_once() -> Result:
                try:
                    return version_of(c.post("/rank", json=REQUEST))
                except httpx.HTTPError as e:  # a dropped connection is a failed request too
                    return -1, repr(e)

            yield rank_once

    # train_tiny writes a new version and moves LATEST, under load
    new, requests = swap_under_load(ranker, lambda: train_tiny(artifacts_copy, seed=7), old)
    assert requests > 20
    log = svc.output()
    assert f"serving model {new}" in log and "Traceback" not in log


# --------------------------------------------------------------------------------------------
# bad checkpoints


@pytest.fixture
def live(artifacts_copy: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(artifacts_copy, admin_token=TOKEN))) as c:
        yield c


@pytest.mark.parametrize(
    "damage", ["altered weights", "manifest not JSON", "missing weights", "wrong tensors"]
)
@pytest.mark.slow
def test_bad_checkpoint_is_rejected_and_old_model_keeps_serving(
    live: TestClient, artifacts_copy: Path, damage: str
) -> None:
    old = read_latest(artifacts_copy)
    bad = "20991231-000000-bad001"
    path = copy_version(artifacts_copy, old, bad)
    if damage == "altered weights":  # (cut short they are a copy in progress: test_service_hardening)
        data = bytearray((path / WEIGHTS).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / WEIGHTS).write_bytes(bytes(data))
        expect = "SHA-256"
    elif damage == "manifest not JSON":
        (path / "manifest.json").write_text("{not json")
        expect = "not valid JSON"
    elif damage == "missing weights":
        (path / WEIGHTS).unlink()
        expect = "no weights.safetensors"
    else:  # consistent file, but the network it describes does not fit the weights
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["config"]["model"]["mmoe"]["expert_dims"] = [7]
        (path / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
        expect = "weights do not fit"
    errors0 = reload_errors(live)
    write_latest(artifacts_copy, bad)
    wait_for(lambda: model_details(live)["last_reload_error"] is not None, what="the rejection")
    err = model_details(live)["last_reload_error"]
    assert err["version"] == bad and expect in err["error"], err
    assert reload_errors(live) == errors0 + 1
    assert live.get("/readyz").status_code == 200
    r = live.post("/rank", json=REQUEST)
    assert r.status_code == 200 and r.json()["model_version"] == old
    time.sleep(0.3)  # not retried every poll (missing weights: only after reload_retry_initial_s, 1 s)
    assert reload_errors(live) == errors0 + 1
    # an explicit reload of the bad LATEST reports the rejection, still serving the old model
    r = live.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409 and "still serving the previous model" in r.json()["error"]["message"]
    assert live.post("/rank", json=REQUEST).json()["model_version"] == old


@pytest.mark.slow
def test_a_good_model_after_a_bad_one_is_picked_up(
    live: TestClient, artifacts_copy: Path, train_tiny: Any
) -> None:
    old = read_latest(artifacts_copy)
    bad = copy_version(artifacts_copy, old, "20991231-000000-bad002")
    (bad / WEIGHTS).write_bytes(b"garbage")
    write_latest(artifacts_copy, bad.name)
    wait_for(lambda: model_details(live)["last_reload_error"] is not None, what="the rejection")
    new = train_tiny(artifacts_copy, seed=5)
    wait_for(lambda: live.get("/model").json()["version"] == new, what="the good model")
    assert live.post("/rank", json=REQUEST).json()["model_version"] == new


# --------------------------------------------------------------------------------------------
# admin endpoints


def test_admin_requires_the_bearer_token(live: TestClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": ""},
    ):
        r = live.post("/admin/reload", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    r = live.post("/admin/rollback", json={"version": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert "/admin/reload" in live.get("/openapi.json").json()["paths"]


@pytest.mark.slow
def test_admin_reload_and_rollback(live: TestClient, artifacts_copy: Path, train_tiny: Any) -> None:
    v0 = read_latest(artifacts_copy)
    r = live.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {
        "version": v0,
        "previous": v0,
        "changed": False,
        "latest_updated": None,
        "announced": None,
    }
    v1 = train_tiny(artifacts_copy, seed=2)
    r = live.post("/admin/reload", headers=AUTH)  # at once, not waiting for the watcher
    assert r.status_code == 200 and r.json()["version"] == v1
    assert live.post("/rank", json=REQUEST).json()["model_version"] == v1
    r = live.post("/admin/rollback", json={"version": v0}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "version": v0,
        "previous": v1,
        "changed": True,
        "latest_updated": True,
        "announced": None,
    }
    assert read_latest(artifacts_copy) == v0  # durable: a restart serves v0 too
    assert live.post("/rank", json=REQUEST).json()["model_version"] == v0
    time.sleep(0.3)  # the watcher sees LATEST = v0 = served: nothing changes
    info = model_details(live)
    assert info["version"] == v0 and info["source"] == "rollback"


@pytest.mark.parametrize(
    ("version", "status", "message"),
    [
        ("../x", 422, "is not a model version id"),
        ("../../etc/passwd", 422, "never a path"),
        ("/tmp/models/x", 422, "never a path"),
        ("a/b", 422, "is not a model version id"),
        (".tmp-123", 422, "is not a model version id"),
        ("", 422, "version"),
        (123, 422, "version"),
        ("20000101-000000-000000", 404, "not found"),
    ],
)
def test_rollback_accepts_version_ids_only(live: TestClient, version: Any, status: int, message: str) -> None:
    before = live.get("/model").json()["version"]
    r = live.post("/admin/rollback", json={"version": version}, headers=AUTH)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert live.get("/model").json()["version"] == before


def test_rollback_to_a_corrupt_version_is_refused(live: TestClient, artifacts_copy: Path) -> None:
    v0 = read_latest(artifacts_copy)
    bad = copy_version(artifacts_copy, v0, "20991231-000000-bad003")
    (bad / WEIGHTS).write_bytes(b"x")
    r = live.post("/admin/rollback", json={"version": bad.name}, headers=AUTH)
    assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
    assert read_latest(artifacts_copy) == v0
    assert live.post("/rank", json=REQUEST).json()["model_version"] == v0


# --------------------------------------------------------------------------------------------
# a new model that needs more feature columns than the one serving


def add_video_columns(cfg: Config) -> None:
    """Two video columns the shipped config does not use (both are in the fixture's video table)."""
    cfg.data.features.append(FeatureDecl("visible_status", "video", "numeric"))
    cfg.data.features.append(FeatureDecl("music_id", "video", "categorical"))


@pytest.fixture(scope="module")
def wide_artifacts(
    trained_artifacts: Path, tmp_path_factory: pytest.TempPathFactory, train_tiny: Any
) -> Path:
    """``trained_artifacts`` plus a version needing two more video columns; LATEST names the
    first one. Read-only: tests use ``wide_copy``."""
    dst = tmp_path_factory.mktemp("wide") / "artifacts"
    shutil.copytree(trained_artifacts, dst)
    narrow = read_latest(dst)
    train_tiny(dst, seed=1, configure=add_video_columns)
    write_latest(dst, narrow)
    return dst


@pytest.fixture
def wide_copy(wide_artifacts: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """(artifacts, narrow version served from LATEST, wide version)."""
    dst = tmp_path / "artifacts"
    shutil.copytree(wide_artifacts, dst)
    narrow = read_latest(dst)
    (wide,) = [v for v in list_versions(dst) if v != narrow]
    return dst, narrow, wide


def video_columns(client: TestClient) -> dict[str, list[str]]:
    """The embedded store's live video columns: {"cats": [...], "nums": [...]}."""
    cols = model_details(client)["feature_store"]["tables"]["video"]["columns"]
    return {"cats": cols["cats"], "nums": cols["nums"]}


@pytest.mark.slow
def test_a_rejected_wider_model_leaves_the_serving_model_untouched(wide_copy: tuple[Path, str, str]) -> None:
    artifacts, narrow, wide = wide_copy
    # the wide model with NaN weights: maps onto the store (the new columns get read), then fails
    # its test scoring
    ckpt = load_checkpoint(models_dir(artifacts) / wide)
    with torch.no_grad():
        for param in ckpt.model.parameters():
            param.fill_(float("nan"))
    bad = save_checkpoint(
        artifacts, ckpt.model, ckpt.config, ckpt.schema, version="20991231-000000-nan001", set_latest=False
    ).name
    with TestClient(create_app(settings_for(artifacts))) as c:
        before = video_columns(c)
        assert "music_id" not in before["cats"] and rank_ok(c) == narrow
        errors0 = reload_errors(c)
        write_latest(artifacts, bad)
        wait_for(lambda: model_details(c)["last_reload_error"] is not None, what="the rejection")
        err = model_details(c)["last_reload_error"]
        assert err["version"] == bad and "finite" in err["error"], err
        assert reload_errors(c) == errors0 + 1
        for _ in range(3):  # the old model keeps serving, with the tables it was serving from
            assert rank_ok(c) == narrow
        assert video_columns(c) == before
        # the good wide model: its columns go live with it, the narrow one still reads only its own
        write_latest(artifacts, wide)
        wait_for(lambda: c.get("/model").json()["version"] == wide, what="the wide model")
        assert rank_ok(c) == wide
        after = video_columns(c)
        assert after == {"cats": [*before["cats"], "music_id"], "nums": [*before["nums"], "visible_status"]}
        write_latest(artifacts, narrow)  # back to the narrow model on the wider tables
        wait_for(lambda: c.get("/model").json()["version"] == narrow, what="the narrow model again")
        assert rank_ok(c) == narrow


def rank_ok(client: TestClient) -> str:
    r = client.post("/rank", json=REQUEST)
    assert r.status_code == 200, r.text
    version: str = r.json()["model_version"]
    return version


@pytest.mark.slow
def test_a_wider_model_swaps_in_under_load_with_zero_failed_requests(
    wide_copy: tuple[Path, str, str],
) -> None:
    artifacts, narrow, wide = wide_copy
    # a long warm-up: a long window between the store preparing the new columns and the swap
    s = settings_for(artifacts, warmup_batch=2048)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:

        def switch() -> str:
            write_latest(artifacts, wide)
            return wide

        rank_once = lambda: version_of(c.post("/rank", json=REQUEST))  # noqa: E731
        swap_under_load(lambda: contextlib.nullcontext(rank_once), switch, narrow, timeout=60)


# --------------------------------------------------------------------------------------------
# pointer changes racing an admin reload / rollback (driven round by round, no watcher task)


@contextlib.asynccontextmanager
async def holder_for(artifacts: Path) -> AsyncIterator[ModelHolder]:
    """A real ModelHolder serving LATEST; the test runs every watcher round itself (``check``)."""
    settings = settings_for(artifacts)
    store = open_store(settings)
    holder = ModelHolder(settings, store, Metrics())
    try:
        await holder.check()
        assert holder.current is not None
        yield holder
    finally:
        await holder.stop()
        await store.close()


class Gate:
    """Holds the activation of ``version`` after its (real) validation until ``open`` is called."""

    def __init__(self, holder: ModelHolder, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()
        validate = holder.loader.validate

        def gated(ranker: Any, columns: Any) -> None:
            validate(ranker, columns)
            if ranker.version == version:
                self.reached.set()
                assert self.opened.wait(30), "the gate was never opened"

        monkeypatch.setattr(holder.loader, "validate", gated)

    async def wait(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 30), "the gated version was never validated"

    def open(self) -> None:
        self.opened.set()


def served(holder: ModelHolder) -> str:
    assert holder.current is not None
    return holder.current.version


@pytest.mark.slow
@pytest.mark.parametrize("watcher_round_meanwhile", [False, True])
def test_latest_moved_during_an_admin_reload_is_followed(
    artifacts_copy: Path, monkeypatch: pytest.MonkeyPatch, watcher_round_meanwhile: bool
) -> None:
    v0 = read_latest(artifacts_copy)
    v1 = copy_version(artifacts_copy, v0, "20991231-000000-new001").name

    async def scenario() -> None:
        async with holder_for(artifacts_copy) as holder:
            gate = Gate(holder, v1, monkeypatch)
            write_latest(artifacts_copy, v1)
            admin = asyncio.create_task(holder.reload_latest())
            await gate.wait()  # the admin reload is activating v1 ...
            write_latest(artifacts_copy, v0)  # ... when LATEST moves back to v0
            watcher = asyncio.create_task(holder.check()) if watcher_round_meanwhile else None
            await asyncio.sleep(0)  # the round reads LATEST (v0, served now) and waits for the reload
            gate.open()
            active, previous = await admin
            assert (active.version, previous and previous.version) == (v1, v0)
            if watcher is not None:
                await watcher
            await holder.check()  # the next round at the latest
            assert served(holder) == read_latest(artifacts_copy) == v0
            await holder.check()
            assert served(holder) == v0

    asyncio.run(scenario())


@pytest.mark.slow
def test_latest_moved_during_a_rollback_is_followed(
    artifacts_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v0 = read_latest(artifacts_copy)
    v1 = copy_version(artifacts_copy, v0, "20991231-000000-new001").name
    v2 = copy_version(artifacts_copy, v0, "20991231-000000-new002").name
    write_latest(artifacts_copy, v1)

    async def scenario() -> None:
        async with holder_for(artifacts_copy) as holder:
            assert served(holder) == v1
            gate = Gate(holder, v0, monkeypatch)
            rollback = asyncio.create_task(holder.rollback(v0))
            await gate.wait()  # the rollback is activating v0 ...
            write_latest(artifacts_copy, v2)  # ... when a retrain moves LATEST to v2
            watcher = asyncio.create_task(holder.check())
            await asyncio.sleep(0)  # the round reads LATEST (v2) and waits for the rollback
            gate.open()
            active, previous, updated = await rollback
            assert (active.version, previous and previous.version, updated) == (v0, v1, True)
            await watcher
            await holder.check()
            # whatever the order, the service ends up serving what LATEST names
            assert served(holder) == read_latest(artifacts_copy) == v0
            await holder.check()
            assert served(holder) == v0
            assert holder.current is not None and holder.current.source in ("rollback", "latest")

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# an unusable LATEST while a model is serving


@pytest.mark.parametrize(
    ("raw", "status", "names"),
    [
        (b"\xff\xfe", 409, "LATEST"),  # not UTF-8
        (b"", 409, "LATEST"),
        (b"\n", 409, "LATEST"),
        (b"../../etc/passwd\n", 409, "LATEST"),  # not a version id
        (b"20000101-000000-000000\n", 404, "20000101-000000-000000"),  # no such version
    ],
)
def test_an_unusable_latest_is_recorded_once_and_never_a_500(
    live: TestClient,
    artifacts_copy: Path,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    status: int,
    names: str,
) -> None:
    holder = live.app.state.holder
    v0 = read_latest(artifacts_copy)
    errors0 = reload_errors(live)
    caplog.set_level(logging.INFO, logger="service")
    put_latest(artifacts_copy, raw)
    wait_for(lambda: model_details(live)["last_reload_error"] is not None, what="the error")
    for _ in range(3):  # more watcher rounds: recorded once per bad LATEST, not once per poll
        live.portal.call(holder.check)
    err = model_details(live)["last_reload_error"]
    assert err["version"] == names, err
    assert reload_errors(live) == errors0 + 1
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING and "rejected" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert rank_ok(live) == v0
    # an explicit reload: a clear client error, counted too, still serving v0
    r = live.post("/admin/reload", headers=AUTH)
    assert r.status_code == status, r.text
    assert names in r.json()["error"]["message"]
    assert reload_errors(live) == errors0 + 2
    assert rank_ok(live) == v0 and live.get("/readyz").status_code == 200
    # the watcher kept polling: a good LATEST is picked up
    v1 = copy_version(artifacts_copy, v0, "20991231-000000-new003").name
    write_latest(artifacts_copy, v1)
    wait_for(lambda: live.get("/model").json()["version"] == v1, what="the good LATEST")
    assert rank_ok(live) == v1


def test_stopping_background_tasks_outlasts_a_swallowed_cancellation() -> None:
    """A task that drops one cancellation (as asyncio.wait_for can on 3.11) is cancelled again:
    the holder's stop, and so the app's shutdown, ends instead of hanging."""
    from service.watcher import cancel_and_wait

    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.append(True)  # carried on, like a watcher loop whose wait_for lost it
        await asyncio.sleep(60)

    async def main() -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(stubborn()), asyncio.create_task(asyncio.sleep(60))]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await cancel_and_wait(tasks, timeout_s=5.0)
        assert time.monotonic() - t0 < 2.0
        return tasks

    tasks = asyncio.run(main())
    assert swallowed == [True]
    assert all(t.cancelled() for t in tasks)
