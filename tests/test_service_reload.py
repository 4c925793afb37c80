"""Hot reload: retrain under load with zero failed requests; bad checkpoints rejected; admin endpoints."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model import read_latest, write_latest
from model.checkpoint import WEIGHTS, models_dir
from service.app import create_app
from service.settings import Settings

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


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def copy_version(artifacts: Path, source: str, new: str) -> Path:
    dst = models_dir(artifacts) / new
    shutil.copytree(models_dir(artifacts) / source, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = new
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


# --------------------------------------------------------------------------------------------
# a real server, retrained under load


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
    stop = threading.Event()
    seen: list[list[tuple[int, str | None]]] = [[], []]

    def hammer(out: list[tuple[int, str | None]]) -> None:
        with httpx.Client(base_url=svc.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/rank", json=REQUEST)
                except httpx.HTTPError as e:  # a dropped connection is a failed request too
                    out.append((-1, repr(e)))
                    continue
                out.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=hammer, args=(out,), daemon=True) for out in seen]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(out) >= 5 for out in seen), what="the first responses")
        new = train_tiny(artifacts_copy, seed=7)  # writes a new version and moves LATEST, under load
        assert new != old
        wait_for(lambda: all(out and out[-1][1] == new for out in seen), timeout=30, what="the new version")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    failures = [r for out in seen for r in out if r[0] != 200]
    assert not failures, failures[:5]
    for out in seen:
        versions = [v for _, v in out]
        assert versions[0] == old and versions[-1] == new
        # one swap: once a client saw the new model it never sees the old one again
        first_new = versions.index(new)
        assert set(versions[first_new:]) == {new} and set(versions[:first_new]) == {old}
    assert sum(len(out) for out in seen) > 20
    log = svc.output()
    assert f"serving model {new}" in log and "Traceback" not in log


# --------------------------------------------------------------------------------------------
# bad checkpoints


@pytest.fixture
def live(artifacts_copy: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(artifacts_copy, admin_token=TOKEN))) as c:
        yield c


@pytest.mark.parametrize(
    "damage", ["truncated weights", "manifest not JSON", "missing weights", "wrong tensors"]
)
def test_bad_checkpoint_is_rejected_and_old_model_keeps_serving(
    live: TestClient, artifacts_copy: Path, damage: str
) -> None:
    old = read_latest(artifacts_copy)
    bad = "20991231-000000-bad001"
    path = copy_version(artifacts_copy, old, bad)
    if damage == "truncated weights":
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[: len(data) // 2])
        expect = "SHA-256"
    elif damage == "manifest not JSON":
        (path / "manifest.json").write_text("{not json")
        expect = "not valid JSON"
    elif damage == "missing weights":
        (path / WEIGHTS).unlink()
        expect = "no weights.safetensors"
    else:  # consistent file, but the network it describes does not fit the weights
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["config"]["model"]["expert_dims"] = [7]
        (path / "manifest.json").write_text(json.dumps(manifest))
        expect = "weights do not fit"
    errors0 = reload_errors(live)
    write_latest(artifacts_copy, bad)
    wait_for(lambda: live.get("/model").json()["last_reload_error"] is not None, what="the rejection")
    err = live.get("/model").json()["last_reload_error"]
    assert err["version"] == bad and expect in err["error"], err
    assert reload_errors(live) == errors0 + 1
    assert live.get("/readyz").status_code == 200
    r = live.post("/rank", json=REQUEST)
    assert r.status_code == 200 and r.json()["model_version"] == old
    time.sleep(0.3)  # not retried every poll while LATEST stays the same
    assert reload_errors(live) == errors0 + 1
    # an explicit reload of the bad LATEST reports the rejection, still serving the old model
    r = live.post("/admin/reload", headers=AUTH)
    assert r.status_code == 409 and "still serving the previous model" in r.json()["error"]["message"]
    assert live.post("/rank", json=REQUEST).json()["model_version"] == old


def test_a_good_model_after_a_bad_one_is_picked_up(
    live: TestClient, artifacts_copy: Path, train_tiny: Any
) -> None:
    old = read_latest(artifacts_copy)
    bad = copy_version(artifacts_copy, old, "20991231-000000-bad002")
    (bad / WEIGHTS).write_bytes(b"garbage")
    write_latest(artifacts_copy, bad.name)
    wait_for(lambda: live.get("/model").json()["last_reload_error"] is not None, what="the rejection")
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
    info = live.get("/model").json()
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
