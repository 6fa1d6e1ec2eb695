"""Issue 8: 10,000 requests, hostile ones mixed with valid webhooks, through every role to the sandbox Maxma.

The ingest API, the normalizer and the maxma service run as `relay` subprocesses on Tansu and SQLite.
Bar (the design's "bad input" and issue 8's): no 5xx; nothing published from a refused request (the inbox
holds exactly the 202'd ids); every valid webhook becomes its Maxma client within a bound; every string Maxma
received is clean text; no consumer stalls (both stay ready and commit the whole topic).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes

import httpx
import pytest

from services.common.embedded import EmbeddedBroker
from services.common.events import EventName
from services.common.kafka import EVENTS, INBOX
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import KNOWN
from services.sandbox.maxma import MaxmaSandbox
from tests.support import SOURCE_TOKEN, Roles, committed, eventually, maxma_target, read_all, role_env

TOTAL = 10_000
VALID_EVERY = 10  # one request in ten is a valid new client
WEBHOOK_EVENTS = [e.value for e in EventName]
HOSTILE = [
    "\x00", "\x1b[2J\x1b[31m", "\x1b]0;pwned\x07", "\r\n", "\u202e", "\u200b", "\ufeff", "\u2028", "\ud800",
    "\udfff", "{{client_id}}", "{appointment.status}}", "Ива\u0301нова", "Я" * 70_000, "' OR 1=1 --", "%00",
    "79169000001", "1e3", "NaN", "-1", "١٢٣", "<script>", "\\", '"', "[]", "{}",
]  # fmt: skip


@dataclass
class Stack:
    roles: Roles
    sandbox: MaxmaSandbox
    bootstrap: str


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with maxma_target(tmp_path) as target:
        env = role_env(
            target.config, broker.bootstrap_servers, target.db_url,
            RELAY_INGEST__RATE_LIMIT_PER_S="100000", RELAY_INGEST__RATE_LIMIT_BURST="100000",
            RELAY_LOG_LEVEL="WARNING",
        )  # fmt: skip
        roles = Roles(env, tmp_path)
        try:
            roles.start("api", "ingest", "api")
            roles.start("normalizer", "ingest", "normalizer")
            roles.start("maxma", "maxma")
            await roles.ready("api", "normalizer", "maxma")
            yield Stack(roles, target.sandbox, broker.bootstrap_servers)
        finally:
            roles.stop_all()


def _hostile_text(rng: random.Random) -> bytes:
    """A value as bytes: hostile pieces, random bytes (often not UTF-8), or both."""
    parts: list[bytes] = []
    for _ in range(rng.randint(0, 3)):
        pick = rng.random()
        if pick < 0.5:
            parts.append(rng.choice(HOSTILE).encode("utf-8", "surrogatepass")[: rng.choice([8, 64, 100_000])])
        elif pick < 0.8:
            parts.append(rng.randbytes(rng.randint(1, 12)))
        else:
            parts.append(str(rng.randint(0, 999_999)).encode())
    return b"".join(parts)


def _fuzzed(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path-and-query, headers, body) of a hostile request."""
    token = SOURCE_TOKEN if rng.random() < 0.9 else rng.choice(["", "x" * 40, SOURCE_TOKEN + "\x00", "%ff"])
    event = (
        rng.choice(WEBHOOK_EVENTS) if rng.random() < 0.9 else rng.choice(["client-deleted", "%00", "..", ""])
    )
    keys = sorted(KNOWN)
    pairs = []
    for _ in range(rng.randint(0, 8)):
        key = rng.choice(keys).encode() if rng.random() < 0.8 else _hostile_text(rng)
        pairs.append(f"{quote_from_bytes(key)}={quote_from_bytes(_hostile_text(rng))}")
    query = "&".join(pairs)[: rng.choice([200, 2000, 9000])]
    path = f"/hooks/klientiks/{quote(token, safe='%')}/{quote(event, safe='%')}?{query}"
    method, headers, body = "GET", {}, b""
    if rng.random() < 0.5:
        method = "POST"
        kind = rng.random()
        if kind < 0.4:  # JSON, with whatever a JSON body can hold (lone surrogate escapes included)
            obj: dict[str, Any] = {}
            for _ in range(rng.randint(0, 6)):
                value: Any = rng.choice(
                    [rng.choice(HOSTILE), rng.randint(-(10**20), 10**20), rng.random(), True, None, [rng.choice(HOSTILE)],
                     {"a": rng.choice(HOSTILE)}]
                )  # fmt: skip
                obj[rng.choice(keys) if rng.random() < 0.8 else rng.choice(HOSTILE)] = value
            body = json.dumps(obj).encode()[: rng.choice([100, 10_000, 70_000])]
            headers["content-type"] = "application/json"
        elif kind < 0.8:
            body = "&".join(
                f"{quote_from_bytes(rng.choice(keys).encode())}={quote_from_bytes(_hostile_text(rng))}"
                for _ in range(rng.randint(1, 5))
            ).encode() + (rng.randbytes(4) if rng.random() < 0.3 else b"")
            headers["content-type"] = "application/x-www-form-urlencoded"
        else:
            body = rng.randbytes(rng.randint(0, 300))
            headers["content-type"] = rng.choice(
                ["text/plain", "application/xml", "", "application/json; x=\x01"]
            )
    return method, path, headers, body


