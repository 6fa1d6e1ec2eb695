"""The published contract, generated from the code: JSON Schema of events, AsyncAPI of the topics."""

from __future__ import annotations

from typing import Any

from services.common.config import TARGETS
from services.common.dlq import PREFIX
from services.common.events import CE_TYPES, CloudEvent, EventData
from services.common.kafka import EVENTS, INBOX, QUARANTINE, dlq_topic

_CE_HEADERS = {
    "ce_specversion": "CloudEvents version, always 1.0",
    "ce_id": "event id: the event_id the webhook was answered with",
    "ce_source": "/klientiks/{source}",
    "ce_type": "one of: " + ", ".join(CE_TYPES.values()),
    "ce_time": "when the webhook was received (RFC 3339)",
    "ce_subject": "client/{id} or appointment/{id}",
    "ce_relayreceivedat": "when the webhook was received (RFC 3339)",
    "content-type": "application/json",
}
_DLQ_HEADERS = {
    f"{PREFIX}reason": "why it failed, in words",
    f"{PREFIX}class": "permanent or retryable (retries exhausted)",
    f"{PREFIX}http-status": "the target's last HTTP status, if any",
    f"{PREFIX}vendor-code": "the target's error code, if any",
    f"{PREFIX}attempts": "attempts made",
    f"{PREFIX}first-attempt-at": "RFC 3339",
    f"{PREFIX}last-attempt-at": "RFC 3339",
    f"{PREFIX}target": "target service",
    f"{PREFIX}connection": "connection name within its source",
    f"{PREFIX}action": "target action, e.g. new-client",
    f"{PREFIX}idempotency-key": "<target>:<connection>:<action>:<event id>",
}


def event_data_schema() -> dict[str, Any]:
    """JSON Schema of the ``data`` of every event (the Kafka record value)."""
    schema = EventData.model_json_schema(mode="serialization")
    schema["$id"] = "https://klientiks-relay/schemas/event-data.v1.json"
    return schema


def cloudevent_schema() -> dict[str, Any]:
    """JSON Schema of a whole event in CloudEvents structured form (for tools that want one document)."""
    schema = CloudEvent.model_json_schema(mode="serialization")
    schema["$id"] = "https://klientiks-relay/schemas/cloudevent.v1.json"
    return schema


def _headers(names: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {k: {"type": "string", "description": v} for k, v in names.items()},
    }


def asyncapi_document() -> dict[str, Any]:
    """AsyncAPI 3.0 description of the topics and their records."""
    event_message = {
        "name": "KlientiksEvent",
        "title": "A normalized Klientiks event (CloudEvents 1.0, Kafka binary mode)",
        "contentType": "application/json",
        "headers": _headers(_CE_HEADERS),
        "payload": {"$ref": "schemas/event-data.v1.json"},
        "bindings": {"kafka": {"key": {"type": "string", "description": "{source}:{client_id}, else "
                                                                       "{source}:appointment:{id}"}}},
    }  # fmt: skip
    inbox_message = {
        "name": "InboxRecord",
        "title": "A webhook request as received",
        "contentType": "application/json",
        "payload": {
            "type": "object",
            "required": ["id", "source", "event", "received_at", "method"],
            "properties": {
                "id": {"type": "string"},
                "source": {"type": "string"},
                "event": {"type": "string"},
                "received_at": {"type": "string", "format": "date-time"},
                "method": {"type": "string"},
                "query": {"type": "string"},
                "content_type": {"type": "string"},
                "body": {"type": "string"},
                "body_b64": {"type": "string", "description": "set instead of body when it is not UTF-8"},
            },
        },
    }
    channels: dict[str, Any] = {
        "inbox": {"address": INBOX, "messages": {"InboxRecord": inbox_message}},
        "events": {"address": EVENTS, "messages": {"KlientiksEvent": event_message}},
        "quarantine": {
            "address": QUARANTINE,
            "description": "Inbox records that could not become events, byte for byte, with headers "
            "`reason` and `detail`; replayed after a fix.",
            "messages": {"InboxRecord": inbox_message},
        },
    }
    for target in TARGETS:
        channels[f"{target}-dlq"] = {
            "address": dlq_topic(target),
            "description": "The original event and key, plus why its delivery failed.",
            "messages": {
                "DeadLetter": {
                    **event_message,
                    "name": "DeadLetter",
                    "headers": _headers(_CE_HEADERS | _DLQ_HEADERS),
                }
            },
        }
    operations = {
        "receiveWebhook": {"action": "send", "channel": {"$ref": "#/channels/inbox"},
                           "summary": "ingest API: the raw request, acks=all"},
        "normalize": {"action": "send", "channel": {"$ref": "#/channels/events"},
                      "summary": "normalizer: one typed event per valid inbox record"},
        "quarantine": {"action": "send", "channel": {"$ref": "#/channels/quarantine"}},
        "deliver": {"action": "receive", "channel": {"$ref": "#/channels/events"},
                    "summary": "each delivery service, in group relay-<target>"},
    }  # fmt: skip
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "klientiks-relay",
            "version": "1",
            "description": "Klientiks CRM webhooks as normalized Kafka events, and their dead letters.",
        },
        "channels": channels,
        "operations": operations,
    }
