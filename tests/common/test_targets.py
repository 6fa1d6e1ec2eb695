"""The target registry (issue 9): a target registered only in this test is assembled, delivers on Tansu and
SQLite, and its connections are checked by `relay config check` with its own model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from services.cli import app
from services.common import targets
from services.common.config import KafkaSettings, SourceConfig, add_target_name, load_settings
from services.common.delivery.steps import Steps
from services.common.events import CloudEvent, EventName
from services.common.outcome import Outcome
from tests.support import FAST_DELIVERY, client_event, eventually, publish_events, serve_app

TOKEN = "registry-token-0123456789"


class ProbeConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["probe"]
    name: str
    enabled: bool = True
    events: dict[EventName, Literal["record"]] = Field(min_length=1)
    rate_limit_per_s: float | None = None
    base_url: str = "https://probe.example"
    api_key: str


delivered: list[tuple[str, str, str, str]] = []


def _deliverer(
    source: SourceConfig, conn: ProbeConnection, transport: httpx.AsyncBaseTransport
) -> targets.Deliver:
    async def deliver(action: str, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        delivered.append((source.name, conn.api_key, action, event.id))
        return Outcome.success()

    return deliver


PROBE = targets.TargetSpec(
    name="probe", title="Probe", connection=ProbeConnection, deliverer=_deliverer, port=8099
)


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    targets.register(PROBE)
    monkeypatch.setenv("REGISTRY_TOKEN", TOKEN)
    yield
    targets.unregister(PROBE.name)  # later tests (the deploy files) see the product's targets only


def _config(tmp_path: Path, connection: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "sources:\n  - name: salon\n    token: ${REGISTRY_TOKEN}\n    connections:\n" + connection
    )
    return path


PROBE_CONNECTION = (
    "      - target: probe\n        api_key: k-1\n        events:\n          client-created: record\n"
)


def test_the_registry_lists_the_product_targets_first() -> None:
    assert targets.names()[0] == "maxma"
    assert "probe" in targets.names()
    assert targets.get("maxma").connection.__name__ == "MaxmaConnection"
    with pytest.raises(KeyError, match="no delivery target 'nope'"):
        targets.get("nope")


async def test_a_target_registered_in_a_test_is_assembled_and_delivers(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    delivered.clear()
    settings = load_settings(
        _config(tmp_path, PROBE_CONNECTION), kafka=kafka.model_dump(),
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}", delivery=FAST_DELIVERY,
    )  # fmt: skip
    async with serve_app(targets.create_delivery_app("probe", settings, migrate=True)) as url:
        await publish_events(
            kafka.bootstrap_servers, client_event("e1", "1", None), client_event("e2", "2", None)
        )
        await eventually(lambda: len(delivered) == 2, what="both events delivered by the probe")
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/readyz")).status_code == 200
    assert sorted(delivered) == [("salon", "k-1", "record", "e1"), ("salon", "k-1", "record", "e2")]


def test_config_check_types_each_connection_with_its_targets_model(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app, ["config", "check"], env={"RELAY_CONFIG": str(_config(tmp_path, PROBE_CONNECTION))}
    )
    assert ok.exit_code == 0, ok.output
    typo = PROBE_CONNECTION + "        api_kee: k-2\n"
    bad = runner.invoke(
        app, ["config", "check"], env={"RELAY_CONFIG": str(_config(tmp_path, typo)), "COLUMNS": "300"}
    )
    assert bad.exit_code == 2
    assert "sources[0].connections[0].api_kee" in bad.output
    assert "api_key" in bad.output  # the keys a probe connection takes are named


def test_config_check_refuses_a_connection_to_a_target_with_no_service(tmp_path: Path) -> None:
    # A name a plugin made valid config without registering its service (every product target has one).
    add_target_name("future")
    future = "      - target: future\n        events:\n          client-created: lead\n"
    result = CliRunner().invoke(
        app, ["config", "check"], env={"RELAY_CONFIG": str(_config(tmp_path, future)), "COLUMNS": "300"}
    )
    assert result.exit_code == 2
    assert "'future' has no delivery service yet" in result.output
