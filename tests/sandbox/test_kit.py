"""The sandbox kit on its own: a tiny sandbox built from it, served over real HTTP by uvicorn."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from services.sandbox import kit
from tests.support import serve_app

PATHS = ("/tasks", "/notes")


class FaultSpec(kit.FaultSpec):
    MODES: ClassVar[dict[str, tuple[str, ...]]] = {**kit.FaultSpec.MODES, "teapot": ("note",)}
    REQUIRED: ClassVar[dict[str, str]] = {**kit.FaultSpec.REQUIRED, "teapot": "note"}
    FILTERS: ClassVar[tuple[str, ...]] = ("path", "user")

    path: str | None = None
    user: str | None = None
    note: str | None = None  # teapot


@dataclass(kw_only=True)
class RecordedRequest(kit.RecordedRequest):
    path: str
    user: str | None
    body: Any
    task_id: int | None = None  # set by the vendor answer


class TinySandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    """A vendor with one side effect (a task per POST) and one mode of its own (teapot)."""

    fault_spec = FaultSpec

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[Any] = []

    def reset(self) -> None:
        with self.lock:
            self.tasks.clear()
            super().reset()

    def fault_response(self, spec: FaultSpec, rec: RecordedRequest) -> Response:
        return JSONResponse({"teapot": spec.note}, status_code=418)


def create_tiny_app(sandbox: TinySandbox) -> FastAPI:
    app = FastAPI()
    kit.add_control_routes(app, sandbox)

    async def answer(rec: RecordedRequest) -> Response:
        if isinstance(rec.body, dict) and rec.body.get("crash"):
            raise RuntimeError("the vendor code crashed")
        sandbox.tasks.append(rec.body)
        rec.task_id = len(sandbox.tasks)
        return JSONResponse({"id": rec.task_id}, status_code=201)

    def endpoint(path: str) -> Any:
        async def post(request: Request) -> Response:
            rec = RecordedRequest(path=path, user=request.headers.get("x-user"), body=await request.json())
            may_fault = "x-no-fault" not in request.headers  # like a request refused by a rate limit
            return await sandbox.serve(request, rec, lambda: answer(rec), may_fault=may_fault)

        return post

    for path in PATHS:
        app.add_api_route(path, endpoint(path), methods=["POST"])
    return app


@dataclass
class Env:
    sandbox: TinySandbox
    http: httpx.AsyncClient

    async def post(self, path: str = "/tasks", body: Any = None, **headers: str) -> httpx.Response:
        return await self.http.post(path, json=body if body is not None else {"t": 1}, headers=headers)

    async def fault(self, **spec: Any) -> dict[str, Any]:
        r = await self.http.post("/_sandbox/faults", json=spec)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def get(self, what: str, **params: str) -> Any:
        r = await self.http.get(f"/_sandbox/{what}", params=params)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sandbox = TinySandbox()
    async with (
        serve_app(create_tiny_app(sandbox)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        yield Env(sandbox, http)


# ---- recorder ----------------------------------------------------------------------------------


async def test_requests_are_recorded_in_order_with_their_answer(env: Env) -> None:
    started = time.time()
    assert (await env.post(body={"a": 1}, **{"x-user": "ann"})).json() == {"id": 1}
    assert (await env.post("/notes", body={"b": 2})).json() == {"id": 2}
    first, second = await env.get("requests")
    assert list(first) == [
        "seq", "time", "path", "user", "body", "task_id", "fault", "outcome", "status", "duration_ms",
    ]  # fmt: skip
    assert (first["seq"], first["path"], first["user"], first["body"], first["task_id"]) == (
        1, "/tasks", "ann", {"a": 1}, 1,
    )  # fmt: skip
    assert (first["fault"], first["outcome"], first["status"]) == (None, "answered", 201)
    assert started <= first["time"] <= second["time"] <= time.time()
    assert first["duration_ms"] >= 0
    assert (second["seq"], second["path"], second["user"]) == (2, "/notes", None)
    assert [r.seq for r in env.sandbox.requests] == [1, 2]


async def test_to_dict_is_a_copy(env: Env) -> None:
    await env.post(body={"a": 1})
    [rec] = env.sandbox.requests
    rec.to_dict()["body"]["a"] = 2
    assert rec.body == {"a": 1}


async def test_requests_filter_by_the_spec_filters_only(env: Env) -> None:
    await env.post(**{"x-user": "ann"})
    await env.post("/notes", **{"x-user": "bob"})
    await env.post("/notes", **{"x-user": "ann"})
    assert [r["seq"] for r in await env.get("requests", path="/notes")] == [2, 3]
    assert [r["seq"] for r in await env.get("requests", path="/notes", user="ann")] == [3]
    assert [r["seq"] for r in await env.get("requests", status="999")] == [1, 2, 3]  # not a filter
    assert await env.get("requests", path="/nowhere") == []


async def test_clearing_requests_keeps_the_numbering(env: Env) -> None:
    await env.post()
    await env.post()
    assert (await env.http.delete("/_sandbox/requests")).json() == {"cleared": 2}
    assert await env.get("requests") == []
    await env.post()
    assert [r["seq"] for r in await env.get("requests")] == [3]


async def test_wait_for_requests(env: Env) -> None:
    waiter = asyncio.create_task(env.sandbox.wait_for_requests(2, timeout=5, path="/notes"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await env.post("/tasks")
    await env.post("/notes")
    assert not waiter.done()
    await env.post("/notes")
    recs = await waiter
    assert [(r.seq, r.status) for r in recs] == [(2, 201), (3, 201)]
    assert len(await env.sandbox.wait_for_requests(3, timeout=1, path=None)) == 3  # None: no filter
    with pytest.raises(TimeoutError, match=r"2 of 3 requests \(path='/notes'\) within 0.1s"):
        await env.sandbox.wait_for_requests(3, timeout=0.1, path="/notes")


async def test_wait_for_requests_counts_pending_ones_only_when_asked(env: Env) -> None:
    await env.fault(mode="delay", seconds=0.5)
    call = asyncio.create_task(env.post())
    [pending] = await env.sandbox.wait_for_requests(1, timeout=5, answered=False)
    assert (pending.outcome, pending.status, pending.fault) == ("pending", None, {"id": 1, "mode": "delay"})
    with pytest.raises(TimeoutError):
        await env.sandbox.wait_for_requests(1, timeout=0.1)
    [done] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (done.outcome, done.status) == ("answered", 201)
    assert (await call).status_code == 201


async def test_a_crash_in_the_vendor_code_is_not_left_pending() -> None:
    sandbox = TinySandbox()
    transport = httpx.ASGITransport(app=create_tiny_app(sandbox))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as http:
        with pytest.raises(RuntimeError, match="crashed"):
            await http.post("/tasks", json={"crash": True})
    [rec] = sandbox.requests
    assert (rec.outcome, rec.status) == ("dropped", None)
    assert rec.duration_ms is not None


# ---- faults ------------------------------------------------------------------------------------


async def test_http_status_fault_fires_times_then_goes(env: Env) -> None:
    added = await env.fault(mode="http_status", status=503, times=2)
    assert added == {"id": 1, "mode": "http_status", "status": 503, "times": 2, "remaining": 2, "hits": 0}
    first, second = await env.post(), await env.post()
    assert (first.status_code, second.status_code) == (503, 503)
    assert first.headers["content-type"].startswith("text/html")
    assert "<center><h1>503 Service Unavailable</h1></center>" in first.text
    assert "retry-after" not in first.headers
    assert env.sandbox.tasks == []  # a faulted request never reaches the vendor code
    assert await env.get("faults") == []
    assert (await env.post()).status_code == 201
    log = await env.get("requests")
    assert [(r["status"], r["fault"]) for r in log] == [
        (503, {"id": 1, "mode": "http_status"}),
        (503, {"id": 1, "mode": "http_status"}),
        (201, None),
    ]


async def test_a_fault_without_times_fires_once(env: Env) -> None:
    env.sandbox.add_fault({"mode": "http_status", "status": 500})
    assert [(await env.post()).status_code for _ in range(2)] == [500, 201]


async def test_http_status_fault_with_retry_after_and_json_body(env: Env) -> None:
    await env.fault(mode="http_status", status=429, retry_after=7, body={"error": "slow down"})
    r = await env.post()
    assert (r.status_code, r.headers["retry-after"], r.json()) == (429, "7", {"error": "slow down"})


async def test_an_unknown_status_still_gets_a_page(env: Env) -> None:
    await env.fault(mode="http_status", status=599)
    r = await env.post()
    assert r.status_code == 599
    assert "599 Error" in r.text


async def test_delay_fault_then_answers_with_side_effects(env: Env) -> None:
    await env.fault(mode="delay", seconds=0.3)
    started = time.perf_counter()
    r = await env.post()
    assert time.perf_counter() - started >= 0.3
    assert r.status_code == 201
    assert len(env.sandbox.tasks) == 1
    [rec] = env.sandbox.requests
    assert rec.duration_ms is not None
    assert rec.duration_ms >= 300


async def test_drop_fault_closes_the_connection(env: Env) -> None:
    await env.fault(mode="drop")
    with pytest.raises(httpx.RemoteProtocolError):
        await env.post()
    assert env.sandbox.tasks == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.outcome, rec.status, rec.fault) == ("dropped", None, {"id": 1, "mode": "drop"})
    assert (await env.post()).status_code == 201  # a new connection is served normally


async def test_drop_without_a_socket_raises() -> None:
    sandbox = TinySandbox()
    sandbox.add_fault({"mode": "drop"})
    transport = httpx.ASGITransport(app=create_tiny_app(sandbox))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as http:
        with pytest.raises(kit.SandboxConnectionDroppedError):
            await http.post("/tasks", json={})
    assert [r.outcome for r in sandbox.requests] == ["dropped"]
    assert sandbox.tasks == []


async def test_a_vendor_mode_is_answered_by_the_sandbox(env: Env) -> None:
    await env.fault(mode="teapot", note="short and stout")
    r = await env.post()
    assert (r.status_code, r.json()) == (418, {"teapot": "short and stout"})
    [rec] = env.sandbox.requests
    assert (rec.status, rec.fault) == (418, {"id": 1, "mode": "teapot"})
    assert env.sandbox.tasks == []


class SilentSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    fault_spec = FaultSpec


async def test_a_vendor_mode_without_an_answer_is_an_error() -> None:
    sandbox = SilentSandbox()
    sandbox.add_fault({"mode": "teapot", "note": "x"})
    rec = RecordedRequest(path="/tasks", user=None, body={})
    with pytest.raises(NotImplementedError, match="teapot"):
        await sandbox.serve(Request({"type": "http"}), rec, lambda: asyncio.sleep(0, Response()))
    assert rec.outcome == "dropped"


async def test_faults_filter_by_record_attributes(env: Env) -> None:
    await env.fault(mode="http_status", status=502, path="/notes", user="bob", times=1)
    assert (await env.post("/tasks", **{"x-user": "bob"})).status_code == 201
    assert (await env.post("/notes", **{"x-user": "ann"})).status_code == 201
    assert (await env.post("/notes")).status_code == 201
    assert (await env.post("/notes", **{"x-user": "bob"})).status_code == 502
    assert (await env.post("/notes", **{"x-user": "bob"})).status_code == 201


async def test_faults_are_tried_in_order_one_per_request(env: Env) -> None:
    await env.fault(mode="http_status", status=503, path="/notes")
    await env.fault(mode="http_status", status=500)
    await env.fault(mode="teapot", note="t", times=3)
    assert (await env.post("/tasks")).status_code == 500  # the first does not apply to /tasks
    assert (await env.post("/notes")).status_code == 503
    assert (await env.post("/notes")).status_code == 418
    [left] = await env.get("faults")
    assert (left["id"], left["remaining"], left["hits"]) == (3, 2, 1)
    assert (await env.http.delete("/_sandbox/faults")).json() == {"cleared": 1}
    assert (await env.post()).status_code == 201


async def test_probability_is_seeded_and_lasts_until_cleared(env: Env) -> None:
    await env.fault(mode="http_status", status=503, probability=0.5, seed=11)
    statuses = [(await env.post()).status_code for _ in range(20)]
    rng = random.Random(11)
    assert statuses == [503 if rng.random() < 0.5 else 201 for _ in range(20)]
    [active] = await env.get("faults")
    assert (active["remaining"], active["hits"]) == (None, statuses.count(503))
    assert env.sandbox.clear_faults() == 1


async def test_probability_with_times_stops_after_times_hits(env: Env) -> None:
    env.sandbox.add_fault(FaultSpec(mode="http_status", status=503, probability=1.0, times=2))
    assert [(await env.post()).status_code for _ in range(3)] == [503, 503, 201]


async def test_a_request_that_may_not_fault_leaves_the_faults_alone(env: Env) -> None:
    await env.fault(mode="http_status", status=503, times=1)
    assert (await env.post(**{"x-no-fault": "1"})).status_code == 201
    assert (await env.post()).status_code == 503


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "http_status"},
        {"mode": "http_status", "status": 200},
        {"mode": "http_status", "status": 500, "seconds": 1},
        {"mode": "delay"},
        {"mode": "delay", "seconds": 0},
        {"mode": "delay", "seconds": 1, "status": 500},
        {"mode": "drop", "body": {}},
        {"mode": "drop", "note": "x"},
        {"mode": "teapot"},
        {"mode": "drop", "times": 0},
        {"mode": "drop", "probability": 1.5},
        {"mode": "drop", "seed": 3},
        {"mode": "drop", "unknown": 1},
        {"mode": "explode"},
        {},
    ],
)
async def test_an_invalid_spec_is_422_and_adds_nothing(env: Env, spec: dict[str, Any]) -> None:
    r = await env.http.post("/_sandbox/faults", json=spec)
    assert r.status_code == 422, spec
    assert env.sandbox.faults == []


def test_add_fault_validates_a_mapping() -> None:
    sandbox = TinySandbox()
    with pytest.raises(ValueError, match="needs 'status'"):
        sandbox.add_fault({"mode": "http_status"})
    fault = sandbox.add_fault({"mode": "drop", "path": "/tasks"})
    assert isinstance(fault.spec, FaultSpec)
    assert (fault.id, fault.remaining, fault.spec.path) == (1, 1, "/tasks")


# ---- latency and reset -------------------------------------------------------------------------


async def test_latency_delays_vendor_answers_only(env: Env) -> None:
    assert (await env.http.post("/_sandbox/latency", json={"ms": 250})).json() == {"ms": 250}
    started = time.perf_counter()
    assert (await env.post()).status_code == 201
    assert time.perf_counter() - started >= 0.25
    started = time.perf_counter()
    assert await env.get("latency") == {"ms": 250}
    await env.get("requests")
    assert time.perf_counter() - started < 0.25
    assert (await env.http.post("/_sandbox/latency", json={"ms": -1})).status_code == 422
    with pytest.raises(ValueError, match=">= 0"):
        env.sandbox.set_latency(-1)


async def test_latency_comes_before_a_fault(env: Env) -> None:
    env.sandbox.set_latency(200)
    await env.fault(mode="http_status", status=503)
    started = time.perf_counter()
    assert (await env.post()).status_code == 503
    assert time.perf_counter() - started >= 0.2


async def test_reset_forgets_everything_and_restarts_the_counters(env: Env) -> None:
    await env.post()
    await env.fault(mode="drop", times=5)
    env.sandbox.set_latency(10)
    assert (await env.http.post("/_sandbox/reset")).json() == {"ok": True}
    for what in ("requests", "faults"):
        assert await env.get(what) == [], what
    assert await env.get("latency") == {"ms": 0}
    assert env.sandbox.tasks == []  # the subclass's reset ran too
    assert (await env.fault(mode="http_status", status=500))["id"] == 1
    await env.post()
    assert [r.seq for r in env.sandbox.requests] == [1]
