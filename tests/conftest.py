"""Shared fixtures: a tiny real checkpoint, a real Redis, a private redis-server, a served process.

- ``trained_artifacts`` (session): an artifacts dir with one tiny real checkpoint (LATEST points at it),
  trained on the 300-user KuaiRand fixture in a few seconds. Treat it as read-only; tests that change
  LATEST or add versions use ``artifacts_copy``.
- ``train_tiny(artifacts, seed)``: train another tiny checkpoint into an artifacts dir (moves LATEST).
- ``redis_url`` / ``redis_prefix``: the shared test Redis ($MTRANK_TEST_REDIS_URL, default db 15 on
  127.0.0.1:6379) and a unique key prefix whose keys are deleted afterwards. When Redis is unreachable
  the test FAILS with a clear message: the Redis tests always run against a real server.
- ``redis_server``: a private redis-server on a free port, for tests that freeze or kill it.
- ``serve_process``: start ``mtrank serve`` in a subprocess and wait until /readyz answers 200.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import redis
from modelkit import ROOT, tiny_config

from model.config import Config
from model.train import train

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


def pytest_configure(config: pytest.Config) -> None:
    # Starlette's TestClient warns that it will move to httpx2; not actionable in this project.
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")


# --------------------------------------------------------------------------------------------
# models


TrainTiny = Callable[..., str]


@pytest.fixture(scope="session")
def train_tiny() -> TrainTiny:
    """``train_tiny(artifacts, seed=0, configure=None) -> version``: one epoch on the 300-user fixture,
    LATEST moved to it (the promotion gate is off: the reload tests need every new version served).

    ``configure(cfg)`` may change the config first (architecture, features, ...).
    """

    def run(artifacts: Path, seed: int = 0, configure: Callable[[Config], None] | None = None) -> str:
        cfg = tiny_config(epochs=1, seed=seed)
        cfg.promotion.enabled = False
        if configure is not None:
            configure(cfg)
        result = train(cfg, artifacts=artifacts)
        assert result.checkpoint is not None
        return result.checkpoint.name

    return run


@pytest.fixture(scope="session")
def trained_artifacts(tmp_path_factory: pytest.TempPathFactory, train_tiny: TrainTiny) -> Path:
    """An artifacts dir holding one tiny real checkpoint, LATEST pointing at it. Do not modify."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    train_tiny(artifacts, seed=0)
    return artifacts


@pytest.fixture
def artifacts_copy(trained_artifacts: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``trained_artifacts``."""
    dst = tmp_path / "artifacts"
    shutil.copytree(trained_artifacts, dst)
    return dst


# --------------------------------------------------------------------------------------------
# Redis


def redis_unavailable(reason: str) -> NoReturn:
    """Fail with a clear message: the Redis tests need a real redis-server (see README)."""
    pytest.fail(f"{reason} -- the Redis tests need a real redis-server (set MTRANK_TEST_REDIS_URL)")


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("MTRANK_TEST_REDIS_URL") or DEFAULT_TEST_REDIS_URL
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        redis_unavailable(f"Redis at {url} is not reachable ({e})")
    finally:
        client.close()
    return url


def delete_keys(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
        return len(keys)
    finally:
        client.close()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix in the test Redis; every key under it is deleted afterwards."""
    prefix = f"mtrank-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_keys(redis_url, prefix)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A private redis-server (no persistence) that a test may freeze, kill and restart."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                c = self.client()
                c.ping()
                c.close()
                return
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    @contextlib.contextmanager
    def frozen(self, safety_s: float = 120.0) -> Iterator[None]:
        """SIGSTOP the server for the block: connections stay open, nothing is answered, until
        SIGCONT on exit (or after ``safety_s``, a safety net so that a broken deadline fails the
        test instead of hanging it)."""
        assert self.proc is not None and self.proc.poll() is None
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)
        net = threading.Timer(safety_s, os.kill, (pid, signal.SIGCONT))
        net.daemon = True
        net.start()
        try:
            yield
        finally:
            net.cancel()
            if self.proc is not None and self.proc.poll() is None:
                os.kill(pid, signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        redis_unavailable("redis-server is not installed")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --------------------------------------------------------------------------------------------
# a served process


@dataclass
class ServiceProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """``serve_process(env={...}, args=[...], timeout=60) -> ServiceProcess``: ``mtrank serve`` on a
    free port of 127.0.0.1, ready (/readyz 200) when returned; stopped (SIGINT) afterwards."""
    started: list[ServiceProcess] = []

    def start(
        env: dict[str, str] | None = None, args: list[str] | None = None, timeout: float = 60
    ) -> ServiceProcess:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, *(args or [])],
            cwd=ROOT,
            env={**os.environ, "MTRANK_LOG_LEVEL": "INFO", **(env or {})},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        svc = ServiceProcess(f"http://127.0.0.1:{port}", proc, log)
        started.append(svc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mtrank serve exited with {proc.returncode}:\n{svc.output()}")
            try:
                if httpx.get(svc.url + "/readyz", timeout=1).status_code == 200:
                    return svc
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mtrank serve not ready after {timeout}s:\n{svc.output()}")
            time.sleep(0.1)

    yield start
    for svc in started:
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGINT)
            try:
                svc.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()
