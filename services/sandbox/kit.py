"""What every sandbox (a fake vendor API served over real HTTP) shares: faults, a request log, control routes.

A sandbox is a :class:`SandboxState` subclass (the vendor's state), a :class:`RecordedRequest` subclass (what
it logs of a request, never a secret), a :class:`FaultSpec` subclass (its fault filters and own modes) and a
FastAPI app whose vendor routes answer through :meth:`SandboxState.serve`: it records the request, applies
latency and faults, else calls the vendor code, and logs the answer. :func:`add_control_routes` adds
``/_sandbox/requests`` (GET, DELETE), ``/_sandbox/faults`` (GET, POST, DELETE), ``/_sandbox/reset``,
``/_sandbox/latency`` and the middleware a ``drop`` needs. A new sandbox, in full::

    class FaultSpec(kit.FaultSpec):
        FILTERS: ClassVar[tuple[str, ...]] = ("path",)  # record fields faults and ?path= narrow by
        path: str | None = None

    @dataclass(kw_only=True)
    class RecordedRequest(kit.RecordedRequest):
        path: str
        body: Any

    class WeeekSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
        fault_spec = FaultSpec  # hooks to override: reset, fault_applies, fault_response

    def create_weeek_app(sandbox: WeeekSandbox) -> FastAPI:
        app = FastAPI()
        kit.add_control_routes(app, sandbox)

        @app.post("/tasks")
        async def add_task(request: Request) -> Response:
            rec = RecordedRequest(path="/tasks", body=await request.json())
            return await sandbox.serve(request, rec, lambda: answer_task(rec))  # the vendor code

        return app

Generic fault modes: ``http_status`` answers ``status`` (an nginx-like HTML page, or ``body`` as JSON) with
an optional ``Retry-After``; ``delay`` sleeps ``seconds`` and then answers normally (side effects included,
even if the client gave up); ``drop`` closes the TCP connection without a byte of answer. A sandbox adds its
own modes to ``FaultSpec.MODES`` and answers them in :meth:`SandboxState.fault_response`.
``tests/sandbox/test_kit.py`` builds such a sandbox and is the kit's specification.
"""

# No ``from __future__ import annotations``: the fault route's body type is the sandbox's own FaultSpec,
# which FastAPI can only see as a real annotation object.

import asyncio
import contextlib
import dataclasses
import http
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "ActiveFault",
    "FaultSpec",
    "LatencySpec",
    "RecordedRequest",
    "SandboxConnectionDroppedError",
    "SandboxState",
    "add_control_routes",
    "nginx_page",
]

# Scope key under which the middleware keeps the server's own ``receive`` callable (see drop).
_RECEIVE_SCOPE_KEY = "sandbox.server_receive"
# Lifecycle fields of a record, listed after the sandbox's own fields in its JSON form.
_LIFECYCLE = ("fault", "outcome", "status", "duration_ms")


class SandboxConnectionDroppedError(ConnectionError):
    """Raised for a ``drop`` fault when the server's socket is not reachable (e.g. httpx.ASGITransport)."""


class FaultSpec(BaseModel):
    """Body of ``POST /_sandbox/faults``; see the module docstring for the modes.

    Without ``times`` and ``probability`` a fault fires once; ``probability`` alone (an error rate) lasts
    until ``DELETE /_sandbox/faults``. Faults are tried in insertion order, at most one per request.
    Subclasses add filter fields (named in ``FILTERS``, compared with the record's attribute of that name)
    and modes (``MODES``: mode -> the fields it takes; ``REQUIRED``: mode -> the one it cannot do without).
    """

    model_config = ConfigDict(extra="forbid")

    MODES: ClassVar[dict[str, tuple[str, ...]]] = {
        "http_status": ("status", "retry_after", "body"),
        "delay": ("seconds",),
        "drop": (),
    }
    REQUIRED: ClassVar[dict[str, str]] = {"http_status": "status", "delay": "seconds"}
    FILTERS: ClassVar[tuple[str, ...]] = ()

    mode: str
    status: int | None = Field(default=None, ge=400, le=599)  # http_status
    retry_after: int | None = Field(default=None, ge=0)  # http_status: Retry-After seconds
    body: Any = None  # http_status: JSON body instead of the nginx-like HTML page
    seconds: float | None = Field(default=None, gt=0)  # delay
    times: int | None = Field(default=None, ge=1)
    probability: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None  # seeds the probability draws

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in cls.MODES:
            raise ValueError(f"mode must be one of {sorted(cls.MODES)}")
        return mode

    @model_validator(mode="after")
    def _check_mode_fields(self) -> "FaultSpec":
        if (need := self.REQUIRED.get(self.mode)) and getattr(self, need) is None:
            raise ValueError(f"mode {self.mode!r} needs {need!r}")
        taken = {name for names in self.MODES.values() for name in names}
        extra = sorted(n for n in taken - set(self.MODES[self.mode]) if getattr(self, n) is not None)
        if extra:
            raise ValueError(f"mode {self.mode!r} does not take {extra}")
        if self.seed is not None and self.probability is None:
            raise ValueError("seed only makes sense with probability")
        return self


