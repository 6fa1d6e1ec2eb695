"""The published contract (docs/) is what the code generates, and real events satisfy it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import Normalized, normalize

DOCS = Path(__file__).resolve().parents[2] / "docs"
FILES = ["schemas/event-data.v1.json", "schemas/cloudevent.v1.json", "openapi.json", "asyncapi.yaml"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    result = CliRunner().invoke(app, ["docs", "--out", str(out)], env={"RELAY_CONFIG": ""})
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", FILES)
def test_committed_documents_are_what_the_code_generates(generated: Path, name: str) -> None:
    assert (DOCS / name).read_text(encoding="utf-8") == (generated / name).read_text(encoding="utf-8"), (
        f"docs/{name} is stale: run `relay docs`"
    )


def test_a_normalized_event_satisfies_the_published_schema() -> None:
    record = InboxRecord(
        id="e1", source="salon", event="appointment-created", received_at=datetime.now(UTC), method="GET",
        query="client_id=7&client_phone=79161234567&client_name=%D0%90%D0%BD%D0%BD%D0%B0&appointment_id=9"
        "&appointment_date=2026-11-21&appointment.time=14:30&appointment_total_cost=2500.00"
        "&services=%D0%A1%D1%82%D1%80%D0%B8%D0%B6%D0%BA%D0%B0&utm_source=vk&client_email={{email}}",
    )  # fmt: skip
    result = normalize(record, zone=ZoneInfo("Europe/Moscow"), phone_region="RU")
    assert isinstance(result, Normalized)
    schema = json.loads((DOCS / "schemas" / "event-data.v1.json").read_text())
    data = json.loads(result.event.kafka_value())
    jsonschema.validate(data, schema)
    assert data["appointment"]["total_cost"] == "2500.00"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "schema_version": 2}, schema)


def test_the_openapi_document_describes_both_webhook_methods() -> None:
    doc = json.loads((DOCS / "openapi.json").read_text())
    ops = doc["paths"]["/hooks/klientiks/{token}/{event}"]
    assert set(ops) == {"get", "post"}
    assert {"202", "404"} <= set(ops["get"]["responses"])
