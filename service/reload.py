"""The served model and its hot reload.

``ModelHolder.current`` is one immutable ``ActiveModel`` (ranker + store column map), replaced by
a single reference assignment (atomic in CPython). A request reads it once at its start and keeps
using that object, so a swap never affects a request in flight and never fails one.

A new version is loaded off the request path: checkpoint load + validation in a worker thread,
column mapping onto the feature store, warm-up and a test scoring. Only then is it swapped in.
Anything that fails along the way rejects that version (logged, counted as
``mtrank_model_reload_total{result="error"}``, shown by ``GET /admin/model``) and the old model keeps
serving.

The served version has one source of truth, decided by ``served_version`` the same way in every
replica and worker, at start-up and at every watcher round:

- without Redis: the version ``models/LATEST`` names;
- with the Redis store: ``{prefix}model:current`` once an admin reload or rollback set it (it
  records the version and what LATEST named at that moment), unless LATEST has moved since then
  (a newer training run): then LATEST's version, and the replica that notices moves
  ``model:current`` to it, so the fleet follows one pointer again.

The watcher task polls ``models/LATEST`` (mtime + content) every ``reload_interval_s``; with the
Redis store it also reads ``model:current`` and wakes up on its pub/sub channel. When the decided
version changes (or nothing is served yet) it is activated: whether that is already the served
version is decided under the activation lock, so a change seen while an admin reload or rollback is
loading another version is still acted on once it is done. A LATEST that cannot be used
(unreadable, empty, not a version id) is recorded like a rejected version, once per change, and the
watcher keeps polling. While Redis cannot be asked, the last pointer read stands.

LATEST is read in a daemon thread with a deadline (``latest_read_timeout_s``): a LATEST on a hung
file system (or a FIFO nobody writes) never blocks the event loop, so health checks and requests
keep being answered. A read that outlives its deadline is recorded as a rejection; no further
read starts until it returns.

A version that fails *transiently* (its folder, manifest or a file missing, a file shorter than
the manifest records: LATEST moved before the copy was complete; the feature store not ready) is
retried with a doubling backoff (``reload_retry_initial_s`` up to ``reload_retry_max_s``) while
the pointer keeps naming it. A *permanent* failure (bad digest or signature, corrupt or
incompatible checkpoint, failed test scoring) is recorded once and not retried until the pointer
changes (or an admin reload).

A rollback serves the version it names and points LATEST at it when the artifacts are writable, and
with Redis announces it in ``model:current``. Without Redis, LATEST is the only shared record, so a
rollback of read-only artifacts is refused (409) rather than served by one worker only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from model import (
    LATEST,
    CheckpointError,
    CheckpointNotFoundError,
    Combine,
    IncompleteCheckpointError,
    Ranker,
    check_version_id,
    clean_stale_temp,
    combine_for,
    combine_scores,
    models_dir,
    read_latest,
    resolve_checkpoint,
    write_latest,
)
from service.metrics import Metrics
from service.pointers import FleetPointer, RedisPointer
from service.settings import Settings
from service.store import ColumnMap, FeatureStore, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

# what made a version the served one
ReloadSource = Literal["startup", "latest", "redis", "admin-reload", "rollback"]

# (mtime_ns, inode, size) of models/LATEST; None when it cannot be stat'ed (e.g. it does not exist)
Signature = tuple[int, int, int] | None
UNSEEN: Signature = (-1, -1, -1)  # before the first look at LATEST


@dataclass(frozen=True)
class ActiveModel:
    ranker: Ranker
    columns: ColumnMap
    heads: tuple[str, ...]
    loaded_at: float  # epoch seconds
    source: ReloadSource
    # the combined score's default per-head weights and method: the settings', else the combination
    # fitted after training (the checkpoint's), else 1 per head and a product of binary heads / a sum
    weights: dict[str, float]
    combine: Combine
    weights_from: Literal["settings", "fitted", "default"] = "default"

    @property
    def version(self) -> str:
        return self.ranker.version


class ReloadError(Exception):
    """A model version that cannot be served; ``not_found`` when it does not exist at all;
    ``transient`` when trying again later may succeed (files still arriving)."""

    def __init__(
        self, version: str, message: str, *, not_found: bool = False, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.version, self.message, self.not_found, self.transient = version, message, not_found, transient


class PointerError(ReloadError):
    """``models/LATEST`` cannot be used: missing (``not_found``), unreadable, not a version id, or
    its read timed out (``transient``)."""

    def __init__(self, message: str, *, not_found: bool = False, transient: bool = False) -> None:
        super().__init__(LATEST, message, not_found=not_found, transient=transient)


def is_transient(e: BaseException) -> bool:
    """A failure that may go away without anyone changing the pointer: a version folder, manifest
    or file not there (yet), a file shorter than recorded, the feature store not ready."""
    return isinstance(e, CheckpointNotFoundError | IncompleteCheckpointError | StoreError)


@dataclass(frozen=True)
class Retry:
    version: str
    source: ReloadSource
    attempt: int  # failed attempts so far
    due: float  # time.monotonic() of the next attempt


class BlockingIO:
    """Blocking file I/O in daemon threads, awaited with a deadline.

    A call blocked in the kernel (a hung network file system, a FIFO) cannot be interrupted: its
    thread is left to finish on its own (a daemon thread never holds up the process's exit), and
    no new call starts while one is stuck, so they never pile up.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._stuck: list[tuple[threading.Thread, float]] = []  # (thread, when it started)

    def stuck_since(self) -> float | None:
        self._stuck = [(t, t0) for t, t0 in self._stuck if t.is_alive()]
        return min((t0 for _, t0 in self._stuck), default=None)

    async def run(self, fn: Callable[[], T], timeout: float) -> T:
        """``fn()`` in a new daemon thread. TimeoutError after ``timeout`` s, or at once while an
        earlier call is still stuck."""
        if self.stuck_since() is not None:
            raise TimeoutError
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, exc: BaseException | None) -> None:
            if done.done():  # timed out meanwhile
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result)

        def work() -> None:
            try:
                result, exc = fn(), None
            except BaseException as e:  # delivered to the awaiting task
                result, exc = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, result, exc)

        thread = threading.Thread(target=work, name=self.name, daemon=True)
        started = time.time()
        thread.start()
        try:
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            self._stuck.append((thread, started))
            raise


