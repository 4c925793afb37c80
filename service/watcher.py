"""Which version to serve, and when to switch to it (``ModelWatcher``).

The served version has one source of truth, decided by ``service.pointers.served_version`` the same
way in every replica and worker, at start-up and at every watcher round:

- without Redis: the version ``models/LATEST`` names;
- with the Redis store: ``{prefix}model:current`` once an admin reload or rollback set it (it
  records the version and what LATEST named at that moment), unless LATEST has moved since then
  (a newer training run): then LATEST's version, and the replica that notices moves
  ``model:current`` to it, so the fleet follows one pointer again.

The watcher task polls ``models/LATEST`` (signature + content, service.latest) every
``reload_interval_s``; with the Redis store it also reads ``model:current`` and wakes up on its
pub/sub channel. When the decided version changes (or nothing is served yet) it is activated
(service.served): whether that is already the served version is decided under the activation lock,
so a change seen while an admin reload or rollback is loading another version is still acted on
once it is done. A LATEST that cannot be used (unreadable, empty, not a version id, its read timed
out) is recorded like a rejected version, once per change, and the watcher keeps polling. While
Redis cannot be asked, the last pointer read stands.

A version that fails *transiently* (service.loader's ``is_transient``) is retried with a doubling
backoff (``reload_retry_initial_s`` up to ``reload_retry_max_s``) while the pointer keeps naming it.
A *permanent* failure is recorded once and not retried until the pointer changes (or an admin
reload).

The admin actions move the pointers too: ``reload_latest`` activates what LATEST names now;
``rollback`` serves the version it names and points LATEST at it when the artifacts are writable;
``announce`` (Redis mode) sets ``model:current`` for the fleet. Without Redis, LATEST is the only
shared record, so a rollback of read-only artifacts is refused (409) rather than served by one
worker only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from model import LATEST, CheckpointError, models_dir, write_latest
from service.latest import UNSEEN, LatestReader, PointerError, Signature, latest_writable
from service.loader import ActiveModel, ReloadError, ReloadSource, iso
from service.metrics import Metrics
from service.pointers import FleetPointer, RedisPointer, served_version
from service.served import ServedModel
from service.settings import Settings
from service.store import FeatureStore

log = logging.getLogger(__name__)


class RollbackRefused(ReloadError):
    """A rollback that could not be made durable for the whole fleet (nothing was changed)."""


@dataclass(frozen=True)
class Retry:
    version: str
    source: ReloadSource
    attempt: int  # failed attempts so far
    due: float  # time.monotonic() of the next attempt


async def cancel_and_wait(tasks: list[asyncio.Task[None]], timeout_s: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until they end, cancelling again while any runs on.

    One ``cancel()`` is not always enough: on Python 3.11, ``asyncio.wait_for`` returns the inner
    result and drops the cancellation when the two arrive together (CPython gh-86296), and a
    watcher loop then carries on; awaiting it hung the shutdown."""
    deadline = time.monotonic() + timeout_s
    pending = [t for t in tasks if not t.done()]
    while pending and time.monotonic() < deadline:
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.2)
        pending = [t for t in pending if not t.done()]
    for t in pending:
        log.warning("background task %s did not stop within %.0fs", t.get_name(), timeout_s)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.warning("background task %s ended with %r", t.get_name(), t.exception())


