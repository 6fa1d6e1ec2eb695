"""The Weeek connection model (services/weeek/settings.py), alone and inside a whole config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.common import targets
from services.common.config import ConfigError, load_settings
from services.common.events import EventName
from services.sandbox.weeek import WeeekSandbox
from services.weeek.mapping import deal_body
from services.weeek.plugin import TARGET
from services.weeek.settings import ACTION_EVENTS, ACTIONS, WeeekConnection
from tests.weeek.support import BOOKED, CAME, NEW, TOKEN, accepted, booking, connection

SOURCE_TOKEN = "salon-token-0123456789abcdef"
DEFAULT_EVENTS = {
    EventName.CLIENT_CREATED: "contact",
    EventName.APPOINTMENT_CREATED: "deal",
    EventName.ONLINE_BOOKING: "deal",
    EventName.APPOINTMENT_CHANGED: "deal-change",
    EventName.VISIT_PAID: "deal-paid",
}


def minimal(**over: Any) -> dict[str, Any]:
    """The keys a connection cannot do without."""
    return {"target": "weeek", "name": "weeek", "token": TOKEN, "status_id": NEW, **over}


def refused(**over: Any) -> str:
    with pytest.raises(ValidationError) as e:
        WeeekConnection.model_validate(minimal(**over))
    return str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Defaults


def test_defaults() -> None:
    c = WeeekConnection.model_validate(minimal())
    assert c.events == DEFAULT_EVENTS
    assert c.enabled is True
    assert c.rate_limit_per_s is None
    assert c.base_url == "https://api.weeek.net/public/v1"
    assert c.token.get_secret_value() == TOKEN
    assert c.status_id == NEW
    assert c.status_map == {}
    assert c.lost_statuses == ("cancelled", "cancelled_by_sms", "missed")
    assert c.title == "{appointment.services} — {appointment.start:%d.%m.%Y %H:%M}"
    assert c.description == "Запись в Klientiks №{appointment.id}"
    assert c.assignee_from == "executor"
    assert c.users == {}
    assert c.subscription_counts_zero is False
    assert c.visit_id_field is None
    assert c.timeout_s == 15.0


def test_defaults_are_not_shared_between_connections() -> None:
    a = WeeekConnection.model_validate(minimal())
    b = WeeekConnection.model_validate(minimal(name="other"))
    assert a.events == b.events
    assert a.events is not b.events
    assert a.status_map is not b.status_map
    assert a.users is not b.users


def test_the_token_is_masked_and_the_model_frozen() -> None:
    c = connection()
    assert TOKEN not in repr(c)
    assert TOKEN not in str(c)
    assert TOKEN not in str(c.model_dump())
    with pytest.raises(ValidationError):
        c.status_id = BOOKED  # type: ignore[misc]


def test_the_default_events_take_the_actions_they_serve() -> None:
    assert set(ACTIONS) == set(ACTION_EVENTS)
    for event, action in DEFAULT_EVENTS.items():
        assert event in ACTION_EVENTS[action]
    assert EventName.INVOICE_CREATED not in DEFAULT_EVENTS  # only if the connection asks for it
    c = WeeekConnection.model_validate(minimal(events={"invoice-created": "deal-paid"}))
    assert c.events == {EventName.INVOICE_CREATED: "deal-paid"}


# ---------------------------------------------------------------------------------------------------------
# What is refused


@pytest.mark.parametrize("key", ["token", "status_id"])
def test_required_keys(key: str) -> None:
    data = minimal()
    del data[key]
    with pytest.raises(ValidationError) as e:
        WeeekConnection.model_validate(data)
    assert key in str(e.value)
    assert "Field required" in str(e.value)


@pytest.mark.parametrize(
    "over",
    [
        {"status_id": ""},
        {"status_id": "x" * 65},
        {"target": "maxma"},
        {"events": {}},
        {"events": {"client-created": "lead"}},  # another target's action
        {"events": {"client-booked": "contact"}},  # not a Klientiks event
        {"assignee_from": "admin"},
        {"timeout_s": 0},
        {"rate_limit_per_s": 0},
        {"subscription_counts_zero": "maybe"},
    ],
    ids=lambda over: next(iter(over)) + "=" + repr(next(iter(over.values())))[:20],
)
def test_bad_values_are_refused(over: dict[str, Any]) -> None:
    assert next(iter(over)) in refused(**over)


@pytest.mark.parametrize("key", ["funnel_id", "statusId", "status", "api_key", "lost_status", "user_map"])
def test_unknown_keys_are_refused(key: str) -> None:
    message = refused(**{key: "x"})
    assert key in message
    assert "Extra inputs are not permitted" in message


def test_an_action_that_cannot_serve_the_event_is_refused() -> None:
    message = refused(events={"client-created": "deal"})
    assert "client-created" in message


# ---------------------------------------------------------------------------------------------------------
# Templates


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{appointment.nope}", "unknown field {appointment.nope}"),
        ("Запись {client.idd}", "unknown field {client.idd}"),
        ("{client.id:%d}", "{client.id}: write a field as {path}"),  # a format only on a date-time
        ("{appointment.services!r}", "without a conversion"),
        ("Запись {", "malformed template"),
        ("Запись }", "malformed template"),
        ("{extra.a b}", "unknown field {extra.a b}"),
    ],
)
@pytest.mark.parametrize("key", ["title", "description"])
def test_template_errors_are_refused_with_the_problem(key: str, template: str, says: str) -> None:
    message = refused(**{key: template})
    assert key in message
    assert says in message


@pytest.mark.parametrize(
    "template",
    [
        "{appointment.services} — {appointment.start:%d.%m.%Y %H:%M}",
        "{appointment.start:%H:%M} {client.full_name}",
        "{appointment.created:%Y} {event.time:%d.%m}",
        "Визит {appointment.id} ({appointment.executor.name})",
        "{{{appointment.id}}}",  # literal braces
        "{extra.comment} {attribution.utm.utm_source}",
        "Без полей",
    ],
)
def test_good_templates_are_kept_as_written(template: str) -> None:
    c = WeeekConnection.model_validate(minimal(title=template, description=template))
    assert (c.title, c.description) == (template, template)


def test_no_description() -> None:
    assert WeeekConnection.model_validate(minimal(description=None)).description is None


# ---------------------------------------------------------------------------------------------------------
# Normalisation


def test_status_map_keys_are_stripped_and_casefolded_values_kept() -> None:
    c = WeeekConnection.model_validate(
        minimal(status_map={" Confirmed ": BOOKED, "FINISHED": CAME, "Пришёл": CAME})
    )
    assert c.status_map == {"confirmed": BOOKED, "finished": CAME, "пришёл": CAME}


def test_lost_statuses_are_stripped_and_casefolded() -> None:
    c = WeeekConnection.model_validate(minimal(lost_statuses=[" Cancelled", "MISSED ", "Отменён"]))
    assert c.lost_statuses == ("cancelled", "missed", "отменён")
    assert WeeekConnection.model_validate(minimal(lost_statuses=[])).lost_statuses == ()


def test_an_empty_status_in_status_map_is_refused() -> None:
    assert "status_map" in refused(status_map={"confirmed": ""})


def test_users_and_visit_id_field_are_kept() -> None:
    c = WeeekConnection.model_validate(
        minimal(users={"17": "u-1", "Ирина Мастер": "u-2"}, visit_id_field="cf-1", assignee_from="author")
    )
    assert c.users == {"17": "u-1", "Ирина Мастер": "u-2"}
    assert (c.visit_id_field, c.assignee_from) == ("cf-1", "author")


# ---------------------------------------------------------------------------------------------------------
# Inside a whole config


def _config(tmp_path: Path, *connections: dict[str, Any]) -> Path:
    source = {"name": "salon", "token": SOURCE_TOKEN, "connections": list(connections)}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


def _weeek(path: Path) -> list[WeeekConnection]:
    settings = load_settings(path, database_url="sqlite+aiosqlite:///:memory:")
    return [c for _, c in targets.connections(settings, targets.get("weeek"))]


def test_a_connection_in_a_config_takes_the_defaults(tmp_path: Path) -> None:
    [c] = _weeek(_config(tmp_path, {"target": "weeek", "token": TOKEN, "status_id": NEW}))
    assert c.name == "weeek"  # the target's name when unnamed
    assert c.events == DEFAULT_EVENTS
    assert c.title == WeeekConnection.model_fields["title"].default


def test_a_config_error_names_the_key_and_its_place(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        {"target": "weeek", "token": TOKEN, "status_id": NEW},
        {"target": "weeek", "name": "second", "token": TOKEN, "status_id": NEW, "title": "{appointment.x}",
         "statusid": "y"},
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        _weeek(path)
    text = "\n".join(e.value.problems)
    assert "sources[0].connections[1].title" in text
    assert "unknown field {appointment.x}" in text
    assert "sources[0].connections[1].statusid" in text
    assert "sources[0].connections[0]" not in text


def test_description_null_in_a_config_turns_the_description_off(tmp_path: Path) -> None:
    [c] = _weeek(
        _config(tmp_path, {"target": "weeek", "token": TOKEN, "status_id": NEW, "description": None})
    )
    assert c.description is None


def test_the_demo_connection_is_valid_and_names_the_sandbox_funnel() -> None:
    assert TARGET.demo is not None
    demo = TARGET.demo("http://127.0.0.1:8093", "${RELAY_TEST_WEEEK_KEY}")
    c = WeeekConnection.model_validate({**demo, "name": "weeek", "token": TOKEN})
    assert c.base_url == "http://127.0.0.1:8093/public/v1"
    assert c.status_id == NEW
    assert c.status_map == {"confirmed": BOOKED, "finished": CAME}
    # Its default templates make a deal body the sandbox accepts in that status.
    accepted(WeeekSandbox(), "POST", "/crm/statuses/{statusId}/deals", deal_body(booking(), c), statusId=NEW)