S = TypeVar("S", bound=FaultSpec)


@dataclass
class ActiveFault(Generic[S]):
    """A configured fault; ``remaining`` is None for an unlimited probabilistic fault."""

    id: int
    spec: S
    remaining: int | None
    rng: random.Random
    hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``GET /_sandbox/faults``."""
        return {
            "id": self.id,
            **self.spec.model_dump(exclude_none=True),
            "remaining": self.remaining,
            "hits": self.hits,
        }


class LatencySpec(BaseModel):
    """Body of ``POST /_sandbox/latency``."""

    model_config = ConfigDict(extra="forbid")

    ms: float = Field(ge=0)


@dataclass(kw_only=True)
class RecordedRequest:
    """One request, recorded on arrival and completed when answered; subclasses add what they log."""

    seq: int = 0  # set by the sandbox: 1, 2, ... in arrival order
    time: float = field(default_factory=time.time)  # epoch seconds at arrival
    fault: dict[str, Any] | None = None  # {"id", "mode"} of the injected fault, if any
    outcome: Literal["pending", "answered", "dropped"] = "pending"
    status: int | None = None  # HTTP status answered; None while pending or when dropped
    duration_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``GET /_sandbox/requests``."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in _LIFECYCLE]
        # A shallow copy, so a caller editing the result does not edit the log.
        return {n: _copy(getattr(self, n)) for n in (*names, *_LIFECYCLE)}


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


R = TypeVar("R", bound=RecordedRequest)


def _set_waiter_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SandboxState(Generic[R, S]):
    """Request log, faults and latency of a sandbox; subclasses add the vendor's state and set ``fault_spec``.

    Usable directly in tests (``sandbox.requests``, ``sandbox.add_fault(...)``,
    ``await sandbox.wait_for_requests(...)``) and over HTTP through :func:`add_control_routes`.
    """

    fault_spec: type[S]  # the subclass's FaultSpec: how POST /_sandbox/faults and add_fault read a spec

    def __init__(self) -> None:
        # Guards state against the rare caller that drives the sandbox from another thread
        # (e.g. a demo running uvicorn in a thread); no await happens while it is held.
        self.lock = threading.RLock()
        self.requests: list[R] = []
        self.faults: list[ActiveFault[S]] = []
        self.latency_ms = 0.0
        self._waiters: list[asyncio.Future[None]] = []
        self._next_seq = 1
        self._next_fault_id = 1

    # ---- control -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget requests, faults and latency; restart the counters. Subclasses reset their state too."""
        with self.lock:
            self.requests.clear()
            self.faults.clear()
            self.latency_ms = 0.0
            self._next_seq = 1
            self._next_fault_id = 1
        self._notify()

    def add_fault(self, spec: S | Mapping[str, Any]) -> ActiveFault[S]:
        """Queue a fault; faults are tried in the order they were added."""
        if not isinstance(spec, self.fault_spec):
            spec = self.fault_spec.model_validate(spec)
        remaining = spec.times if spec.times is not None or spec.probability is not None else 1
        with self.lock:
            fault = ActiveFault(self._next_fault_id, spec, remaining, random.Random(spec.seed))
            self._next_fault_id += 1
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> int:
        """Remove all faults; return how many were active."""
        with self.lock:
            count = len(self.faults)
            self.faults.clear()
        return count

    def clear_requests(self) -> int:
        """Forget the recorded requests (the numbering goes on); return how many there were."""
        with self.lock:
            count = len(self.requests)
            self.requests.clear()
        return count

    def set_latency(self, ms: float) -> None:
        """Delay every vendor answer by ``ms`` milliseconds (0 turns it off)."""
        if ms < 0:
            raise ValueError("latency must be >= 0")
        self.latency_ms = float(ms)

    def _matching(self, where: Mapping[str, Any], *, answered: bool) -> list[R]:
        """Recorded requests whose attributes equal ``where`` (None values ignored), oldest first."""
        want = {k: v for k, v in where.items() if v is not None}
        with self.lock:
            return [
                r
                for r in self.requests
                if (not answered or r.outcome != "pending")
                and all(getattr(r, k) == v for k, v in want.items())
            ]

    async def wait_for_requests(
        self,
        n: int,
        timeout: float,  # noqa: ASYNC109 - the test-facing signature asked for; easier than a scope
        *,
        answered: bool = True,
        **where: Any,
    ) -> list[R]:
        """Wait until at least ``n`` requests matching ``where`` (e.g. ``path="/x"``) are recorded.

        With ``answered`` (the default) only finished requests count, so their ``status`` and
        ``outcome`` are final. Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self.lock:
                matched = self._matching(where, answered=answered)
                if len(matched) >= n:
                    return matched
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                matched = self._matching(where, answered=answered)
                if len(matched) >= n:
                    return matched
                which = ", ".join(f"{k}={v!r}" for k, v in where.items() if v is not None)
                raise TimeoutError(
                    f"{len(matched)} of {n} requests{f' ({which})' if which else ''} within {timeout}s"
                ) from None

    # ---- hooks for subclasses ------------------------------------------------------------------

    def fault_applies(self, spec: S, rec: R) -> bool:
        """Whether a fault may fire for this request: every filter set in the spec equals the record's."""
        return all(
            (want := getattr(spec, name)) is None or getattr(rec, name) == want for name in spec.FILTERS
        )

    def fault_response(self, spec: S, rec: R) -> Response:
        """The answer to a fault of a mode the subclass added to ``FaultSpec.MODES``."""
        raise NotImplementedError(f"{type(self).__name__} does not answer fault mode {spec.mode!r}")

    # ---- serving -------------------------------------------------------------------------------

    async def serve(
        self,
        request: Request,
        rec: R,
        answer: Callable[[], Awaitable[Response]],
        *,
        may_fault: bool = True,
    ) -> Response:
        """Record ``rec``, apply latency and a fault, else ``await answer()``; log the outcome.

        ``answer`` may set vendor fields of ``rec`` (e.g. an error code); the kit sets ``status``.
        ``may_fault=False`` takes no fault for this request (e.g. one refused by a rate limit).
        """
        self._record(rec)
        # Picked on arrival, before any sleep, so "the next N requests" means arrival order.
        fault = self._take_fault(rec) if may_fault else None
        if fault is not None:
            rec.fault = {"id": fault.id, "mode": fault.spec.mode}
        try:
            response = await self._respond(request, rec, fault, answer)
        except BaseException:
            if rec.outcome == "pending":
                self._finish(rec, None)
            raise
        if rec.outcome == "pending":
            self._finish(rec, response.status_code)
        return response

    async def _respond(
        self,
        request: Request,
        rec: R,
        fault: ActiveFault[S] | None,
        answer: Callable[[], Awaitable[Response]],
    ) -> Response:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        spec = fault.spec if fault is not None else None
        if spec is None:
            return await answer()
        if spec.mode == "delay":
            assert spec.seconds is not None
            await asyncio.sleep(spec.seconds)  # then answer normally, side effects included
            return await answer()
        if spec.mode == "drop":
            self._finish(rec, None)
            if not await _drop_connection(request):
                raise SandboxConnectionDroppedError("sandbox dropped the connection")
            return Response(status_code=204)  # never reaches the client
        if spec.mode == "http_status":
            assert spec.status is not None
            headers = {"Retry-After": str(spec.retry_after)} if spec.retry_after is not None else None
            if spec.body is not None:
                return JSONResponse(spec.body, status_code=spec.status, headers=headers)
            return Response(
                nginx_page(spec.status), status_code=spec.status, headers=headers, media_type="text/html"
            )
        return self.fault_response(spec, rec)

    def _record(self, rec: R) -> None:
        with self.lock:
            rec.seq = self._next_seq
            self._next_seq += 1
            self.requests.append(rec)
        self._notify()

    def _finish(self, rec: R, status: int | None) -> None:
        """Complete a record: answered with ``status``, or dropped when it is None."""
        rec.outcome = "dropped" if status is None else "answered"
        rec.status = status
        rec.duration_ms = round((time.time() - rec.time) * 1000, 3)
        self._notify()

    def _take_fault(self, rec: R) -> ActiveFault[S] | None:
        """Pick the first fault that fires for this request and consume one of its ``times``."""
        with self.lock:
            for fault in self.faults:
                spec = fault.spec
                if not self.fault_applies(spec, rec):
                    continue
                if spec.probability is not None and fault.rng.random() >= spec.probability:
                    continue
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _notify(self) -> None:
        with self.lock:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            # The waiter may live on another thread's loop; a closed loop just means nobody waits.
            with contextlib.suppress(RuntimeError):
                waiter.get_loop().call_soon_threadsafe(_set_waiter_done, waiter)


