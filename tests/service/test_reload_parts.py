"""The hot reload's parts on their own: the loader (service.loader), the two-phase switch
(service.served), the watcher's decisions (service.watcher), the LATEST reader (service.latest),
the served-version rule (service.pointers) and the forward pool (service.forward).

Real tiny checkpoints and the embedded store; no app, no watcher task: every round is run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from modelkit import copy_version, service_settings

from model import CheckpointError, models_dir, read_latest, write_latest
from model.checkpoint import LATEST, WEIGHTS
from service.forward import ForwardPool
from service.latest import UNSEEN, LatestReader
from service.loader import ModelLoader, ReloadError
from service.metrics import Metrics
from service.pointers import FleetPointer, served_version
from service.served import ServedModel
from service.store import open_store
from service.watcher import ModelWatcher


class Parts:
    """A loader, the served model and a watcher over one artifacts dir (no fleet pointer)."""

    def __init__(self, artifacts: Path, **overrides: Any) -> None:
        self.settings = service_settings(artifacts, **overrides)
        self.store = open_store(self.settings)
        self.metrics = Metrics()
        self.loader = ModelLoader(self.settings, self.store)
        self.served = ServedModel(self.loader, self.metrics)
        self.watcher = ModelWatcher(self.settings, self.served, self.store, self.metrics)

    def reloads(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value("mtrank_model_reload_total", {"result": result})
        assert value is not None
        return value

    def serving(self) -> tuple[str, str]:
        active = self.served.current
        assert active is not None
        return active.version, active.source


@contextlib.asynccontextmanager
async def parts(artifacts: Path, **overrides: Any) -> AsyncIterator[Parts]:
    p = Parts(artifacts, **overrides)
    try:
        yield p
    finally:
        await p.store.close()


@contextlib.contextmanager
def weights_moved_away(folder: Path, tmp_path: Path) -> Iterator[None]:
    """The version's weights file is missing inside the block (a copy not complete yet)."""
    aside = tmp_path / "weights-aside"
    (folder / WEIGHTS).rename(aside)
    try:
        yield
    finally:
        aside.rename(folder / WEIGHTS)


def flip_a_weights_byte(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# the loader: a version -> a checked ActiveModel, or a ReloadError; nothing served


def test_the_loader_builds_a_warmed_model_with_its_fitted_combination(trained_artifacts: Path) -> None:
    version = read_latest(trained_artifacts)

    async def scenario() -> None:
        async with parts(trained_artifacts) as p:
            active = await p.loader.load(version, "rollback")
            assert (active.version, active.source) == (version, "rollback")
            assert active.heads == tuple(active.ranker.task_names)
            fitted = active.ranker.combination
            assert fitted is not None and active.weights_from == "fitted"
            assert (active.weights, active.combine) == (dict(fitted.weights), fitted.method)
            assert p.served.current is None  # loading is not serving
            assert p.reloads("ok") == p.reloads("error") == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("damage", "expect", "transient", "not_found"),
    [
        ("no such version", "not found", True, True),
        ("weights missing", "no weights.safetensors", True, False),  # a copy in progress
        ("weights altered", "SHA-256", False, False),
        ("another version's folder", "holds a manifest for version", False, False),
    ],
)
def test_the_loader_refuses_a_bad_version_and_says_whether_to_retry(
    artifacts_copy: Path, tmp_path: Path, damage: str, expect: str, transient: bool, not_found: bool
) -> None:
    good = read_latest(artifacts_copy)
    bad = "20991231-000000-bad001"
    if damage == "another version's folder":  # an intact checkpoint, filed under the wrong id
        (models_dir(artifacts_copy) / good).rename(models_dir(artifacts_copy) / bad)
    elif damage != "no such version":
        folder = copy_version(artifacts_copy, good, bad)
        if damage == "weights missing":
            (folder / WEIGHTS).unlink()
        else:
            flip_a_weights_byte(folder)

    async def scenario() -> ReloadError:
        async with parts(artifacts_copy) as p:
            with pytest.raises(ReloadError) as caught:
                await p.loader.load(bad, "latest")
            return caught.value

    e = asyncio.run(scenario())
    assert e.version == bad and expect in e.message, e.message
    assert (e.transient, e.not_found) == (transient, not_found)


def test_the_loader_refuses_configured_weights_for_heads_the_model_lacks(trained_artifacts: Path) -> None:
    version = read_latest(trained_artifacts)

    async def scenario() -> ReloadError:
        async with parts(trained_artifacts, weights={"nosuchhead": 1.0}) as p:
            with pytest.raises(ReloadError) as caught:
                await p.loader.load(version, "startup")
            return caught.value

    e = asyncio.run(scenario())
    assert "MTRANK_WEIGHTS" in e.message and "nosuchhead" in e.message and not e.transient


