"""The maxma process dies after Maxma answered but before its offset was committed: no second client."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from services.common.embedded import EmbeddedBroker
from services.common.events import Client, CloudEvent, EventData, EventName, kafka_key, source_uri
from services.common.failpoints import EXIT_CODE
from services.common.kafka import EVENTS
from services.common.ledger import DeliveryStatus, Ledger, idempotency_key, upgrade
from services.sandbox.maxma import MaxmaSandbox, create_maxma_app
from tests.support import MAXMA_KEY, Roles, committed, eventually, role_env, serve_app, write_config


def _event(event_id: str) -> CloudEvent:
    now = datetime.now(UTC)
    return CloudEvent(
        id=event_id,
        source=source_uri("salon"),
        type=EventName.CLIENT_CREATED.ce_type,
        time=now,
        subject="client/6439302",
        relayreceivedat=now,
        data=EventData(
            client=Client(
                id="6439302",
                full_name="Смирнова Ольга Петровна",
                first_name="Ольга",
                last_name="Смирнова",
                patronymic="Петровна",
                phone="+79031112233",
            )
        ),
    )


async def _publish(bootstrap: str, event: CloudEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            EVENTS,
            event.kafka_value(),
            key=kafka_key("salon", "6439302", None).encode(),
            headers=event.kafka_headers(),
        )
    finally:
        await producer.stop()


@pytest.mark.parametrize(
    ("failpoint", "requests_after_restart"),
    [
        # Killed before the ledger knew: the retry meets Maxma's natural key (externalId), not a new client.
        ("maxma.after_send", 2),
        # Killed after the ledger write: the retry is skipped, Maxma never hears of it again.
        ("maxma.after_record", 1),
    ],
)
async def test_killed_before_commit_creates_the_client_once(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path, failpoint: str, requests_after_restart: int
) -> None:
    sandbox = MaxmaSandbox()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    async with serve_app(create_maxma_app(processing_keys={MAXMA_KEY}, state=sandbox)) as maxma_url:
        config = write_config(tmp_path / "relay.yaml", maxma_url=maxma_url)
        roles = Roles(role_env(config, broker.bootstrap_servers, db_url), tmp_path)
        try:
            roles.start("maxma", "maxma", env={"RELAY_FAILPOINTS": f'["{failpoint}"]'})
            await roles.ready("maxma")
            await _publish(broker.bootstrap_servers, _event("evt-crash"))

            assert await roles.wait_exit("maxma") == EXIT_CODE, roles.log("maxma")[-2000:]
            assert len(sandbox.clients) == 1
            assert len(sandbox.requests) == 1
            assert await committed(broker.bootstrap_servers, "relay-maxma", EVENTS) == {}

            roles.start("maxma", "maxma")
            await roles.ready("maxma")
            await eventually(
                lambda: _committed_one(broker.bootstrap_servers),
                timeout=30,
                what="the restarted service to commit the event",
            )
            await asyncio.sleep(0.5)
            assert len(sandbox.clients) == 1
            assert len(sandbox.requests) == requests_after_restart
            if requests_after_restart == 2:
                # The second attempt was told the client exists (Maxma code 24 or 30): success, not a new client.
                assert sandbox.requests[1].error_code in (24, 30)
            delivery = await ledger.get(idempotency_key("maxma", "maxma", "new-client", "evt-crash"))
            assert delivery is not None
            assert delivery.status is DeliveryStatus.DELIVERED
        finally:
            roles.stop_all()
            await ledger.close()


async def _committed_one(bootstrap: str) -> bool:
    return sum((await committed(bootstrap, "relay-maxma", EVENTS)).values()) == 1
