"""``models/LATEST``, read off the event loop (``LatestReader``).

LATEST names the version a training run promoted (``model.read_latest`` / ``write_latest``). It is
read in a daemon thread with a deadline (``latest_read_timeout_s``): a LATEST on a hung file system
(or a FIFO nobody writes) never blocks the event loop, so health checks and requests keep being
answered. A read that outlives its deadline is a ``PointerError`` (transient); no further read
starts until it returns (``BlockingIO``).

The file is read only when its signature (mtime, inode, size) differs from the one last acted on,
unless the read is forced (an admin reload). A LATEST that cannot be used (missing, unreadable, not
UTF-8, not a version id) comes back as the ``CheckpointError`` saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from model import LATEST, CheckpointError, models_dir, read_latest
from service.loader import ReloadError, iso

T = TypeVar("T")

# (mtime_ns, inode, size) of models/LATEST; None when it cannot be stat'ed (e.g. it does not exist)
Signature = tuple[int, int, int] | None
UNSEEN: Signature = (-1, -1, -1)  # before the first look at LATEST


class PointerError(ReloadError):
    """``models/LATEST`` cannot be used: missing (``not_found``), unreadable, not a version id, or
    its read timed out (``transient``)."""

    def __init__(self, message: str, *, not_found: bool = False, transient: bool = False) -> None:
        super().__init__(LATEST, message, not_found=not_found, transient=transient)


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


class LatestReader:
    """``probe_latest`` of one artifacts folder, off the event loop and within ``timeout`` s."""

    def __init__(self, artifacts: Path, timeout: float) -> None:
        self.artifacts, self.timeout = artifacts, timeout
        self._io = BlockingIO("mtrank-latest-read")

    async def probe(
        self, last: Signature, *, force: bool = False
    ) -> tuple[Signature, str | CheckpointError | None]:
        """``probe_latest(artifacts, last, force)``; PointerError (transient) when it times out or
        an earlier read is still stuck."""
        fn = functools.partial(probe_latest, self.artifacts, last, force)
        try:
            return await self._io.run(fn, self.timeout)
        except TimeoutError:
            path = models_dir(self.artifacts) / LATEST
            since = self._io.stuck_since()
            blocked = "" if since is None else f"; blocked since {iso(since)}"
            raise PointerError(
                f"reading {path} timed out after {self.timeout:g}s (a hung file system, or not a "
                f"regular file?){blocked}",
                transient=True,
            ) from None


def latest_writable(artifacts: Path) -> bool:
    """Whether this process may (re)write models/LATEST."""
    folder = models_dir(artifacts)
    latest = folder / LATEST
    return os.access(folder, os.W_OK) and (not latest.exists() or os.access(latest, os.W_OK))