# --------------------------------------------------------------------------------------------
# the served model: one swap per activation; a rejection changes nothing but last_error


def test_activation_swaps_once_and_a_rejected_version_leaves_the_served_one(artifacts_copy: Path) -> None:
    good = read_latest(artifacts_copy)
    bad = "20991231-000000-bad002"
    flip_a_weights_byte(copy_version(artifacts_copy, good, bad))

    async def scenario() -> None:
        async with parts(artifacts_copy) as p:
            active = await p.served.activate(good, "startup")
            assert p.served.current is active and p.reloads("ok") == 1
            assert await p.served.activate(good, "admin-reload") is active  # served already: a no-op
            assert p.reloads("ok") == 1 and p.served.last_error is None
            with pytest.raises(ReloadError, match="SHA-256"):
                await p.served.activate(bad, "latest")
            assert p.served.current is active
            err = p.served.last_error
            assert err is not None and (err["version"], err["transient"]) == (bad, False)
            assert (p.reloads("ok"), p.reloads("error")) == (1, 1)

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# the watcher's decisions, round by round


def test_the_watcher_acts_on_a_changed_latest_only(artifacts_copy: Path) -> None:
    v0 = read_latest(artifacts_copy)
    v1 = copy_version(artifacts_copy, v0, "20991231-000000-new001").name

    async def scenario() -> None:
        async with parts(artifacts_copy) as p:
            await p.watcher.check()
            assert p.serving() == (v0, "startup")
            first = p.served.current
            await p.watcher.check()  # LATEST unchanged: nothing loaded
            assert p.served.current is first and p.reloads("ok") == 1
            write_latest(artifacts_copy, v1)
            await p.watcher.check()
            assert p.serving() == (v1, "latest") and p.reloads("ok") == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("raw", [b"../../etc/passwd\n", b"", b"\xff\xfe"])
def test_an_unusable_latest_is_recorded_once_and_a_good_one_followed(
    artifacts_copy: Path, raw: bytes
) -> None:
    v0 = read_latest(artifacts_copy)
    v1 = copy_version(artifacts_copy, v0, "20991231-000000-new002").name
    latest = models_dir(artifacts_copy) / LATEST

    async def scenario() -> None:
        async with parts(artifacts_copy) as p:
            await p.watcher.check()
            tmp = latest.with_name(".LATEST.test.tmp")
            tmp.write_bytes(raw)
            tmp.replace(latest)
            for _ in range(3):
                await p.watcher.check()
            err = p.served.last_error
            assert err is not None and err["version"] == LATEST, err
            assert p.reloads("error") == 1  # once per bad LATEST, not once per round
            assert p.serving() == (v0, "startup")
            write_latest(artifacts_copy, v1)
            await p.watcher.check()
            assert p.serving() == (v1, "latest")

    asyncio.run(scenario())


def test_a_transient_failure_is_retried_once_its_backoff_is_over(
    artifacts_copy: Path, tmp_path: Path
) -> None:
    v0 = read_latest(artifacts_copy)
    folder = copy_version(artifacts_copy, v0, "20991231-000000-new003")
    backoff = 1.0

    async def scenario() -> None:
        async with parts(artifacts_copy, reload_retry_initial_s=backoff) as p:
            await p.watcher.check()
            with weights_moved_away(folder, tmp_path):
                write_latest(artifacts_copy, folder.name)  # LATEST moved before the copy was complete
                failed_at = time.monotonic()
                await p.watcher.check()
                err = p.served.last_error
                assert err is not None and err["transient"] is True and err["next_retry_at"], err
            # the files are complete now, but the retry is not due yet (LATEST did not change)
            await p.watcher.check()
            if time.monotonic() - failed_at < backoff:
                assert p.serving() == (v0, "startup") and p.reloads("error") == 1
            await asyncio.sleep(max(0.0, failed_at + backoff - time.monotonic()) + 0.05)
            await p.watcher.check()
            assert p.serving() == (folder.name, "latest")

    asyncio.run(scenario())