def _latest_signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def probe_latest(
    artifacts: Path, last: Signature, force: bool
) -> tuple[Signature, str | CheckpointError | None]:
    """(signature of LATEST, what it names or why it cannot be used); None instead of a read when
    the signature is ``last`` and not ``force``. Blocking: runs in a BlockingIO thread."""
    sig = _latest_signature(models_dir(artifacts) / LATEST)
    if sig == last and not force:
        return sig, None
    try:
        return sig, read_latest(artifacts)
    except CheckpointError as e:  # missing, unreadable, not UTF-8, or not a version id
        return sig, e


class RollbackRefused(ReloadError):
    """A rollback that could not be made durable for the whole fleet (nothing was changed)."""


def served_version(latest: str | None, pointer: FleetPointer | None) -> tuple[str, ReloadSource, bool] | None:
    """The version to serve: (version, source, whether it overrides ``model:current``), or None.

    ``latest``: what models/LATEST names (None: missing or unusable); ``pointer``: Redis'
    ``model:current`` (None: no Redis, or never set). The pointer wins while LATEST still names
    what it named when the pointer was set (a pointer of an older release, without that record,
    always wins); a LATEST moved since is a newer decision (a training run promoted a version).
    """
    if pointer is None:
        return (latest, "latest", False) if latest is not None else None
    if pointer.latest is None or latest is None or latest == pointer.latest:
        return pointer.version, "redis", False
    return latest, "latest", True


