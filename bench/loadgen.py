"""A cheap HTTP/1.1 load generator: raw asyncio protocols over persistent keep-alive connections.

The requests are prebuilt bytes; of each answer only the status line and ``Content-Length`` are parsed
(the body is skipped by length). One request at a time per connection (no pipelining), so a connection
is a worker. Two modes:

* :func:`closed_loop`: ``connections`` workers, each sends its next request as soon as the previous one
  is answered, for ``seconds``.
* :func:`open_loop`: requests start on a fixed schedule at ``rate``/s, whatever the answers, each on an
  idle connection; when none is idle a new one is opened at once (counted), so no request waits
  client-side for a free connection. Each request's latency is recorded from its scheduled start (what
  a webhook sender sees, including any lateness of the generator) and from its actual send, and so is
  the start lag (actual send - scheduled start).

Chunked answers are not supported (uvicorn answers these endpoints with ``Content-Length``); one counts
as an error and closes its connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClosedResult", "OpenResult", "build_get", "closed_loop", "open_loop"]

_CONTENT_LENGTH = b"\r\ncontent-length:"
_OnAnswer = Callable[["_Conn", int, int], None]  # (connection, status, index of the request)


def build_get(host: str, port: int, target: str) -> bytes:
    """The bytes of one keep-alive ``GET target`` (path and query string, already encoded)."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench-loadgen\r\n\r\n".encode()


class _Conn(asyncio.Protocol):
    """One keep-alive connection; calls ``on_answer(conn, status, index)`` per complete answer."""

    def __init__(self, on_answer: _OnAnswer, on_lost: Callable[[_Conn], None]) -> None:
        self._on_answer = on_answer
        self._on_lost = on_lost
        self._buf = b""
        self._status = 0
        self._body_left = -1  # -1: reading the head of the next answer
        self.transport: asyncio.Transport | None = None
        self.current = -1  # index of the request in flight, -1 when idle
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, data: bytes, index: int) -> None:
        assert self.transport is not None
        self.current = index
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            if self._body_left < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end]
                try:
                    self._status = int(head[9:12])  # "HTTP/1.1 202 Accepted"
                    at = head.lower().find(_CONTENT_LENGTH)
                    if at < 0:
                        raise ValueError("no Content-Length")
                    stop = head.find(b"\r\n", at + 2)
                    self._body_left = int(head[at + len(_CONTENT_LENGTH) : stop if stop >= 0 else None])
                except ValueError:
                    self.close()
                    return
                buf = buf[end + 4 :]
            if len(buf) < self._body_left:
                break
            buf = buf[self._body_left :]
            self._body_left = -1
            index, self.current = self.current, -1
            self._on_answer(self, self._status, index)
        self._buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


_tasks: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)  # held until done: the loop keeps only weak references
    task.add_done_callback(_tasks.discard)


async def _open(host: str, port: int, on_answer: _OnAnswer, on_lost: Callable[[_Conn], None]) -> _Conn:
    _, conn = await asyncio.get_running_loop().create_connection(
        lambda: _Conn(on_answer, on_lost), host, port
    )
    return conn


@dataclass
class ClosedResult:
    ok: int = 0  # 202 answers
    other: int = 0  # any other status
    errors: int = 0  # connections lost or unreadable answers with a request in flight
    wall: float = 0.0
    client_cpu: float = 0.0  # CPU seconds of this process / wall (1.0 = one core)

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall else float("nan")