def _valid(i: int) -> tuple[str, str, str]:
    client_id = str(700_000_000 + i)
    query = (f"client_id={client_id}&client_phone=7916{5_000_000 + i:07d}"
             f"&client_name={quote(f'Клиентова Анна {i}')}&client_email=c{i}%40example.ru")  # fmt: skip
    return client_id, f"/hooks/klientiks/{SOURCE_TOKEN}/client-created?{query}", query


def _clean(value: str) -> bool:
    return value.isprintable() and unicodedata.is_normalized("NFC", value) and value == value.strip()


@pytest.mark.timeout(600)
async def test_ten_thousand_hostile_and_valid_requests_end_to_end(stack: Stack) -> None:
    rng = random.Random(8)
    statuses: dict[int, int] = {}
    accepted: set[str] = set()
    valid_ids: list[str] = []
    plan: list[tuple[str, str, dict[str, str], bytes]] = []
    for n in range(TOTAL):
        if n % VALID_EVERY == 0:
            client_id, path, _ = _valid(n)
            valid_ids.append(client_id)
            plan.append(("GET", path, {}, b""))
        else:
            plan.append(_fuzzed(rng))

    queue: asyncio.Queue[tuple[str, str, dict[str, str], bytes]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            method, path, headers, body = queue.get_nowait()
            r = await http.request(method, stack.roles.url("api") + path, headers=headers, content=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 202:
                accepted.add(r.json()["event_id"])

    started = time.monotonic()
    # The client lets an idle connection go before the API's keep-alive timeout (5 s) closes it under it.
    limits = httpx.Limits(max_connections=16, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(16)))
    sent_at = time.monotonic()
    print(f"{TOTAL} requests sent in {sent_at - started:.1f} s")

    assert sum(statuses.values()) == TOTAL
    assert not {s for s in statuses if s >= 500}, statuses
    assert statuses.get(202, 0) >= len(valid_ids)

    def delivered() -> bool:
        return {c.external_id for c in stack.sandbox.clients.values()} >= set(valid_ids)

    await eventually(delivered, timeout=120, interval=0.5, what="every valid webhook's client in Maxma")
    bound = time.monotonic() - sent_at

    for client in stack.sandbox.clients.values():
        for name, value in vars(client).items():
            if isinstance(value, str):
                assert _clean(value), (name, value)
    for request in stack.sandbox.requests:
        for value in _strings(request.body):
            assert _clean(value), value

    # Exactly the accepted requests reached the inbox: nothing published from a refused one.
    inbox = await read_all(stack.bootstrap, INBOX, expect=len(accepted), timeout=60)
    assert {InboxRecord.from_bytes(r.value).id for r in inbox} == accepted

    # Nothing stalls: both consumers commit every record of their topic and stay ready.
    for group, topic in (("relay-normalizer", INBOX), ("relay-maxma", EVENTS)):
        await eventually(
            lambda g=group, t=topic: _caught_up(stack.bootstrap, g, t), timeout=60, what=f"{group} commits"
        )
    async with httpx.AsyncClient() as http:
        for role in ("normalizer", "maxma"):
            assert (await http.get(stack.roles.url(role) + "/readyz")).status_code == 200
    print(
        f"statuses {dict(sorted(statuses.items()))}; every valid client in Maxma {bound:.1f} s after the last send"
    )


async def _caught_up(bootstrap: str, group: str, topic: str) -> bool:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from tests.support import partition_count

    done = await committed(bootstrap, group, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(await partition_count(bootstrap, topic))]
        consumer.assign(tps)
        ends = {}
        for tp in tps:  # Tansu: highwater via a fetch, not end_offsets
            await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(timeout_ms=500)
        for tp in tps:
            ends[tp.partition] = consumer.highwater(tp) or 0
        del batch
    finally:
        await consumer.stop()
    return all(done.get(p, 0) >= end for p, end in ends.items())


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []
