"""Hostile input at the door: schemathesis against the published OpenAPI, then 1,500 fuzzed requests.

A live API on a real broker (in a thread: schemathesis and hypothesis drive it synchronously).
Bar: no 5xx, and nothing published from a refused request. The design's 10,000 requests run end to end in
tests/e2e/test_hostile_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.config import KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker, free_port
from services.common.events import EventName
from services.common.kafka import INBOX, ensure_topics
from services.common.ledger import migrate
from services.ingest.api import create_api
from services.ingest.inbox import InboxRecord
from tests.support import read_all

TOKEN = "salon-token-0123456789abcdef"
OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"
EVENTS = [e.value for e in EventName]


@dataclass
class Live:
    url: str
    bootstrap: str
    accepted: set[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    broker = EmbeddedBroker().start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    db = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fuzz') / 'relay.db'}"
    asyncio.run(ensure_topics(kafka))
    asyncio.run(migrate(db))
    config = Settings.model_validate(
        {
            "kafka": kafka.model_dump(),
            "database_url": db,
            # The limit is tested elsewhere; here every request should reach the parser.
            "ingest": {"rate_limit_per_s": 1_000_000, "rate_limit_burst": 1_000_000},
            "sources": [{"name": "salon", "token": TOKEN}],
        }
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_api(config), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", broker.bootstrap_servers, set())
    finally:
        server.should_exit = True
        thread.join(15)
        broker.stop()


schema = schemathesis.openapi.from_path(OPENAPI)


@schema.hook
def map_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> dict[str, Any]:
    # Random tokens only ever meet the 404: send most cases to a real source and event instead.
    digest = hashlib.sha256(repr(path_parameters).encode()).digest()
    if digest[0] % 4:
        path_parameters = dict(path_parameters, token=TOKEN)
        if digest[1] % 4:
            path_parameters["event"] = EVENTS[digest[2] % len(EVENTS)]
    return path_parameters


@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_openapi_contract_and_never_answers_5xx(case: Any, live: Live) -> None:
    response = case.call(base_url=live.url, timeout=30)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )
    if response.status_code == 202:
        live.accepted.add(response.json()["event_id"])


_text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    [
        "{{client.phone}}",
        "{appointment.status}}",
        "{{#new_data}}{{status}}{{/new_data}}",
        "",
        " ",
        "%",
        "&&==",
    ]
)
_names = (
    st.sampled_from(["client_id", "client_phone", "appointment_id", "services", "status", "utm_source"])
    | _text
)
_pairs = st.lists(st.tuples(_names, _text), max_size=8)
_content_types = st.sampled_from(
    [None, "application/json", "application/x-www-form-urlencoded", "text/plain", "application/xml",
     "multipart/form-data; boundary=x", "application/json; charset=utf-8"]
)  # fmt: skip
_bodies = (
    st.binary(max_size=300)
    | _pairs.map(lambda ps: "&".join(f"{quote(k)}={quote(v)}" for k, v in ps).encode())
    | st.dictionaries(_names, _text | st.integers() | st.none() | st.lists(st.integers())).map(
        lambda d: __import__("json").dumps(d).encode()
    )
)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five: the fuzz must get past the 404 to reach the parser and Kafka."""
    return st.integers(0, 4).flatmap(lambda n: good if n else bad)


_requests = st.fixed_dictionaries(
    {
        "method": _mostly(
            st.sampled_from(["GET", "POST"]), st.sampled_from(["PUT", "HEAD", "DELETE", "PATCH"])
        ),
        "token": _mostly(st.just(TOKEN), st.sampled_from([TOKEN[:-1], TOKEN + "x", "", "..", "%00"]) | _text),
        "event": _mostly(
            st.sampled_from(EVENTS), st.sampled_from(["client-deleted", "", "CLIENT-CREATED"]) | _text
        ),
        "query": _pairs.map(lambda ps: "&".join(f"{quote(k)}={quote(v)}" for k, v in ps))
        | st.text(max_size=60).map(lambda t: quote(t, safe="=&%{}")),
        "content_type": _content_types,
        "body": _bodies,
    }
)

# The design's 10,000 hostile requests run end to end in tests/e2e/test_hostile_end_to_end.py (no 5xx, inbox
# = the 202'd ids, and delivery); here hypothesis drives the API alone, shrinking a failure to its cause.
FUZZ_REQUESTS = 1_500


@settings(max_examples=FUZZ_REQUESTS, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(req=_requests)
def _fuzz(req: dict[str, Any], http: httpx.Client, live: Live, answers: dict[int, int]) -> None:
    headers = {"content-type": req["content_type"]} if req["content_type"] else {}
    path = f"/hooks/klientiks/{quote(req['token'], safe='')}/{quote(req['event'], safe='')}"
    r = http.request(
        req["method"], f"{path}?{req['query']}", content=req["body"] if req["method"] != "GET" else None,
        headers=headers,
    )  # fmt: skip
    answers[r.status_code] = answers.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text, req)
    if r.status_code == 202:
        live.accepted.add(r.json()["event_id"])


@pytest.mark.timeout(600)
def test_fuzzed_requests_no_5xx_and_only_accepted_ones_are_published(live: Live) -> None:
    answers: dict[int, int] = {}
    with httpx.Client(base_url=live.url, timeout=30) as http:
        _fuzz(http=http, live=live, answers=answers)
    assert sum(answers.values()) == FUZZ_REQUESTS
    assert answers.get(202, 0) > FUZZ_REQUESTS // 3  # the fuzz reached the publishing path, not only the 404s
    assert {400, 404} <= set(answers)
    records = asyncio.run(read_all(live.bootstrap, INBOX, expect=len(live.accepted) + 1, timeout=10))
    published = [InboxRecord.from_bytes(r.value).id for r in records]
    assert sorted(published) == sorted(live.accepted)  # every 202 published once; nothing else