def _latest_writable(artifacts: Path) -> bool:
    folder = models_dir(artifacts)
    latest = folder / LATEST
    return os.access(folder, os.W_OK) and (not latest.exists() or os.access(latest, os.W_OK))


def default_weights(heads: tuple[str, ...], configured: dict[str, float] | None) -> dict[str, float]:
    """The combined score's per-head weights: the configured ones, else 1 for every head of the model."""
    return dict(configured) if configured is not None else dict.fromkeys(heads, 1.0)


def default_scoring(
    ranker: Ranker, settings: Settings
) -> tuple[dict[str, float], Combine, Literal["settings", "fitted", "default"]]:
    """(weights, combine, where they come from) of a model's combined score. The settings'
    weights (MTRANK_WEIGHTS) win; else the combination fitted for the model's objective after
    training, unless MTRANK_COMBINE names another method; else 1 per head (``default_combine``)."""
    heads = tuple(ranker.task_names)
    fitted = ranker.combination
    if settings.weights is not None:
        return dict(settings.weights), default_combine(ranker, settings.combine), "settings"
    if fitted is not None and settings.combine in (None, fitted.method):
        return dict(fitted.weights), fitted.method, "fitted"
    return default_weights(heads, None), default_combine(ranker, settings.combine), "default"


def default_combine(ranker: Ranker, configured: Combine | None) -> Combine:
    """The configured combination, else the product of probabilities when every head is binary and
    the sum otherwise (a regression head's prediction can be 0 or negative: no product of powers)."""
    return configured if configured is not None else combine_for(ranker.tasks)


