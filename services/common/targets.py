"""The target registry and the one assembly every delivery service shares.

A target is a folder under ``services/`` with its connection model (``settings.py``), pure mapping
(``mapping.py``), vendor client (``client.py``) and a ``plugin.py`` that declares one :class:`TargetSpec`;
plus one line in ``ENTRIES`` below. Everything else loops over the registry: :func:`create_delivery_app`
(the service), which connections subscribe to an event (:class:`ConnectedTarget`), the CLI's role commands,
``relay run``, ``relay config check`` and the test and bench helpers.

Services never import each other, so the registry names each plugin by module path and imports it when
asked; a test registers a :class:`TargetSpec` of its own with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel

from services.common.config import ConfigError, Settings, SourceConfig, add_target_name, target_connections
from services.common.events import EVENT_BY_CE_TYPE, CloudEvent
from services.common.outcome import Outcome

if TYPE_CHECKING:
    from fastapi import FastAPI

    from services.common.delivery.runtime import Job
    from services.common.delivery.steps import Steps

# The CLI reads the registry in every process: the runtime, FastAPI and the ledger are imported only by
# the assembly and the target, in the delivery service that uses them.

# name -> the module whose ``TARGET`` is its spec. One line per target.
ENTRIES: dict[str, str] = {
    "maxma": "services.maxma.plugin",
    "cpahouse": "services.cpahouse.plugin",
    "weeek": "services.weeek.plugin",
    "plarin": "services.plarin.plugin",
}

# What a connection's deliverer does: one action for one event, sent once in effect under the key; a
# multi-step action resumes at its first unfinished step (``Steps``).
Deliver = Callable[[str, CloudEvent, str, "Steps"], Awaitable[Outcome]]


@dataclass(frozen=True)
class TargetSpec:
    """Everything the shared assembly, ``relay run`` and ``config check`` need of one target."""

    name: str
    title: str  # as people write it: "Maxma", "CPA.House"
    # The connection as written under a source's ``connections:`` (``extra="forbid"``: a typo is an error).
    connection: type[BaseModel]
    # The deliverer of one connection, given the transport the service shares.
    deliverer: Callable[[SourceConfig, Any, httpx.AsyncBaseTransport], Deliver]
    port: int  # the delivery service's HTTP port in `relay run`
    # `relay sandbox <name>` exists: its port, and the option and secret file of its credentials.
    sandbox_port: int | None = None
    sandbox_secret: tuple[str, str] | None = None  # e.g. ("--key-file", "maxma-key")
    # The connection's key naming the vendor's URL (a sandbox is started for it when it points there).
    url_key: str = "base_url"
    # The demo config's connection to the sandbox: (sandbox URL, reference to its secret) -> the mapping.
    demo: Callable[[str, str], dict[str, Any]] | None = None
    # A module whose ``app`` (a Typer app) adds operator commands under ``relay <name>`` (`relay weeek funnels`).
    commands: str | None = None


_specs: dict[str, TargetSpec] = {}


def register(spec: TargetSpec) -> None:
    """Add a target (a test's, or one outside ``ENTRIES``); its connections become valid config."""
    _specs[spec.name] = spec
    add_target_name(spec.name)


def unregister(name: str) -> None:
    """Forget a target :func:`register` added (a test's); the product's targets stay."""
    if name not in ENTRIES:
        _specs.pop(name, None)


def names() -> list[str]:
    """Every registered target, those of ``ENTRIES`` first."""
    return [*ENTRIES, *(n for n in _specs if n not in ENTRIES)]


def get(name: str) -> TargetSpec:
    """The spec of ``name``; KeyError if no target of that name is registered."""
    if name not in _specs:
        if name not in ENTRIES:
            raise KeyError(f"no delivery target {name!r}; registered: {', '.join(names())}")
        spec = importlib.import_module(ENTRIES[name]).TARGET
        if not isinstance(spec, TargetSpec) or spec.name != name:
            raise TypeError(f"{ENTRIES[name]}.TARGET is not the TargetSpec of {name!r}")
        _specs[name] = spec
    return _specs[name]


def connections(settings: Settings, spec: TargetSpec) -> Iterator[tuple[SourceConfig, Any]]:
    """Every enabled connection to ``spec``'s target, typed by its model; raise ConfigError."""
    return target_connections(settings, spec.name, spec.connection)


def check(settings: Settings) -> list[str]:
    """Problems of every connection: its target's model, or a target with no delivery service."""
    problems: list[str] = []
    for si, source in enumerate(settings.sources):
        for ci, conn in enumerate(source.connections):
            if conn.enabled and conn.target not in names():
                problems.append(
                    f"sources[{si}].connections[{ci}].target: {conn.target!r} has no delivery service yet; "
                    f"fix: use one of {', '.join(names())}, or set enabled: false"
                )
    for name in names():
        try:
            list(connections(settings, get(name)))
        except ConfigError as e:
            problems.extend(e.problems)
    return problems


@dataclass(frozen=True)
class Route:
    """One connection of one source, with its deliverer."""

    source: SourceConfig
    connection: Any
    deliver: Deliver


class ConnectedTarget:
    """A target as the runtime sees it: which connections an event needs, and their deliverers."""

    def __init__(self, name: str, routes: list[Route]) -> None:
        from services.common.delivery.runtime import Job

        self._job = Job
        self.name = name
        self._routes: dict[str, list[Route]] = {}
        for r in routes:
            self._routes.setdefault(r.source.name, []).append(r)

    def jobs(self, event: CloudEvent) -> list[Job]:
        webhook = EVENT_BY_CE_TYPE.get(event.type)
        if webhook is None:
            return []  # a type from a newer contract: no connection can subscribe to it yet
        jobs = []
        for route in self._routes.get(event.source_name, []):
            conn = route.connection
            action = conn.events.get(webhook)
            if action is not None:
                jobs.append(self._job(route.source.name, conn.name, action, route, conn.rate_limit_per_s))
        return jobs

    async def deliver(self, job: Job, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        route: Route = job.route
        return await route.deliver(job.action, event, idempotency_key, steps)


def create_delivery_app(name: str, settings: Settings, *, migrate: bool = False) -> FastAPI:
    """Assemble ``name``'s delivery service; validates its connections now, connects nothing until started."""
    from services.common.delivery.runtime import DeliveryRuntime
    from services.common.http import runtime_app
    from services.common.httpclient import make_transport
    from services.common.ledger import Ledger

    spec = get(name)
    found = list(connections(settings, spec))
    ledger = Ledger.from_url(settings.database_url)
    transport = make_transport(settings.delivery.max_in_flight)
    routes = [Route(source, conn, spec.deliverer(source, conn, transport)) for source, conn in found]
    runtime = DeliveryRuntime(ConnectedTarget(spec.name, routes), settings, ledger)
    return runtime_app(
        runtime, ledger, title=f"klientiks-relay {spec.name}", migrate=migrate, closing=[transport.aclose]
    )