class ModelWatcher:
    """Follows the pointers (LATEST, and with ``fleet`` Redis' ``model:current`` and its
    announcements) into ``served``, round by round (``check``; a task between ``start`` and
    ``stop``), and carries out the admin reloads, rollbacks and announcements."""

    def __init__(
        self,
        settings: Settings,
        served: ServedModel,
        store: FeatureStore,
        metrics: Metrics,
        fleet: RedisPointer | None = None,
    ) -> None:
        self.settings, self.served, self.fleet = settings, served, fleet
        self.store, self.metrics = store, metrics  # for the store's health, checked every round
        self._latest = LatestReader(settings.artifacts, settings.latest_read_timeout_s)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._latest_sig: Signature = UNSEEN  # the LATEST the watcher last acted on
        self._bad_latest: tuple[Signature, str] | None = None  # the unusable LATEST last recorded
        self._latest_version: str | None = None  # what the LATEST of _latest_sig names (None: unusable)
        self._pointer: FleetPointer | None = None  # model:current, as last read
        self._acted_on: tuple[Any, ...] | None = None  # (LATEST, pointer) the watcher last acted on
        self._retry: Retry | None = None  # a version that failed transiently, tried again when due

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """A first round (never raises: the service starts unready rather than failing), then the
        watcher task and, with Redis, the listener of ``model:current`` announcements."""
        try:
            await self.check()
        except Exception:  # never fail startup: stay unready, the watcher keeps trying
            log.exception("initial model load failed")
        await self.check_store()
        self._tasks.append(asyncio.create_task(self._watch(), name="mtrank-model-watcher"))
        if self.fleet is not None:
            self._tasks.append(asyncio.create_task(self.fleet.listen(self._wake), name="mtrank-model-events"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    async def _watch(self) -> None:
        interval = self.settings.reload_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model watcher round failed")
            await self.check_store()

    async def check_store(self) -> None:
        """The feature store's health (a wiped or evicted Redis), into the metrics; never raises."""
        try:
            problem = await self.store.check_health()
        except Exception:
            log.exception("feature store health check failed")
            return
        gauges = self.store.health_gauges()
        if gauges is not None:  # the embedded store has no such health
            self.metrics.set_store_health(problem, *gauges)

    # -- following the pointers -----------------------------------------------------------------
    def _pointer_error(self, sig: Signature, e: CheckpointError, *, explicit: bool) -> PointerError:
        """LATEST cannot be used: recorded once per distinct bad LATEST unless ``explicit`` (an
        admin request, always recorded)."""
        # not_found: there is no LATEST at all; otherwise it is there but unusable
        err = PointerError(str(e), not_found=sig is None)
        if explicit or self._bad_latest != (sig, err.message):
            self._bad_latest = (sig, err.message)
            self.served.record_error(err)
        return err

    async def _changed_latest(self) -> str | None:
        """The version LATEST names when it changed since the watcher last acted on it; None when
        unchanged or unusable (recorded). Keeps ``_latest_version``: what the LATEST of
        ``_latest_sig`` names (None when unusable)."""
        try:
            sig, named = await self._latest.probe(self._latest_sig)
        except PointerError as e:
            if self._bad_latest != (UNSEEN, "timeout"):  # once per stuck read, not every round
                self._bad_latest = (UNSEEN, "timeout")
                self.served.record_error(e)
            return None
        if self._bad_latest == (UNSEEN, "timeout"):
            self._bad_latest = None  # LATEST answers again
        if sig == self._latest_sig and named is None:
            return None
        self._latest_sig = sig
        self._retry = None  # a new LATEST: whatever the old one named is not retried
        if isinstance(named, CheckpointError):
            self._latest_version = None
            self._pointer_error(sig, named, explicit=False)
            return None
        self._bad_latest = None
        self._latest_version = named
        return named

    async def check(self) -> None:
        """One watcher round: activate the version ``served_version`` decides when LATEST or
        ``model:current`` changed, or retry one that failed transiently once its backoff is over;
        with Redis, move ``model:current`` along when LATEST overrode it.

        A change is acted on even when it names the version being served right now: ``activate``
        decides under its lock, after any reload or rollback in progress, whether it is a no-op.
        """
        await self._changed_latest()  # updates _latest_sig and _latest_version
        if self.fleet is not None:
            answered, pointer = await self.fleet.read()
            if answered:
                self._pointer = pointer
        target: tuple[str, ReloadSource, bool] | None = None
        decided = served_version(self._latest_version, self._pointer)
        inputs = (self._latest_sig, self._latest_version, self._pointer)
        if decided is not None and inputs != self._acted_on:
            self._acted_on = inputs
            self._retry = None  # a new decision: whatever failed before is not retried
            target = decided
        retry = self._retry
        if target is None and retry is not None and time.monotonic() >= retry.due:
            target = (retry.version, retry.source, False)
        if target is not None:
            version, source, overrides_pointer = target
            first = self.served.current is None
            if await self._try(version, "startup" if first else source) and overrides_pointer:
                await self.announce(version)

    async def _try(self, version: str, source: ReloadSource) -> bool:
        """Activate from a pointer; a transient failure is scheduled for a retry, a permanent one
        is left for the next pointer change (both recorded by ``activate``). True when served."""
        try:
            await self.served.activate(version, source)
        except ReloadError as e:
            self._after_failure(e, version, source)
            return False
        self._retry = None
        return True

    def _after_failure(self, e: ReloadError, version: str, source: ReloadSource) -> None:
        """Schedule the next try of a transient failure (the wait doubles per failed attempt);
        forget any retry after a permanent one."""
        previous = self._retry
        if not e.transient:
            self._retry = None
            return
        attempt = previous.attempt + 1 if previous is not None and previous.version == version else 1
        s = self.settings
        delay = min(s.reload_retry_max_s, s.reload_retry_initial_s * 2 ** min(attempt - 1, 30))
        self._retry = Retry(version, source, attempt, time.monotonic() + delay)
        last_error = self.served.last_error
        if last_error is not None and last_error["version"] == version:
            last_error["next_retry_at"] = iso(time.time() + delay)

    # -- admin ------------------------------------------------------------------------------------
    async def reload_latest(self) -> tuple[ActiveModel, ActiveModel | None]:
        """Activate what LATEST names now. Returns (active, previous).

        The LATEST this acted on is recorded by its signature taken *before* reading it, so a
        LATEST written while the version loads is a change the watcher still acts on; and only
        when the watcher has not acted on a LATEST in the meantime.
        """
        seen = self._latest_sig
        try:
            sig, named = await self._latest.probe(self._latest_sig, force=True)
        except PointerError as e:
            self.served.record_error(e)
            raise
        try:
            if not isinstance(named, str):  # (never None: force=True always reads)
                err = named if named is not None else CheckpointError(f"{LATEST} was not read")
                raise self._pointer_error(sig, err, explicit=True)
            self._bad_latest = None
            previous = self.served.current
            try:
                active = await self.served.activate(named, "admin-reload")
            except ReloadError as e:
                self._after_failure(e, named, "latest")  # files still arriving: retried like the watcher's
                raise
            self._retry = None
        finally:
            if self._latest_sig == seen:
                self._latest_sig, self._latest_version = sig, named if isinstance(named, str) else None
        return active, previous

    async def rollback(self, version: str) -> tuple[ActiveModel, ActiveModel | None, bool]:
        """Activate an existing version and point LATEST at it (when the artifacts are writable).

        Returns (active, previous, latest_updated). Without Redis, LATEST is the one record every
        worker and replica follows: a rollback it cannot be written for is refused
        (``RollbackRefused``) before anything changes. The watcher's view of LATEST is left alone:
        LATEST rewritten here names the served version (a no-op for the watcher), and one rewritten
        by anyone else meanwhile is a newer change it acts on.
        """
        shared = self.fleet is not None  # model:current carries the decision
        if not shared and not latest_writable(self.settings.artifacts):
            raise RollbackRefused(
                version,
                f"{models_dir(self.settings.artifacts) / LATEST} is not writable, and without the Redis "
                "store it is the only record every worker and replica follows: roll back where the "
                "artifacts are writable (`mtrank rollback`), or serve from Redis (model:current)",
            )
        previous = self.served.current
        active = await self.served.activate(version, "rollback")
        self._retry = None  # serving what the admin asked for, until a pointer changes
        try:
            await asyncio.to_thread(write_latest, self.settings.artifacts, version)
            updated = True
        except (OSError, CheckpointError) as e:
            log.warning("rollback to %s: LATEST not updated (%s); model:current decides", version, e)
            updated = False
        return active, previous, updated

    async def announce(self, version: str) -> bool | None:
        """Tell other replicas and workers (Redis mode): set model:current (with what LATEST names
        now) + publish. None without Redis."""
        if self.fleet is None:
            return None
        try:
            _, named = await self._latest.probe(self._latest_sig, force=True)
        except PointerError:  # LATEST does not answer: the pointer then always wins (served_version)
            named = None
        latest = named if isinstance(named, str) else None
        ok = await self.fleet.announce(version, latest)
        if ok:
            self._pointer = FleetPointer(version, latest)
        return ok
