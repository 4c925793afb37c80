"""A lean HTTP/1.1 client and an open-loop load generator for the benchmarks.

Both send pre-serialised POST requests over kept-alive connections and parse only the status line
and Content-Length, so the client adds microseconds, not the ~1 ms of a full HTTP library.

``open_loop``: Poisson arrivals at a fixed rate, each request's latency measured from its
*scheduled* send time (not from when a free connection let it go): a slow server cannot slow the
arrivals down and hide its queueing (no coordinated omission). The generator's own CPU use is
reported with the results, since it shares the machine with the server.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def post_bytes(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of a response head (up to and including the blank line)."""
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, length


class RawClient:
    """One kept-alive connection, blocking; ``send`` returns (status, body). A connection the
    server closed while idle (its keep-alive timeout) is opened again."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.address, self.timeout = (host, port), timeout
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, request: bytes) -> tuple[int, bytes]:
        try:
            return self._send(request)
        except (ConnectionError, BrokenPipeError) as e:
            if self.buf or "mid-response" in str(e):
                raise
            self.sock.close()  # closed while idle: once more on a new connection
            self._connect()
            return self._send(request)

    def _send(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(
                    "connection closed by the server" + (" mid-response" if self.buf else "")
                )
            self.buf += chunk
        end = self.buf.index(b"\r\n\r\n") + 4
        status, length = _parse_head(self.buf[:end])
        while len(self.buf) < end + length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server mid-response")
            self.buf += chunk
        body, self.buf = self.buf[end : end + length], self.buf[end + length :]
        return status, body

    def close(self) -> None:
        self.sock.close()


class _AsyncConn:
    """One kept-alive connection; reopened when the server closed it while idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send(self, request: bytes) -> int:
        if self.writer is None or self.reader.at_eof():
            await self._open()
        assert self.writer is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                raise
            await self._open()  # closed while idle (keep-alive timeout): once more
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        status, length = _parse_head(head)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class RateResult:
    rate: float  # offered requests/s
    seconds: float
    sent: int
    ok_ms: list[float] = field(default_factory=list)  # latency of 200s, from the scheduled time
    shed_ms: list[float] = field(default_factory=list)  # 503s
    errors: int = 0  # anything else, or a broken connection
    generator_cpu: float = 0.0  # cores the generator used

    def summary(self) -> dict[str, float]:
        ok, shed = np.asarray(self.ok_ms), np.asarray(self.shed_ms)
        every = np.concatenate([ok, shed]) if shed.size else ok
        return {
            "offered_rps": self.rate,
            "ok_rps": ok.size / self.seconds,
            "sent": self.sent,
            "ok": int(ok.size),
            "shed": int(shed.size),
            "errors": self.errors,
            "p50_ms": float(np.percentile(ok, 50)) if ok.size else float("nan"),
            "p99_ms": float(np.percentile(ok, 99)) if ok.size else float("nan"),
            "shed_p99_ms": float(np.percentile(shed, 99)) if shed.size else float("nan"),
            "max_ms": float(every.max()) if every.size else float("nan"),
            "generator_cpu": self.generator_cpu,
        }


async def _open_loop(
    host: str, port: int, requests: list[bytes], rate: float, seconds: float, conns: int, seed: int
) -> RateResult:
    pool: asyncio.Queue[_AsyncConn] = asyncio.Queue()
    opened = []
    for _ in range(conns):
        conn = _AsyncConn(host, port)
        opened.append(conn)
        pool.put_nowait(conn)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 10))
    arrivals = arrivals[arrivals < seconds]
    res = RateResult(rate, seconds, len(arrivals))
    loop = asyncio.get_running_loop()

    async def one(scheduled: float, request: bytes) -> None:
        conn = await pool.get()
        try:
            status = await conn.send(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            res.errors += 1
            conn.close()
            pool.put_nowait(_AsyncConn(host, port))
            return
        pool.put_nowait(conn)
        ms = (loop.time() - scheduled) * 1e3
        if status == 200:
            res.ok_ms.append(ms)
        elif status == 503:
            res.shed_ms.append(ms)
        else:
            res.errors += 1

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = loop.time()
    tasks = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(t0 + float(at), requests[i % len(requests)])))
    await asyncio.gather(*tasks)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = loop.time() - t0
    res.generator_cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / wall
    for conn in opened:
        conn.close()
    return res


def open_loop(
    host: str,
    port: int,
    requests: list[bytes],
    rate: float,
    seconds: float,
    conns: int = 64,
    seed: int = 0,
) -> RateResult:
    """Poisson arrivals at ``rate``/s for ``seconds``, over ``conns`` kept-alive connections."""
    import uvloop

    return uvloop.run(_open_loop(host, port, requests, rate, seconds, conns, seed))


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls of ``fn()``."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out
