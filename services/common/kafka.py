"""Kafka setup: topic names and partition counts, producer, FastStream broker and consumer settings."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

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


DAY_MS = 24 * 3600 * 1000
# Days each topic keeps its records (retention.ms), matched to the ledger's retention (docs/operations.md,
# "Retention"): the events topic as long as the event history (retention.events_days); the inbox a week (the
# history keeps every request after that); quarantine and dead letters the time an operator has to act.
RETENTION_DAYS: dict[str, int] = {INBOX: 7, EVENTS: 30, QUARANTINE: 30}
DLQ_RETENTION_DAYS = 30


def retention_ms(topic: str) -> int:
    """``retention.ms`` of one of the relay's topics (any topic not named above is a dead-letter topic)."""
    return RETENTION_DAYS.get(topic, DLQ_RETENTION_DAYS) * DAY_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int

    @property
    def configs(self) -> dict[str, str]:
        """The topic's configs as CreateTopics takes them."""
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": "delete"}


def topic_specs(settings: KafkaSettings) -> list[TopicSpec]:
    counts = DEFAULT_PARTITIONS | settings.partitions
    return [TopicSpec(name, n, retention_ms(name)) for name, n in counts.items()]


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create every topic with its partition count and retention; a plain publish would auto-create it with
    one partition and the broker's retention. An existing topic is left as it is."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-admin",
        request_timeout_ms=settings.request_timeout_ms,
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=s.configs,
            )
            for s in topic_specs(settings)
            if s.name not in existing
        ]
        if new:
            # Another process may win the race to create them.
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics(new)
                _raise_refused(response.topic_errors)
    finally:
        await admin.close()


def _raise_refused(topic_errors: list[tuple[Any, ...]]) -> None:
    """CreateTopics answers per topic and aiokafka raises none of them: a refused config would go unseen."""
    for name, code, *message in topic_errors:
        if code not in (0, TopicAlreadyExistsError.errno):
            detail = message[0] if message and message[0] else "no message"
            raise for_code(code)(f"topic {name} not created: {detail}")


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
