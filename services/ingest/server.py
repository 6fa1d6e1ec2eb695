"""How the ingest API is served: uvicorn's httptools protocol with limits against slow and greedy clients.

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) but bounds neither the size of a
request's headers (httptools collects a header of any length), nor the time they take to arrive, nor the
number of connections it holds (``limit_concurrency`` answers 503 per request and keeps the connection).
:class:`GuardedProtocol` adds those limits where uvicorn parses, at the cost of a few additions per request:

* headers (request line included) over ``max_header_bytes``: 431, and the connection is closed;
* headers not complete ``header_timeout_s`` after the connection opened, or after the first byte of a
  later request on a kept-alive connection: 408 and closed (a connection that sends nothing included);
* a connection past ``max_connections``: 503 with Retry-After, closed at once, so it holds no file;
* a request answered before its body arrived (404, 413, 429, ...): the rest is read and dropped for
  ``body_timeout_s`` at most, then the connection is closed. The webhook route itself reads its body
  within ``body_timeout_s`` or answers 408 (``services/ingest/api.py``).

An answer decided while an earlier request of the same connection is still being answered (pipelining)
is sent after that answer, never in its place: a webhook published for a 202 is not answered 400 because
garbage followed it on the connection.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from services.common.config import IngestSettings
from services.common.logging import get_logger
from services.common.metrics import INGEST_DISCONNECTS, INGEST_REFUSED

log = get_logger("relay.ingest.server")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing: the connection's answer is decided."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size and time limits and a cap on connections."""

    limits: ClassVar[IngestSettings] = IngestSettings()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_headers = True  # waiting for the first request's headers, or inside a later request's
        self._begun = False  # a request's first byte is here, its headers are not complete
        self._in_body = False  # a request's headers are complete, its body is not
        self._completed_here = False  # headers completed in the read being parsed
        self._read = 0  # length of the read being parsed
        self._raw = 0  # bytes of earlier reads inside the current header block
        self._answer: bytes | None = None  # the refusal decided for this connection

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            # Answered and closed at once: a refused connection must not hold a file for long.
            self.transport = transport
            retry = max(1, math.ceil(self.limits.header_timeout_s))
            self._answer = self._response(
                503, "too many connections; retry later", b"retry-after: %d\r\n" % retry
            )
            INGEST_REFUSED.labels("too_many_connections").inc()
            transport.write(self._answer)
            transport.close()
            return
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._begun and self._answer is None:
            INGEST_DISCONNECTS.labels("headers").inc()
            log.info("client disconnected before the end of the headers")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answer is not None:
            return  # refused: nothing more is read
        self._unset_keepalive_if_required()
        in_body = self._in_body
        self._completed_here = False
        self._read = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self._answer is None:  # not a refusal raised from a callback
                self._refuse(400, "invalid_http", "Invalid HTTP request received.")
            return
        if self._in_headers:
            # httptools keeps a header it has not seen the end of, however long: the reads are counted
            # as they come, which costs nothing per header.
            if not (in_body or self._completed_here):
                self._raw += len(data)
            elif len(data) > self.limits.max_header_bytes:
                # Part of this read was an earlier request's: what this block parsed so far.
                self._raw = self._header_size()
            if self._raw > self.limits.max_header_bytes:
                self._refuse(431, "header_too_large", self._too_large())
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = self._begun = True

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._in_headers = self._begun = False
        self._completed_here = True
        # Earlier reads and this one bound the block's size: the exact size only when they exceed the limit.
        over = self._raw + self._read > self.limits.max_header_bytes
        self._raw = 0
        if over and self._header_size() > self.limits.max_header_bytes:
            self._refuse(431, "header_too_large", self._too_large())
            raise _Refused
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pending = self._answer is not None and not self.pipeline
        body_due = self._in_body and not self.pipeline
        super().on_response_complete()
        if pending:
            self._unset_keepalive_if_required()
            self._send_answer()
        elif body_due and self._body_timer is None and not self.transport.is_closing():
            # Answered before its body arrived: the rest is read and dropped, for a bounded time.
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    # Refusals

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._in_headers and self._answer is None:
            self._refuse(
                408,
                "header_timeout",
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s",
            )

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self._in_body and not self.transport.is_closing():
            INGEST_REFUSED.labels("body_timeout").inc()
            log.info("request body still arriving after its answer; connection closed")
            self.transport.close()

    def _header_size(self) -> int:
        """The request target, header names and values parsed so far in the current block."""
        return len(self.url) + sum(len(name) + len(value) for name, value in self.headers)

    def _too_large(self) -> str:
        return f"the request line and headers are over {self.limits.max_header_bytes} bytes"

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        INGEST_REFUSED.labels(reason).inc()
        log.info("request refused", status=status, reason=reason)
        self._cancel_timers()
        self._answer = self._response(status, detail)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            # An earlier request is still being answered: this answer follows it (on_response_complete).
            self.flow.pause_reading()
            return
        # No earlier answer is due, or the request being answered is the broken one (its app sees a
        # disconnect and publishes nothing).
        self._send_answer()

    def _send_answer(self) -> None:
        if self._answer is not None and not self.transport.is_closing():
            self.transport.write(self._answer)
            self.transport.close()

    def _response(self, status: int, detail: str, extra: bytes = b"") -> bytes:
        body = json.dumps({"detail": detail}).encode()
        parts = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        parts += [
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body),
            extra,
            b"\r\n",
            body,
        ]
        return b"".join(parts)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None


def guarded_protocol(settings: IngestSettings) -> type[GuardedProtocol]:
    """The protocol class uvicorn makes one of per connection, bound to ``settings``' limits."""

    class BoundGuardedProtocol(GuardedProtocol):
        limits = settings

    return BoundGuardedProtocol


def uvicorn_options(settings: IngestSettings) -> dict[str, Any]:
    """Keywords for ``uvicorn.run``/``uvicorn.Config`` that serve the ingest API within ``settings``' limits."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and settings.max_connections + 100 > soft:
        # Past the open-file limit accept() fails before the cap can answer 503.
        log.warning(
            "ingest.max_connections is close to the open-file limit; raise `ulimit -n` or lower it",
            max_connections=settings.max_connections,
            open_file_limit=soft,
        )
    return {
        "http": guarded_protocol(settings),
        # Typed int by uvicorn, which only hands it to loop.call_later: fractions of a second work.
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "ws": "none",
    }