def test_a_permanent_failure_waits_for_the_pointer_to_change(artifacts_copy: Path) -> None:
    v0 = read_latest(artifacts_copy)
    folder = copy_version(artifacts_copy, v0, "20991231-000000-new004")
    intact = (folder / WEIGHTS).read_bytes()
    flip_a_weights_byte(folder)

    async def scenario() -> None:
        async with parts(artifacts_copy, reload_retry_initial_s=0.01) as p:
            await p.watcher.check()
            write_latest(artifacts_copy, folder.name)
            await p.watcher.check()
            err = p.served.last_error
            assert err is not None and err["transient"] is False and err["next_retry_at"] is None, err
            (folder / WEIGHTS).write_bytes(intact)  # repaired, but LATEST still the one acted on
            await asyncio.sleep(0.05)  # what would be several retry periods
            await p.watcher.check()
            assert p.serving() == (v0, "startup") and p.reloads("error") == 1
            write_latest(artifacts_copy, folder.name)  # LATEST written again: a new decision
            await p.watcher.check()
            assert p.serving() == (folder.name, "latest")

    asyncio.run(scenario())


def test_rollback_and_reload_latest_move_latest_and_the_served_model(artifacts_copy: Path) -> None:
    v0 = read_latest(artifacts_copy)
    v1 = copy_version(artifacts_copy, v0, "20991231-000000-new005").name

    async def scenario() -> None:
        async with parts(artifacts_copy) as p:
            await p.watcher.check()
            active, previous, updated = await p.watcher.rollback(v1)  # (a "rollback" to any version)
            assert (active.version, previous and previous.version, updated) == (v1, v0, True)
            assert read_latest(artifacts_copy) == v1 and p.serving() == (v1, "rollback")
            await p.watcher.check()  # LATEST rewritten to what is served: nothing to do
            assert p.serving() == (v1, "rollback") and p.reloads("ok") == 2
            write_latest(artifacts_copy, v0)
            active, previous = await p.watcher.reload_latest()
            assert (active.version, previous and previous.version) == (v0, v1)
            assert p.serving() == (v0, "admin-reload")
            await p.watcher.check()  # the reload acted on this LATEST already
            assert p.reloads("ok") == 3
            assert await p.watcher.announce(v0) is None  # no fleet pointer without Redis

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# LATEST and the served-version rule


def test_latest_is_read_only_when_its_signature_changes(tmp_path: Path) -> None:
    reader = LatestReader(tmp_path, timeout=5.0)
    latest = models_dir(tmp_path) / LATEST

    async def scenario() -> None:
        sig, named = await reader.probe(UNSEEN)
        assert sig is None and isinstance(named, CheckpointError)  # no LATEST at all
        latest.parent.mkdir(parents=True)
        latest.write_text("20991231-000000-aaaaaa\n")
        sig, named = await reader.probe(UNSEEN)
        assert sig is not None and named == "20991231-000000-aaaaaa"
        assert await reader.probe(sig) == (sig, None)  # unchanged: not read
        assert await reader.probe(sig, force=True) == (sig, "20991231-000000-aaaaaa")
        latest.unlink()
        latest.write_text("../x\n")  # another file (inode), not a version id
        sig2, named = await reader.probe(sig)
        assert sig2 != sig and isinstance(named, CheckpointError)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("latest", "pointer", "expected"),
    [
        (None, None, None),  # nothing to serve
        ("a", None, ("a", "latest", False)),  # no Redis (or never set): LATEST
        ("a", FleetPointer("b", "a"), ("b", "redis", False)),  # set while LATEST named a: the pointer
        (None, FleetPointer("b", "a"), ("b", "redis", False)),  # LATEST unusable: the pointer
        ("c", FleetPointer("b", None), ("b", "redis", False)),  # an older release's pointer always wins
        ("c", FleetPointer("b", "a"), ("c", "latest", True)),  # LATEST moved since: LATEST, overriding
    ],
)
def test_the_served_version_rule(
    latest: str | None, pointer: FleetPointer | None, expected: tuple[str, str, bool] | None
) -> None:
    assert served_version(latest, pointer) == expected


# --------------------------------------------------------------------------------------------
# the forward pool


def test_the_forward_pool_scores_large_requests_in_its_threads_and_small_ones_inline(
    trained_artifacts: Path,
) -> None:
    def thread() -> str:
        return threading.current_thread().name

    async def scenario(forward_in_thread: bool) -> list[str]:
        settings = service_settings(
            trained_artifacts, forward_in_thread=forward_in_thread, inline_max_candidates=4
        )
        pool = ForwardPool(settings)
        names = [await pool.run(5, thread)]  # not started: inline
        pool.start()
        names += [await pool.run(4, thread), await pool.run(5, thread)]
        pool.stop()
        names.append(await pool.run(5, thread))
        return names

    loop = threading.current_thread().name
    assert asyncio.run(scenario(True)) == [loop, loop, "mtrank-forward_0", loop]
    assert asyncio.run(scenario(False)) == [loop] * 4
