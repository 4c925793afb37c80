"""Pure ASGI middleware (no per-request task or response wrapping overhead)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from prometheus_client import Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, PayloadTooLarge, service_error_response


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while streaming.
    ``on_reject(path)`` is told of a request answered here, before any route saw it."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes (max_body_bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False  # the server rejects malformed lengths itself
                if too_large:
                    if self.on_reject is not None:
                        self.on_reject(scope["path"])
                    await service_error_response(self._error())(scope, receive, send)
                    return
                break
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)


class AdmissionMiddleware:
    """Admission control for ``path``, per process. A request is refused at once, before its body
    is read, with 503 (``overloaded``, ``Retry-After``) when ``limit`` requests are in flight, or
    when at least ``age_min_in_flight`` are and the oldest of them has been so for more than
    ``max_age_s`` (the worker has fallen behind: a request admitted now would wait too; a few slow
    requests, or a pause such as a model swap, with little traffic are no reason to refuse one);
    ``on_shed()`` is told. Queueing a
    request the worker cannot start soon only makes it late: answered fast, the client can retry
    elsewhere, and the admitted requests keep their latency. ``gauge`` (a prometheus Gauge)
    follows the number admitted."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        max_age_s: float | None = None,
        path: str = "/rank",
        on_shed: Callable[[], None] | None = None,
        gauge: Gauge | None = None,
        age_min_in_flight: int = 4,
    ) -> None:
        self.app, self.limit, self.max_age_s, self.path = app, limit, max_age_s, path
        self.age_min_in_flight = age_min_in_flight
        self.on_shed, self.gauge = on_shed, gauge
        self._admitted: dict[int, float] = {}  # request -> when admitted; insertion order: oldest first
        self._seq = itertools.count()
        self._error = Overloaded(
            "too many requests in flight on this worker (max_in_flight, max_in_flight_age_ms): retry shortly"
        )

    @property
    def in_flight(self) -> int:
        return len(self._admitted)

    def _full(self, now: float) -> bool:
        if len(self._admitted) >= self.limit:
            return True
        if self.max_age_s is None or len(self._admitted) < max(self.age_min_in_flight, 1):
            return False
        return now - next(iter(self._admitted.values())) > self.max_age_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        if self._full(now):
            if self.on_shed is not None:
                self.on_shed()
            await service_error_response(self._error)(scope, receive, send)
            return
        key = next(self._seq)
        self._admitted[key] = now
        if self.gauge is not None:
            self.gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            del self._admitted[key]
            if self.gauge is not None:
                self.gauge.dec()
