"""Pure ASGI middleware (no per-request task or response wrapping overhead)."""

from __future__ import annotations

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
    """Admission control for ``path``: at most ``limit`` requests in flight in this process; one
    more is answered 503 (``overloaded``, ``Retry-After``) at once, before its body is read, and
    ``on_shed()`` is told. Queueing a request the worker cannot start soon only makes it late:
    answered fast, the client can retry elsewhere, and the admitted requests keep their latency.
    ``gauge`` (a prometheus Gauge) follows the number admitted."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        path: str = "/rank",
        on_shed: Callable[[], None] | None = None,
        gauge: Gauge | None = None,
    ) -> None:
        self.app, self.limit, self.path, self.on_shed, self.gauge = app, limit, path, on_shed, gauge
        self.in_flight = 0
        self._error = Overloaded(
            f"too many requests in flight ({limit} per worker process, max_in_flight): retry shortly"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            if self.on_shed is not None:
                self.on_shed()
            await service_error_response(self._error)(scope, receive, send)
            return
        self.in_flight += 1
        if self.gauge is not None:
            self.gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.gauge is not None:
                self.gauge.dec()
