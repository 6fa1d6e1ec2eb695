"""The Plarin deliverer end to end: the plugin's ``deliver`` with a real ``Steps`` on a migrated SQLite ledger,
sending over the service's pooled transport to the strict sandbox (with a token) on real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest

from services.common.config import SourceConfig
from services.common.delivery.steps import Steps
from services.common.events import CloudEvent, EventName, Invoice
from services.common.httpclient import make_transport
from services.common.ledger import PENDING, Ledger, idempotency_key
from services.common.outcome import Outcome, OutcomeKind
from services.ingest.parsing import is_placeholder
from services.plarin.plugin import TARGET, deliverer
from services.plarin.settings import PlarinConnection
from services.sandbox.plarin import PlarinSandbox, create_plarin_app
from tests.plarin.support import TOKEN, TS, YCLID, event
from tests.support import serve_app

# The conftest's ledger (migrated with `upgrade`), on SQLite in tmp_path only.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

SOURCE = SourceConfig(name="salon", token="salon-token-0123456789abcdef")
VISIT_KEY = "visit-paid:visit:55017"


@dataclass
class Served:
    sandbox: PlarinSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = PlarinSandbox()
    async with serve_app(create_plarin_app(TOKEN, sandbox)) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[PlarinSandbox]:
    served.sandbox.reset()
    yield served.sandbox
    served.sandbox.reset()


@pytest.fixture
async def transport() -> AsyncIterator[httpx.AsyncBaseTransport]:
    t = make_transport(10)
    try:
        yield t
    finally:
        await t.aclose()


def demo(url: str, **over: Any) -> PlarinConnection:
    """The demo connection `relay run` writes for the sandbox at ``url``; a keyword replaces a key."""
    assert TARGET.demo is not None
    return PlarinConnection.model_validate({"name": "plarin", **TARGET.demo(url, TOKEN), **over})


@dataclass
class Relay:
    """Plarin connections of source `salon`, delivering as the runtime would."""

    ledger: Ledger
    url: str
    transport: httpx.AsyncBaseTransport

    def conn(self, **over: Any) -> PlarinConnection:
        return demo(self.url, **over)

    async def deliver(
        self, ev: CloudEvent, conn: PlarinConnection | None = None, *, replay: bool = False
    ) -> Outcome:
        conn = conn or self.conn()
        action = conn.events[ev.event_name]
        key = idempotency_key("plarin", conn.name, action, ev.id)
        steps = Steps(self.ledger, key, conn.name, target="plarin", replay=replay)
        return await deliverer(SOURCE, conn, self.transport)(action, ev, key, steps)

    async def sent(self, conn_name: str, conversion: str) -> str | None:
        """The click id the entity map holds for a sent conversion."""
        entity = await self.ledger.entity(conn_name, "conversion", conversion)
        return entity.target_id if entity else None


@pytest.fixture
def relay(
    ledger: Ledger, served: Served, sandbox: PlarinSandbox, transport: httpx.AsyncBaseTransport
) -> Relay:
    return Relay(ledger, served.url, transport)


# ---------------------------------------------------------------------------------------------------------
# One conversion per visit


async def test_a_paid_visit_with_a_yclid_sends_one_postback(relay: Relay, sandbox: PlarinSandbox) -> None:
    ev = event(click_ids={"yclid": YCLID}, total="1500")
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.SUCCESS
    assert (out.skipped, out.http_status) == (None, 200)
    [pb] = sandbox.postbacks
    assert pb.path == "/postback"
    # Decoded back by the sandbox: the event's values, in the template's order; the token masked.
    assert pb.params == {"token": "***", "click_id": YCLID, "event": "visit-paid", "value": "1500.00",
                         "currency": "RUB", "event_id": ev.id, "ts": TS}  # fmt: skip
    assert list(pb.params) == ["token", "click_id", "event", "value", "currency", "event_id", "ts"]
    [rec] = sandbox.requests
    assert (rec.method, rec.status, rec.token_ok) == ("GET", 200, True)
    assert await relay.sent("plarin", VISIT_KEY) == YCLID


async def test_the_same_visit_again_is_skipped(relay: Relay, sandbox: PlarinSandbox) -> None:
    assert (await relay.deliver(event(click_ids={"yclid": YCLID}, event_id="e1"))).ok
    # Another webhook of the same paid visit (another event id), even with another click id.
    again = await relay.deliver(event(click_ids={"yclid": "999"}, event_id="e2", total="2000"))
    assert again == Outcome.skip("conversion_already_sent", again.reason)
    assert again.ok
    assert again.reason
    assert len(sandbox.postbacks) == 1
    assert len(sandbox.requests) == 1  # nothing was sent for the second event
    # The first event delivered again (a replay) is skipped as well.
    assert (
        await relay.deliver(event(click_ids={"yclid": YCLID}, event_id="e1"))
    ).skipped == "conversion_already_sent"
    assert len(sandbox.requests) == 1
    assert await relay.sent("plarin", VISIT_KEY) == YCLID


async def test_another_visit_and_another_connection_are_other_conversions(
    relay: Relay, sandbox: PlarinSandbox
) -> None:
    assert (await relay.deliver(event(click_ids={"yclid": "y1"}, event_id="e1"))).skipped is None
    assert (
        await relay.deliver(event(click_ids={"yclid": "y2"}, event_id="e2", visit="55018"))
    ).skipped is None
    # A second cabinet (its own connection) gets its own postback for the same visit.
    other = relay.conn(name="plarin-2")
    assert (await relay.deliver(event(click_ids={"yclid": "y1"}, event_id="e1"), other)).skipped is None
    assert [(pb.params["click_id"], pb.params["event_id"]) for pb in sandbox.postbacks] == [
        ("y1", "e1"),
        ("y2", "e2"),
        ("y1", "e1"),
    ]
    assert await relay.sent("plarin-2", VISIT_KEY) == "y1"
    assert await relay.sent("plarin", "visit-paid:visit:55018") == "y2"


async def test_without_a_click_id_nothing_is_sent(relay: Relay, sandbox: PlarinSandbox) -> None:
    ev = event(utm={"utm_source": "yandex", "utm_campaign": "весна"}, extra={"sub1": "x"})
    out = await relay.deliver(ev)
    assert out == Outcome.skip("no_click_id", out.reason)
    assert out.ok
    assert out.reason
    assert sandbox.requests == []
    assert await relay.sent("plarin", VISIT_KEY) is None
    # A click id arriving with a later event of the same visit is still sent.
    assert (await relay.deliver(event(click_ids={"gclid": "G-1"}, event_id="e2"))).skipped is None
    assert sandbox.postbacks[0].params["click_id"] == "G-1"


async def test_the_connections_own_click_id_param(relay: Relay, sandbox: PlarinSandbox) -> None:
    conn = relay.conn(click_id_params=["sub_click"])
    assert (await relay.deliver(event(click_ids={"yclid": YCLID}), conn)).skipped == "no_click_id"
    assert (await relay.deliver(event(extra={"sub_click": "S-1"}), conn)).skipped is None
    assert sandbox.postbacks[0].params["click_id"] == "S-1"


# ---------------------------------------------------------------------------------------------------------
# Failures


async def test_a_503_is_retryable_and_the_retry_sends_once(relay: Relay, sandbox: PlarinSandbox) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 503, "retry_after": 5})
    ev = event(click_ids={"yclid": YCLID})
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.RETRYABLE
    assert (out.http_status, out.retry_after) == (503, 5.0)
    assert sandbox.postbacks == []
    assert await relay.sent("plarin", VISIT_KEY) is None  # nothing remembered
    # The runtime's retry: the same event, the same key.
    retried = await relay.deliver(ev)
    assert retried.ok
    assert retried.skipped is None
    assert len(sandbox.postbacks) == 1
    assert len(sandbox.requests) == 2
    assert await relay.sent("plarin", VISIT_KEY) == YCLID
    assert (await relay.deliver(ev)).skipped == "conversion_already_sent"
    assert len(sandbox.postbacks) == 1


async def test_a_dropped_connection_leaves_the_conversion_in_doubt_never_sent_twice(
    relay: Relay, sandbox: PlarinSandbox
) -> None:
    # The receiver may have stored it before the connection dropped: a second send could count it twice.
    sandbox.add_fault({"mode": "drop", "times": 2})  # the transport resends a dropped GET once by itself
    ev = event(click_ids={"yclid": YCLID})
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.PERMANENT
    assert out.reason.startswith("in doubt")
    assert out.hint is not None
    assert f"relay dlq replay --event-id {ev.id}" in out.hint
    assert TOKEN not in out.reason
    assert await relay.sent("plarin", VISIT_KEY) == PENDING  # in doubt for every later event too
    again = await relay.deliver(ev)  # a retry of the same delivery: still in doubt, nothing sent
    assert again.reason.startswith("in doubt")
    assert len(sandbox.requests) == 2
    # The operator checked Plarin and replays: sent once.
    assert (await relay.deliver(ev, replay=True)).ok
    assert len(sandbox.postbacks) == 1


async def test_an_answered_failure_may_be_sent_again(relay: Relay, sandbox: PlarinSandbox) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 503})
    ev = event(click_ids={"yclid": YCLID})
    assert (await relay.deliver(ev)).kind is OutcomeKind.RETRYABLE
    assert (await relay.deliver(ev)).ok
    assert len(sandbox.postbacks) == 1


async def test_a_fault_matching_one_click_id(relay: Relay, sandbox: PlarinSandbox) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 502, "match": {"click_id": "bad-click"}, "times": 5})
    ok = await relay.deliver(event(click_ids={"yclid": "good"}, event_id="e1"))
    failed = await relay.deliver(event(click_ids={"yclid": "bad-click"}, event_id="e2", visit="55018"))
    assert ok.skipped is None
    assert failed.kind is OutcomeKind.RETRYABLE
    assert failed.http_status == 502
    assert [pb.params["click_id"] for pb in sandbox.postbacks] == ["good"]
    assert await relay.sent("plarin", "visit-paid:visit:55018") is None


async def test_a_400_is_permanent_and_nothing_is_remembered(
    relay: Relay, transport: httpx.AsyncBaseTransport
) -> None:
    # A receiver that needs client_id, which the demo template does not carry.
    strict = PlarinSandbox()
    async with serve_app(create_plarin_app(TOKEN, strict, required=("click_id", "client_id"))) as url:
        conn = demo(url)
        out = await relay.deliver(event(click_ids={"yclid": YCLID}), conn)
        assert out.kind is OutcomeKind.PERMANENT
        assert (out.http_status, out.opens_circuit) == (400, False)
        assert strict.postbacks == []
        [rec] = strict.requests
        assert rec.message == "missing required parameter: client_id"
        assert await relay.sent("plarin", VISIT_KEY) is None
        # With {client_id} in the template the same receiver takes it.
        fixed = demo(url, name="plarin-fixed", postback_url=conn.postback_url + "&client_id={client_id}")
        assert (await relay.deliver(event(click_ids={"yclid": YCLID}), fixed)).ok
        assert strict.postbacks[0].params["client_id"] == "1842"


async def test_a_wrong_token_is_permanent_and_opens_the_circuit(relay: Relay, sandbox: PlarinSandbox) -> None:
    conn = relay.conn(postback_url=relay.conn().postback_url.replace(TOKEN, "revoked-token-0000"))
    out = await relay.deliver(event(click_ids={"yclid": YCLID}), conn)
    assert out.kind is OutcomeKind.PERMANENT
    assert (out.http_status, out.opens_circuit) == (403, True)
    assert "revoked-token-0000" not in out.reason
    assert sandbox.postbacks == []
    assert await relay.sent("plarin", VISIT_KEY) is None


async def test_an_event_without_its_value_is_permanent_with_a_hint(
    relay: Relay, sandbox: PlarinSandbox
) -> None:
    out = await relay.deliver(event(click_ids={"yclid": YCLID}, total=None))
    assert out.kind is OutcomeKind.PERMANENT
    assert "{value}" in out.reason
    assert out.hint is not None
    assert "appointment_total_cost" in out.hint
    assert sandbox.requests == []
    assert await relay.sent("plarin", VISIT_KEY) is None


# ---------------------------------------------------------------------------------------------------------
# The strict sandbox takes whatever the relay sends

LONG_ASCII = "Cj0KCQjw" + "AbcXyz-_09" * 100  # a 1000-character gclid-like id
# (what, where the click id is, the click id)
CASES: list[tuple[str, str, str]] = [
    ("yclid-digits", "click_ids.yclid", "7364512098347561234"),
    ("gclid-long", "click_ids.gclid", LONG_ASCII),
    ("click-id-extra", "extra.click_id", "c-42_ab.cd~ef"),
    ("utm-content-cyrillic", "utm.utm_content", "баннер весна 2024"),
    ("utm-content-long-cyrillic", "utm.utm_content", "объявление-" * 40),
    ("utm-content-symbols", "utm.utm_content", "a&b=c#d/e+f%20g?h"),
    ("emoji-and-quotes", "extra.click_id", "🎯 «акция» 'x' \"y\""),
    ("kazakh-letters", "utm.utm_content", "Нұрлан Әбенов"),
    ("plus-offset", "extra.click_id", "2024-03-14T12:15:30+03:00"),
]


def case_event(where: str, click: str, n: int, name: EventName) -> CloudEvent:
    place, key = where.split(".")
    clicks = {key: click} if place == "click_ids" else None
    utm = {key: click, "utm_source": "яндекс", "utm_campaign": "весна 2024"} if place == "utm" else None
    extra = {key: click} if place == "extra" else None
    invoice = Invoice(amount=Decimal(f"{n + 1}99.5")) if name is EventName.INVOICE_CREATED else None
    return event(name=name, event_id=f"evt-{n}", client_id=f"кл-{n}", visit=str(60000 + n), total=f"{n + 1}50.05",
                 click_ids=clicks, utm=utm, extra=extra, invoice=invoice)  # fmt: skip


async def test_the_sandbox_accepts_every_postback_the_relay_sends(
    relay: Relay, sandbox: PlarinSandbox
) -> None:
    # One ledger for the whole range; every macro, the Klientiks names given their own {event}.
    template = relay.conn().postback_url + "&client_id={client_id}&sub=klientiks"
    conn = relay.conn(
        postback_url=template,
        events={"visit-paid": "conversion", "invoice-created": "conversion"},
        event_names={"visit-paid": "Оплата визита", "invoice-created": "invoice & paid"},
        currency="KZT",
    )
    for n, (label, where, click) in enumerate(CASES):
        for name in (EventName.VISIT_PAID, EventName.INVOICE_CREATED):
            what = f"{label} / {name}"
            ev = case_event(where, click, n, name)
            sandbox.reset()
            out = await relay.deliver(ev, conn)
            assert out.ok, (what, out.reason, [r.message for r in sandbox.requests])
            assert out.skipped is None, what
            [pb] = sandbox.postbacks
            value = f"{n + 1}99.50" if name is EventName.INVOICE_CREATED else f"{n + 1}50.05"
            assert pb.params == {
                "token": "***",
                "click_id": click,
                "event": conn.event_names[name],
                "value": value,
                "currency": "KZT",
                "event_id": f"evt-{n}",
                "ts": TS,
                "client_id": f"кл-{n}",
                "sub": "klientiks",
            }, what
            assert await relay.sent(conn.name, f"{name.value}:visit:{60000 + n}") == click, what


async def test_a_click_id_with_a_macro_inside_is_no_click_id(relay: Relay, sandbox: PlarinSandbox) -> None:
    # An ad platform that left its own macro unrendered inside a tag (utm_content=banner_{ad_id}): the
    # normalizer drops only a value that is a placeholder as a whole, so the relay skips it as no click id.
    assert is_placeholder("{ad_id}")
    assert not is_placeholder("banner_{ad_id}")
    out = await relay.deliver(event(utm={"utm_content": "banner_{ad_id}"}))
    assert out.skipped == "no_click_id"
    assert sandbox.requests == []