# ------------------------------------------------------------------------------------------------ HTTP


def nginx_page(status: int) -> str:
    """The error page nginx answers with, as a balancer in front of a vendor would."""
    try:
        title = f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        title = f"{status} Error"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


class _ServerReceiveMiddleware:
    """Keeps the server's own ``receive`` in the scope so a ``drop`` fault can find the socket."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RECEIVE_SCOPE_KEY] = receive
        await self.app(scope, receive, send)


async def _drop_connection(request: Request) -> bool:
    """Close the TCP connection without answering; False if the socket is unreachable.

    ASGI has no way to abort a connection, so this reaches the transport through uvicorn's
    request cycle (the owner of the ``receive`` method). Closing it makes the client see
    "server disconnected without sending a response", like a crashed backend behind a
    balancer. uvicorn then ignores whatever the app sends.
    """
    receive = request.scope.get(_RECEIVE_SCOPE_KEY)
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if not isinstance(transport, asyncio.BaseTransport):
        return False
    transport.close()
    # connection_lost runs on the next loop iterations and marks the cycle disconnected.
    for _ in range(100):
        if getattr(cycle, "disconnected", False):
            break
        await asyncio.sleep(0)
    return True


def add_control_routes(app: FastAPI, sandbox: SandboxState[Any, Any]) -> None:
    """Add the ``/_sandbox/`` control routes and the ``drop`` middleware to a sandbox's app.

    Control routes are never delayed, faulted or recorded. ``GET /_sandbox/requests`` filters by the
    query parameters named in ``FaultSpec.FILTERS`` (e.g. ``?path=/new-client``).
    """
    app.add_middleware(_ServerReceiveMiddleware)
    spec_type = sandbox.fault_spec
    filters = spec_type.FILTERS

    @app.get("/_sandbox/requests", tags=["sandbox"])
    async def list_requests(request: Request) -> JSONResponse:
        """Recorded requests, oldest first; filtered by the sandbox's filter parameters."""
        where = {k: v for k, v in request.query_params.items() if k in filters}
        with sandbox.lock:
            return JSONResponse([r.to_dict() for r in sandbox._matching(where, answered=False)])

    @app.delete("/_sandbox/requests", tags=["sandbox"])
    async def clear_requests() -> dict[str, int]:
        """Forget the recorded requests."""
        return {"cleared": sandbox.clear_requests()}

    @app.post("/_sandbox/reset", tags=["sandbox"])
    async def reset() -> dict[str, bool]:
        """Back to the sandbox's initial state: its data, requests, faults and latency."""
        sandbox.reset()
        return {"ok": True}

    @app.get("/_sandbox/faults", tags=["sandbox"])
    async def list_faults() -> JSONResponse:
        """Faults still active, in the order they are tried."""
        with sandbox.lock:
            return JSONResponse([f.to_dict() for f in sandbox.faults])

    @app.post("/_sandbox/faults", status_code=201, tags=["sandbox"])
    async def add_fault(spec: spec_type) -> JSONResponse:  # type: ignore[valid-type]
        """Add a fault, see the sandbox's FaultSpec; FastAPI answers 422 for an invalid spec."""
        return JSONResponse(sandbox.add_fault(spec).to_dict(), status_code=201)

    @app.delete("/_sandbox/faults", tags=["sandbox"])
    async def clear_faults() -> dict[str, int]:
        """Remove every fault."""
        return {"cleared": sandbox.clear_faults()}

    @app.get("/_sandbox/latency", tags=["sandbox"])
    async def get_latency() -> dict[str, float]:
        """Current added latency."""
        return {"ms": sandbox.latency_ms}

    @app.post("/_sandbox/latency", tags=["sandbox"])
    async def set_latency(spec: LatencySpec) -> dict[str, float]:
        """Delay every vendor answer by ``ms`` (control routes are never delayed)."""
        sandbox.set_latency(spec.ms)
        return {"ms": sandbox.latency_ms}
