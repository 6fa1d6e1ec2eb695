"""Kafka setup: topic names and partition counts, producer, FastStream broker and consumer settings."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.common.config import TARGETS, KafkaSettings

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker

INBOX = "klientiks.inbox.v1"
EVENTS = "klientiks.events.v1"
QUARANTINE = "klientiks.quarantine.v1"


def dlq_topic(target: str) -> str:
    return f"relay.{target}.dlq"


# Partition counts used when the settings name none; keys spread per client, so more is more parallel.
DEFAULT_PARTITIONS: dict[str, int] = {INBOX: 6, EVENTS: 12, QUARANTINE: 1} | {
    dlq_topic(t): 1 for t in TARGETS
}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


def topic_specs(settings: KafkaSettings) -> list[TopicSpec]:
    counts = DEFAULT_PARTITIONS | settings.partitions
    return [TopicSpec(name, n) for name, n in counts.items()]


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create every topic with its partition count; a plain publish would auto-create it with one."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-admin",
        request_timeout_ms=settings.request_timeout_ms,
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(s.name, num_partitions=s.partitions, replication_factor=settings.replication_factor)
            for s in topic_specs(settings)
            if s.name not in existing
        ]
        if new:
            # Another process may win the race to create them.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


def producer_options(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "acks": "all",
        "enable_idempotence": settings.enable_idempotence,
        "request_timeout_ms": settings.request_timeout_ms,
        "linger_ms": 0,
    }


def make_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_options(settings))


def make_broker(settings: KafkaSettings, **kwargs: Any) -> KafkaBroker:
    """A FastStream broker whose publishers wait for all in-sync replicas.

    Its log lines go through the project's logging (JSON, masked); per-message lines are DEBUG.
    """
    # Imported here: the delivery services do not use FastStream and need not carry its ~35 MB.
    from faststream.kafka import KafkaBroker

    return KafkaBroker(
        settings.bootstrap_servers,
        client_id=settings.client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        request_timeout_ms=settings.request_timeout_ms,
        allow_auto_create_topics=False,
        logger=logging.getLogger("relay.faststream"),
        log_level=logging.DEBUG,
        **kwargs,
    )


class ConsumerOptions(TypedDict):
    group_id: str
    auto_offset_reset: Literal["earliest"]
    session_timeout_ms: int
    heartbeat_interval_ms: int
    fetch_max_wait_ms: int


def consumer_options(settings: KafkaSettings, group_id: str) -> ConsumerOptions:
    """Consumer settings for a group that commits by hand (at least once)."""
    return {
        "group_id": group_id,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
    }
