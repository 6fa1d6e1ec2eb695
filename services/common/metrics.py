"""Every project metric, declared once. No per-tenant labels: their cardinality is unbounded."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

WEBHOOKS = Counter(
    "relay_webhooks_received_total",
    "Webhook requests by source, event and outcome (accepted, spooled, not_found, too_large, bad_request, "
    "rate_limited, unavailable, length_required, timeout, disconnected); an unknown token's source is 'unknown'.",
    ["source", "event", "outcome"],
)
INGEST_REFUSED = Counter(
    "relay_ingest_connections_refused_total",
    "Requests and connections the ingest API cut short, by reason (header_too_large, header_timeout, "
    "body_timeout, too_many_connections, invalid_http).",
    ["reason"],
)
INGEST_DISCONNECTS = Counter(
    "relay_ingest_disconnects_total",
    "Clients of the ingest API that closed the connection in the middle of a request, by stage (headers, body).",
    ["stage"],
)
WEBHOOK_LATENCY = Histogram(
    "relay_webhook_request_seconds", "Time to answer a webhook request.", ["event"], buckets=_LATENCY
)
INBOX_PUBLISH_LATENCY = Histogram(
    "relay_inbox_publish_seconds",
    "Time to publish one raw webhook to the inbox with acks=all.",
    buckets=_LATENCY,
)
NORMALIZED = Counter("relay_events_normalized_total", "Inbox records turned into events.", ["event"])
QUARANTINED = Counter("relay_events_quarantined_total", "Inbox records sent to quarantine.", ["reason"])
MISSING_VALUES = Counter(
    "relay_webhook_missing_values_total",
    "Parameters that arrived empty or as an unrendered placeholder (never sent on as data).",
    ["event", "field", "kind"],
)
SPOOL_DEPTH = Gauge(
    "relay_ingest_spool_depth", "Webhooks accepted while Kafka was unreachable, not yet published."
)
SPOOLED = Counter("relay_ingest_spooled_total", "Webhooks written to the spool instead of Kafka.")
DEDUPLICATED = Counter(
    "relay_events_deduplicated_total", "Repeats of a webhook inside the dedupe window, dropped.", ["event"]
)
DELIVERIES = Counter(
    "relay_deliveries_total",
    "Delivery outcomes by target and action (success, duplicate, retryable, permanent).",
    ["target", "action", "outcome"],
)
SKIPS = Counter(
    "relay_delivery_skips_total",
    "Events a connection had nothing to send for (no confirmed order to cancel, a lead already sent, ...).",
    ["target", "action", "reason"],
)
ATTEMPT_LATENCY = Histogram(
    "relay_delivery_attempt_seconds",
    "Duration of one call to a target.",
    ["target", "action"],
    buckets=_LATENCY,
)
END_TO_END = Histogram(
    "relay_end_to_end_seconds", "From webhook received to target confirmed.", ["target"], buckets=_LATENCY
)
IN_FLIGHT = Gauge("relay_deliveries_in_flight", "Deliveries currently being attempted.", ["target"])
DLQ = Counter("relay_dlq_total", "Events sent to the dead-letter topic.", ["target", "class"])
PARKED = Gauge(
    "relay_deliveries_parked",
    "Deliveries waiting in the ledger (retry, open circuit, behind their key).",
    ["target"],
)
CIRCUITS_OPEN = Gauge(
    "relay_circuits_open", "Connections whose circuit breaker is open or half-open.", ["target"]
)
RATE_LIMIT_WAITS = Counter(
    "relay_rate_limit_waits_total", "Attempts that waited for a connection's rate limit.", ["target"]
)
CONSUMER_STALLED = Gauge(
    "relay_consumer_stalled",
    "1 while a consumer makes no progress, by reason (failing, stuck, not_committing); /readyz is 503 then.",
    ["group", "reason"],
)
CONSUMER_BATCH_FAILURES = Counter(
    "relay_consumer_batch_failures_total",
    "Batches (or fetches) a consumer failed and will read again: Kafka or the ledger was unavailable.",
    ["group"],
)
CONSUMER_LAG = Gauge(
    "relay_consumer_lag",
    "Records not yet committed: highwater - committed offset.",
    ["group", "topic", "partition"],
)
KLIENTIKS_REQUESTS = Counter(
    "relay_klientiks_api_requests_total",
    "Klientiks REST API requests by action and outcome (ok, not_found, unauthorized, rate_limited, ...).",
    ["action", "outcome"],
)
ENRICHMENT_WAITING = Gauge(
    "relay_enrichment_waiting_keys",
    "Keys whose records wait in the ledger for the Klientiks API (a thin webhook first).",
)
ENRICHED = Counter(
    "relay_events_enriched_total",
    "Thin webhooks completed from the Klientiks API, by outcome (enriched, not_found, backlog, ...).",
    ["event", "outcome"],
)
PURGED_ROWS = Counter(
    "relay_ledger_purged_rows_total",
    "Rows the retention purge removed from the ledger, by table (events, delivery_attempts, deliveries, "
    "delivery_steps, entity_map, ingest_dedupe).",
    ["table"],
)
PURGE_RUNS = Counter(
    "relay_ledger_purge_runs_total",
    "Background purges of the ledger by outcome (ok, failed); a replica that finds another purging counts none.",
    ["outcome"],
)
PURGE_LAST_SUCCESS = Gauge(
    "relay_ledger_purge_last_success_timestamp_seconds",
    "When this process last finished a purge of the ledger (Unix time; 0: not yet).",
)