def freeze_heap() -> None:
    """Collect, then move every object alive now (the app, the loaded models, the feature tables:
    hundreds of thousands of them) into the permanent generation, which the cyclic garbage
    collector no longer traverses: without it each full collection walked them all, 130-250 ms
    with the event loop stopped (docs/performance.md). Called after every model switch; objects
    of a replaced model are still freed by reference counting (they hold no cycles the collector
    would be needed for)."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("gc: %d objects frozen in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


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


class ModelHolder:
    """The served model: loads, validates and swaps versions (``activate``), follows the pointers
    (a watcher task: LATEST, and with ``fleet`` Redis' ``model:current`` and its announcements) and
    serves admin reloads and rollbacks."""

    def __init__(
        self, settings: Settings, store: FeatureStore, metrics: Metrics, fleet: RedisPointer | None = None
    ) -> None:
        self.settings, self.store, self.metrics, self.fleet = settings, store, metrics, fleet
        self._current: ActiveModel | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._latest_sig: Signature = UNSEEN  # the LATEST the watcher last acted on
        self._bad_latest: tuple[Signature, str] | None = None  # the unusable LATEST last recorded
        self._latest_version: str | None = None  # what the LATEST of _latest_sig names (None: unusable)
        self._pointer: FleetPointer | None = None  # model:current, as last read
        self._acted_on: tuple[Any, ...] | None = None  # (LATEST, pointer) the watcher last acted on
        self._retry: Retry | None = None  # a version that failed transiently, tried again when due
        self._latest_io = BlockingIO("mtrank-latest-read")
        self.last_error: dict[str, Any] | None = None

    # -- the served model ---------------------------------------------------------------------
    @property
    def current(self) -> ActiveModel | None:
        return self._current

    async def run_scoring(self, candidates: int, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound scoring in the forward thread pool; inline (on the event loop) when the
        settings say so, and for requests of at most ``inline_max_candidates`` candidates, whose
        forward costs less than the hop to a thread and back."""
        if self._executor is None or candidates <= self.settings.inline_max_candidates:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        # leftovers of crashed checkpoint writes: off the loop, never waited for (a hung file system)
        threading.Thread(
            target=clean_stale_temp,
            args=(self.settings.artifacts, self.settings.stale_temp_age_s),
            name="mtrank-clean-temp",
            daemon=True,
        ).start()
        if self.settings.forward_in_thread:
            self._executor = ThreadPoolExecutor(
                self.settings.forward_workers, thread_name_prefix="mtrank-forward"
            )
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
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- loading --------------------------------------------------------------------------------
    async def activate(self, version: str, source: ReloadSource) -> ActiveModel:
        """Load, validate and swap in ``version``; ReloadError (old model kept) on any problem."""
        async with self._lock:
            current = self._current
            if current is not None and current.version == version:
                return current
            t0 = time.perf_counter()
            try:
                active = await self._load(version, source)
            except ReloadError as e:
                self._record_error(e)
                raise
            # make what the store staged for it live, then swap: no await in between, so no
            # request sees the new tables with the old model or the other way round
            self.store.commit(active.columns)
            self._current = active  # the swap: one reference assignment
            freeze_heap()
            self.metrics.model_reloads.labels("ok").inc()
            self.metrics.set_model(active.version, active.ranker.config.model.arch, active.loaded_at)
            log.info(
                "serving model %s (%s, from %s) after %.2fs; previous %s",
                active.version,
                active.ranker.config.model.arch,
                source,
                time.perf_counter() - t0,
                current.version if current else None,
            )
            return active

    @property
    def version_or_none(self) -> str | None:
        return self._current.version if self._current else None

    def _record_error(self, e: ReloadError) -> None:
        """A version (or LATEST itself) rejected: /admin/model's last_reload_error, the error counter,
        a log."""
        self.metrics.model_reloads.labels("error").inc()
        repeated = self.last_error is not None and self.last_error["error"] == e.message
        self.last_error = {
            "version": e.version,
            "error": e.message,
            "at": _iso(time.time()),
            "transient": e.transient,
            "next_retry_at": None,
        }
        serving = self.version_or_none
        if isinstance(e, PointerError) and serving is None:  # e.g. nothing trained yet
            log.log(logging.DEBUG if repeated else logging.WARNING, "no model to serve yet: %s", e.message)
            return
        what = f"{LATEST} pointer" if isinstance(e, PointerError) else f"model {e.version}"
        level = logging.DEBUG if repeated else logging.ERROR
        log.log(level, "%s rejected (%s); still serving %s", what, e.message, serving)

    async def _load(self, version: str, source: ReloadSource) -> ActiveModel:
        try:
            # check_version_id first: resolve_checkpoint reads LATEST for an empty version
            check_version_id(version)
            path = await asyncio.to_thread(resolve_checkpoint, self.settings.artifacts, version)
        except CheckpointError as e:  # no such version (or not a version id at all)
            raise ReloadError(version, str(e), not_found=True, transient=is_transient(e)) from e
        key = self.settings.checkpoint_key
        try:
            ranker = await asyncio.to_thread(Ranker.load, path, key.get_secret_value() if key else None)
            if ranker.version != version:
                raise ReloadError(version, f"folder {version} holds a manifest for version {ranker.version}")
            # the compiled forward (model.compiled), checked against eager; eager when it fails
            await asyncio.to_thread(
                ranker.compile, self.settings.forward_backend, self.settings.torch_threads
            )
            heads = tuple(ranker.task_names)
            weights, combine, weights_from = default_scoring(ranker, self.settings)
            missing = sorted(set(weights) - set(heads))
            if missing:
                raise ReloadError(
                    version,
                    f"the configured weights (MTRANK_WEIGHTS) name heads {missing} this model lacks "
                    f"(heads: {list(heads)}); unset them to weigh every head 1",
                )
            columns = await self.store.prepare(ranker.schema, ranker.config.data)
            await asyncio.to_thread(self._validate, ranker, columns)
        except ReloadError:
            raise
        except (CheckpointError, StoreError) as e:  # incl. a version folder with files missing
            raise ReloadError(version, str(e), transient=is_transient(e)) from e
        except Exception as e:  # a bad checkpoint must never take the watcher down
            log.exception("unexpected error loading model %s", version)
            raise ReloadError(version, f"{type(e).__name__}: {e}") from e
        return ActiveModel(ranker, columns, heads, time.time(), source, weights, combine, weights_from)

    def _validate(self, ranker: Ranker, columns: ColumnMap) -> None:
        """Warm up, then score a few default rows shaped like the store's: every head finite."""
        ranker.warmup(n=self.settings.warmup_batch, rounds=2)
        n = 8
        ids = [f"__mtrank_probe_{i}" for i in range(n)]
        heads = ranker.score(
            columns.user.defaults(ids[:1]),
            columns.video.defaults(ids),
            ranker.schema.default_rows("context", 1),
        )
        for task in ranker.tasks:
            y = heads.get(task.name)
            if y is None or y.shape != (n,) or not np.isfinite(y).all():
                raise ReloadError(
                    ranker.version, f"test scoring: head {task.name!r} is not {n} finite scores"
                )
            if task.kind == "binary" and ((y < 0) | (y > 1)).any():
                raise ReloadError(ranker.version, f"test scoring: head {task.name!r} is not a probability")
        weights, combine, _ = default_scoring(ranker, self.settings)
        score = combine_scores(heads, weights, combine)
        if not np.isfinite(score).all():
            raise ReloadError(ranker.version, "test scoring: combined scores are not finite")

    # -- pointers -------------------------------------------------------------------------------
    async def _probe_latest(self, *, force: bool = False) -> tuple[Signature, str | CheckpointError | None]:
        """``probe_latest`` off the event loop, within ``latest_read_timeout_s``; PointerError
        (transient) when it times out or an earlier read is still stuck."""
        timeout = self.settings.latest_read_timeout_s
        fn = functools.partial(probe_latest, self.settings.artifacts, self._latest_sig, force)
        try:
            return await self._latest_io.run(fn, timeout)
        except TimeoutError:
            path = models_dir(self.settings.artifacts) / LATEST
            since = self._latest_io.stuck_since()
            raise PointerError(
                f"reading {path} timed out after {timeout:g}s (a hung file system, or not a regular file?)"
                + (f"; blocked since {_iso(since)}" if since is not None else ""),
                transient=True,
            ) from None

    def _pointer_error(self, sig: Signature, e: CheckpointError, *, explicit: bool) -> PointerError:
        """LATEST cannot be used: recorded once per distinct bad LATEST unless ``explicit`` (an
        admin request, always recorded)."""
        # not_found: there is no LATEST at all; otherwise it is there but unusable
        err = PointerError(str(e), not_found=sig is None)
        if explicit or self._bad_latest != (sig, err.message):
            self._bad_latest = (sig, err.message)
            self._record_error(err)
        return err

    async def _changed_latest(self) -> str | None:
        """The version LATEST names when it changed since the watcher last acted on it; None when
        unchanged or unusable (recorded). Keeps ``_latest_version``: what the LATEST of
        ``_latest_sig`` names (None when unusable)."""
        try:
            sig, named = await self._probe_latest()
        except PointerError as e:
            if self._bad_latest != (UNSEEN, "timeout"):  # once per stuck read, not every round
                self._bad_latest = (UNSEEN, "timeout")
                self._record_error(e)
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
            if await self._try(version, "startup" if self._current is None else source) and overrides_pointer:
                await self.announce(version)

    async def _try(self, version: str, source: ReloadSource) -> bool:
        """Activate from a pointer; a transient failure is scheduled for a retry, a permanent one
        is left for the next pointer change (both recorded by ``activate``). True when served."""
        try:
            await self.activate(version, source)
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
        if self.last_error is not None and self.last_error["version"] == version:
            self.last_error["next_retry_at"] = _iso(time.time() + delay)

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

    # -- admin ------------------------------------------------------------------------------------
    async def reload_latest(self) -> tuple[ActiveModel, ActiveModel | None]:
        """Activate what LATEST names now. Returns (active, previous).

        The LATEST this acted on is recorded by its signature taken *before* reading it, so a
        LATEST written while the version loads is a change the watcher still acts on; and only
        when the watcher has not acted on a LATEST in the meantime.
        """
        seen = self._latest_sig
        try:
            sig, named = await self._probe_latest(force=True)
        except PointerError as e:
            self._record_error(e)
            raise
        try:
            if not isinstance(named, str):  # (never None: force=True always reads)
                err = named if named is not None else CheckpointError(f"{LATEST} was not read")
                raise self._pointer_error(sig, err, explicit=True)
            self._bad_latest = None
            previous = self._current
            try:
                active = await self.activate(named, "admin-reload")
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
        if not shared and not _latest_writable(self.settings.artifacts):
            raise RollbackRefused(
                version,
                f"{models_dir(self.settings.artifacts) / LATEST} is not writable, and without the Redis "
                "store it is the only record every worker and replica follows: roll back where the "
                "artifacts are writable (`mtrank rollback`), or serve from Redis (model:current)",
            )
        previous = self._current
        active = await self.activate(version, "rollback")
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
            _, named = await self._probe_latest(force=True)
        except PointerError:  # LATEST does not answer: the pointer then always wins (served_version)
            named = None
        latest = named if isinstance(named, str) else None
        ok = await self.fleet.announce(version, latest)
        if ok:
            self._pointer = FleetPointer(version, latest)
        return ok

    # -- description ------------------------------------------------------------------------------
    def public(self) -> dict[str, Any]:
        """What anyone may see: the served version, whether one is served, and the request contract
        (heads, the video and context feature names, the weights in force and their bounds).
        Nothing about files, the store or LATEST."""
        active = self._current
        if active is None:
            return {"version": None, "status": "not_ready", "heads": [], "features": {}, "scoring": None}
        schema = active.ranker.schema
        features = {g: [n for cols in schema.columns(g) for n in cols] for g in ("video", "context")}
        return {
            "version": active.version,
            "status": "ready",
            "heads": list(active.heads),
            "features": features,
            "scoring": self._scoring(active),
        }

    def _scoring(self, active: ActiveModel) -> dict[str, Any]:
        """The combination in force, where it comes from (``fitted``, ``settings`` or ``default``),
        the weight bounds, and the combination fitted after training with its validation NDCG."""
        return {
            "combine": active.combine,
            "weights": active.weights,
            "weights_from": active.weights_from,
            "weight_bounds": [self.settings.weight_min, self.settings.weight_max],
            "fitted": _fitted(active.ranker.manifest),
        }

    def describe(self) -> dict[str, Any]:
        """Everything about the served model, its store and the last rejection (admin only: file
        paths, the store's address, what LATEST named)."""
        active = self._current
        out: dict[str, Any] = {"last_reload_error": self.last_error}
        if active is None:
            return {"version": None, **out}
        r = active.ranker
        manifest = r.manifest
        return {
            "version": r.version,
            "arch": r.config.model.arch,
            "tasks": [{"name": t.name, "kind": t.kind, "label": t.label} for t in r.tasks],
            "heads": list(active.heads),
            "created_at": manifest.get("created_at"),
            "loaded_at": _iso(active.loaded_at),
            "source": active.source,
            "metrics": _finite(manifest.get("metrics", {})),
            "config": r.config.to_dict(),
            "forward": r.backend_info,
            "scoring": self._scoring(active),
            "feature_store": self.store.describe(),
            **out,
        }


def _fitted(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The combination fitted after training and how it did on the validation lists (None: the
    checkpoint has none)."""
    ranking = manifest.get("ranking")
    if not isinstance(ranking, dict) or not isinstance(ranking.get("combination"), dict):
        return None
    out = dict(ranking["combination"])
    out["objective"] = ranking.get("objective")
    out["validation"] = ranking.get("validation")
    return _finite(out)  # type: ignore[no-any-return]


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
