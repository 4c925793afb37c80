"""The HTTP server of ``mtrank serve``: uvicorn with h11 and the limits of the settings.

uvicorn bounds the request head (``h11_max_incomplete_event_size``: a longer one is refused with
400), idle keep-alive connections (``timeout_keep_alive``) and open connections
(``limit_concurrency``: beyond it requests get 503), but has no deadline for receiving a request:
a client that opens a connection and sends a header line now and then holds it (and its buffer)
forever. ``LimitedH11Protocol`` adds two deadlines per request, as front proxies have them:

- the head: from the connection (or the first byte of a next request on a kept-alive one) to the
  end of the headers, ``http_header_timeout_s``;
- the body: from the end of the headers to the end of the body, ``http_body_timeout_s``.

A request that misses one is dropped (the connection closed; the route, if it was reading the
body, sees a client disconnect).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

log = logging.getLogger(__name__)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head and for its body."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = ""

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.debug(
                "closing the connection of %s: request %s not received within %gs", client, phase, seconds
            )
            self.transport.close()

    def _track(self) -> None:
        """Move the deadline along with the request: head -> body -> none (received in full)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.body_timeout_s)
        elif state is not h11.IDLE:  # DONE, MUST_CLOSE, CLOSED, ERROR: nothing more to wait for
            self._disarm()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # a next request begins
            self._arm("head", self.header_timeout_s)
        super().data_received(data)
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class WorkerH11Protocol(LimitedH11Protocol):
    """LimitedH11Protocol for the processes of ``mtrank serve --workers N``: uvicorn pickles the
    protocol class to them, so it must be importable by name; its deadlines come from the
    MTRANK_* environment the parent exported (service.app.export_settings)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = _environment_settings()
        self.header_timeout_s = settings.http_header_timeout_s
        self.body_timeout_s = settings.http_body_timeout_s
        super().__init__(*args, **kwargs)


@functools.cache
def _environment_settings() -> Settings:
    return Settings()


def protocol_for(settings: Settings) -> type[LimitedH11Protocol]:
    """LimitedH11Protocol with the settings' deadlines (uvicorn instantiates the class itself)."""
    return type(
        "LimitedH11Protocol",
        (LimitedH11Protocol,),
        {"header_timeout_s": settings.http_header_timeout_s, "body_timeout_s": settings.http_body_timeout_s},
    )


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config keywords for the settings' HTTP limits."""
    return {
        "http": protocol_for(settings),
        "ws": "none",
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
        "timeout_keep_alive": settings.http_keep_alive_s,
        "limit_concurrency": settings.http_max_connections,
    }
