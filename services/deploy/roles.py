"""Every long-running role the deploy files run, from the target registry: one table for all of them."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import targets
from services.common.kafka import EVENTS, INBOX, QUARANTINE, dlq_topic

IMAGE = "ghcr.io/klientiks/klientiks-relay"
METRICS_PATH = "/metrics/"  # the ASGI mount answers /metrics with a redirect


@dataclass(frozen=True)
class Role:
    """One process kind: its name (Deployment, Service, compose service), `relay` arguments and HTTP port."""

    name: str
    args: tuple[str, ...]
    port: int
    group: str | None  # its Kafka consumer group, if it consumes
    topic: str | None  # the topic it consumes (its lag scales a delivery service)
    target: str | None = None  # the vendor a delivery service calls
    kind: str = "delivery"  # "ingest-api", "normalizer" or "delivery"


def roles() -> list[Role]:
    """The ingest API, the normalizer, then one delivery service per registered target."""
    out = [
        Role("ingest-api", ("ingest", "api"), 8080, None, None, kind="ingest-api"),
        Role("normalizer", ("ingest", "normalizer"), 8081, "relay-normalizer", INBOX, kind="normalizer"),
    ]
    for name in targets.names():
        spec = targets.get(name)
        out.append(Role(name, (name,), spec.port, f"relay-{name}", EVENTS, target=name))
    return out


def sandboxes() -> list[tuple[str, int]]:
    """(target, port) of every target's sandbox, and the Klientiks API's, for compose's flow without vendors."""
    out = [(n, p) for n in targets.names() if (p := targets.get(n).sandbox_port) is not None]
    return [*out, ("klientiks", 8091)]


def topics() -> list[str]:
    """Every topic the relay uses: inbox, events, quarantine, one dead-letter topic per target."""
    return [INBOX, EVENTS, QUARANTINE, *(dlq_topic(n) for n in targets.names())]