async def closed_loop(
    host: str, port: int, requests: Sequence[bytes], seconds: float, connections: int, ok_status: int = 202
) -> ClosedResult:
    """``connections`` workers send back to back for ``seconds``; the wall includes the last answers."""
    res = ClosedResult()
    loop = asyncio.get_running_loop()
    n = len(requests)
    live = 0
    all_done = loop.create_future()
    deadline = 0.0
    counter = 0

    def next_or_stop(conn: _Conn) -> None:
        nonlocal counter
        if time.perf_counter() < deadline and not conn.closed:
            conn.send(requests[counter % n], counter)
            counter += 1
            return
        conn.close()

    def on_answer(conn: _Conn, status: int, _index: int) -> None:
        if status == ok_status:
            res.ok += 1
        else:
            res.other += 1
        next_or_stop(conn)

    def on_lost(conn: _Conn) -> None:
        nonlocal live
        if conn.current >= 0:
            res.errors += 1
            conn.current = -1
            if time.perf_counter() < deadline:  # replace the worker
                live += 1
                _spawn(reopen())
        live -= 1
        if live == 0 and not all_done.done():
            all_done.set_result(None)

    async def reopen() -> None:
        nonlocal live
        try:
            next_or_stop(await _open(host, port, on_answer, on_lost))
        except OSError:
            res.errors += 1
            live -= 1
            if live == 0 and not all_done.done():
                all_done.set_result(None)

    conns = await asyncio.gather(*(_open(host, port, on_answer, on_lost) for _ in range(connections)))
    live = len(conns)
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    for c in conns:
        next_or_stop(c)
    await asyncio.wait_for(all_done, seconds + 60)
    res.wall = time.perf_counter() - t0
    res.client_cpu = (time.process_time() - cpu0) / res.wall
    return res


@dataclass
class OpenResult:
    count: int = 0  # requests scheduled
    ok: int = 0
    other: int = 0
    errors: int = 0
    sent_rate: float = 0.0  # requests actually sent per second over the sending span
    connections: int = 0  # opened in all, including on demand
    opened_on_demand: int = 0  # no idle connection at a request's due time
    wall: float = 0.0
    client_cpu: float = 0.0
    lat_sched_ms: list[float] = field(default_factory=list)  # answer - scheduled start, ok answers only
    lat_sent_ms: list[float] = field(default_factory=list)  # answer - actual send, ok answers only
    lag_ms: list[float] = field(default_factory=list)  # actual send - scheduled start, every request


async def open_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    seconds: float,
    rate: float,
    connections: int,
    ok_status: int = 202,
) -> OpenResult:
    """``rate * seconds`` requests, request ``i`` due at ``start + i / rate``, each on an idle connection."""
    loop = asyncio.get_running_loop()
    count = int(rate * seconds)
    n = len(requests)
    due = [0.0] * count
    sent = [0.0] * count
    res = OpenResult(count=count)
    idle: deque[_Conn] = deque()
    pending = count
    all_done = loop.create_future()

    def finish_one() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0 and not all_done.done():
            all_done.set_result(None)

    def on_answer(conn: _Conn, status: int, i: int) -> None:
        now = time.perf_counter()
        if status == ok_status:
            res.ok += 1
            res.lat_sched_ms.append((now - due[i]) * 1000)
            res.lat_sent_ms.append((now - sent[i]) * 1000)
        else:
            res.other += 1
        idle.append(conn)  # FIFO: every connection stays in use, none idles into the keep-alive timeout
        finish_one()

    def on_lost(conn: _Conn) -> None:
        if conn.current >= 0:
            res.errors += 1
            conn.current = -1
            finish_one()

    def send(conn: _Conn, i: int) -> None:
        sent[i] = time.perf_counter()
        res.lag_ms.append((sent[i] - due[i]) * 1000)
        conn.send(requests[i % n], i)

    async def send_on_new(i: int) -> None:
        try:
            conn = await _open(host, port, on_answer, on_lost)
        except OSError:
            res.errors += 1
            finish_one()
            return
        conns.append(conn)
        send(conn, i)

    conns: list[_Conn] = list(
        await asyncio.gather(*(_open(host, port, on_answer, on_lost) for _ in range(connections)))
    )
    idle.extend(conns)
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.01
    for i in range(count):
        due[i] = start + i / rate
    i = 0
    while i < count:
        now = time.perf_counter()
        while i < count and due[i] <= now:
            while idle and idle[0].closed:
                idle.popleft()
            if idle:
                send(idle.popleft(), i)
            else:
                res.opened_on_demand += 1
                _spawn(send_on_new(i))
            i += 1
        if i < count:
            await asyncio.sleep(due[i] - time.perf_counter())
    sending = time.perf_counter() - start
    res.sent_rate = count / sending if sending > 0 else float("nan")
    if count:
        await asyncio.wait_for(all_done, 60)
    res.wall = time.perf_counter() - start
    res.client_cpu = (time.process_time() - cpu0) / res.wall
    res.connections = len(conns)
    for c in conns:
        c.close()
    return res
