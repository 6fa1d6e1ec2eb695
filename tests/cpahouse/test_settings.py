"""The CPA.House connection model (services/cpahouse/settings.py), alone and inside a whole config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.common import targets
from services.common.config import ConfigError, load_settings, target_connections
from services.common.events import EventName
from services.cpahouse.mapping import lead_form
from services.cpahouse.plugin import TARGET
from services.cpahouse.settings import CpaHouseConnection
from services.sandbox.cpahouse import validate_order
from tests.cpahouse.support import KEY, client, connection, event

TOKEN = "salon-token-0123456789abcdef"
DEFAULT_EVENTS = {EventName.CLIENT_CREATED: "lead", EventName.ONLINE_BOOKING: "lead"}


def minimal(**over: Any) -> dict[str, Any]:
    """The keys a connection cannot do without."""
    return {"target": "cpahouse", "name": "cpa", "api_key": KEY, "webmaster_id": "1001", "offer_id": "501",
            "source_id": "11", "stream_id": "21", **over}  # fmt: skip


def refused(**over: Any) -> str:
    with pytest.raises(ValidationError) as e:
        CpaHouseConnection.model_validate(minimal(**over))
    return str(e.value)


def test_defaults() -> None:
    c = CpaHouseConnection.model_validate(minimal())
    assert c.events == DEFAULT_EVENTS
    assert c.sub_ids == {"sub_id_1": "{client.id}"}
    assert c.base_url == "https://api.cpa.house"
    assert c.timeout_s == 30.0
    assert c.enabled is True
    assert (c.user_agent, c.ip_address, c.rate_limit_per_s) == (None, None, None)
    assert c.api_key.get_secret_value() == KEY


def test_defaults_are_not_shared_between_connections() -> None:
    a, b = CpaHouseConnection.model_validate(minimal()), CpaHouseConnection.model_validate(minimal(name="b"))
    assert a.events is not b.events
    assert a.sub_ids is not b.sub_ids


def test_the_api_key_is_masked_and_the_model_frozen() -> None:
    c = connection()
    assert KEY not in repr(c)
    assert KEY not in str(c.model_dump())
    with pytest.raises(ValidationError):
        c.offer_id = "502"  # type: ignore[misc]


def test_events_can_be_chosen() -> None:
    c = CpaHouseConnection.model_validate(minimal(events={"visit-paid": "lead"}))
    assert c.events == {EventName.VISIT_PAID: "lead"}
    assert "events" in refused(events={"client-created": "new-client"})  # the one action is "lead"
    assert "events" in refused(events={"client-deleted": "lead"})  # no such Klientiks event
    assert "events" in refused(events={})


@pytest.mark.parametrize("key", ["webmaster_id", "offer_id", "source_id", "stream_id"])
@pytest.mark.parametrize("value", ["abc", "0", "012", "-1", "1.5", "", " 1", "1 ", "١٢٣", "1" * 19, "1e3"])
def test_ids_must_be_digits(key: str, value: str) -> None:
    assert key in refused(**{key: value})


@pytest.mark.parametrize("key", ["webmaster_id", "offer_id", "source_id", "stream_id"])
def test_ids_as_the_api_takes_them(key: str) -> None:
    for value in ("1", "42", "9" * 18):  # at most 18 digits, as the sandbox takes them
        assert getattr(CpaHouseConnection.model_validate(minimal(**{key: value})), key) == value


@pytest.mark.parametrize(
    ("given", "kept"),
    [("203.0.113.10", "203.0.113.10"), (" 203.0.113.10 ", "203.0.113.10"), ("2001:DB8::0:1", "2001:db8::1")],
)
def test_ip_address_is_kept_in_its_normal_form(given: str, kept: str) -> None:
    assert CpaHouseConnection.model_validate(minimal(ip_address=given)).ip_address == kept


@pytest.mark.parametrize("ip", ["999.1.1.1", "localhost", "203.0.113.10/24", "203.0.113", "", "1.2.3.4:80"])
def test_a_bad_ip_address_is_refused(ip: str) -> None:
    message = refused(ip_address=ip)
    assert "ip_address" in message
    assert "is not an IP address" in message


@pytest.mark.parametrize("ua", [" Mozilla/5.0", "Mozilla/5.0 ", "Mozilla\n5.0", "Mozilla\x00", "", "x" * 513])
def test_a_bad_user_agent_is_refused(ua: str) -> None:
    assert "user_agent" in refused(user_agent=ua)


def test_sub_id_templates() -> None:
    sub_ids = {"sub_id_1": "klientiks-{client.id}", "sub_id_4": "{attribution.utm.utm_source}"}
    assert CpaHouseConnection.model_validate(minimal(sub_ids=sub_ids)).sub_ids == sub_ids
    assert CpaHouseConnection.model_validate(minimal(sub_ids={})).sub_ids == {}


@pytest.mark.parametrize(
    "template", ["{client.nope}", "{appointment.lines}", "{client.id!r}", "{client.id:>5}", "{client.id"]
)
def test_a_bad_template_is_refused_naming_its_sub_id(template: str) -> None:
    message = refused(sub_ids={"sub_id_1": "{client.id}", "sub_id_2": template})
    assert "sub_ids" in message
    assert "sub_id_2:" in message
    assert "sub_id_1:" not in message


def test_only_four_sub_ids() -> None:
    assert "sub_id_5" in refused(sub_ids={"sub_id_5": "{client.id}"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("country_code", "RU"),
        ("county_code", "RU"),
        ("api-key", KEY),
        ("sub_id_1", "{client.id}"),
        ("id_offer", "1"),
    ],
)
def test_an_unknown_key_is_refused(key: str, value: str) -> None:
    message = refused(**{key: value})
    assert key in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize("key", ["api_key", "webmaster_id", "offer_id", "source_id", "stream_id"])
def test_required_keys(key: str) -> None:
    data = minimal()
    del data[key]
    with pytest.raises(ValidationError, match=key):
        CpaHouseConnection.model_validate(data)


def test_timeout_and_rate_limit_are_positive() -> None:
    assert "timeout_s" in refused(timeout_s=0)
    assert "rate_limit_per_s" in refused(rate_limit_per_s=0)
    assert CpaHouseConnection.model_validate(minimal(timeout_s=5, rate_limit_per_s=2.5)).timeout_s == 5.0


# ---------------------------------------------------------------------------------------------------------
# Inside a whole config: the registry types the connection, `config check` reports its problems


def write(tmp_path: Path, *conns: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    source = {"name": "salon", "token": TOKEN, "connections": list(conns)}
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


def conn_yaml(**over: Any) -> dict[str, Any]:
    data = minimal(**over)
    data.pop("name")  # the config may leave it out: it defaults to the target's name
    return {k: v for k, v in data.items() if v is not None}


def test_the_registry_knows_the_target() -> None:
    spec = targets.get("cpahouse")
    assert spec is TARGET
    assert spec.connection is CpaHouseConnection
    assert spec.title == "CPA.House"
    assert spec.demo is not None
    demo = CpaHouseConnection.model_validate({"name": "cpahouse", **spec.demo("http://127.0.0.1:8092", KEY)})
    assert demo.base_url == "http://127.0.0.1:8092"


def test_a_connection_without_events_gets_the_default_events(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml()))
    assert settings.sources[0].connections[0].events is None  # unset in the file, not an empty mapping
    assert targets.check(settings) == []
    [(source, conn)] = list(target_connections(settings, "cpahouse", CpaHouseConnection))
    assert source.name == "salon"
    assert conn.name == "cpahouse"
    assert conn.events == DEFAULT_EVENTS
    assert conn.sub_ids == {"sub_id_1": "{client.id}"}


def test_a_connections_own_events_are_kept(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml(events={"visit-paid": "lead"})))
    assert targets.check(settings) == []
    [(_, conn)] = list(targets.connections(settings, TARGET))
    assert conn.events == {EventName.VISIT_PAID: "lead"}


def test_two_offers_are_two_connections(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, {**conn_yaml(), "name": "cpa-501"}, {**conn_yaml(offer_id="502"), "name": "cpa-502"})
    )
    assert targets.check(settings) == []
    conns = [c for _, c in targets.connections(settings, TARGET)]
    assert [(c.name, c.offer_id) for c in conns] == [("cpa-501", "501"), ("cpa-502", "502")]


def test_config_check_names_the_path_of_a_bad_template(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml(sub_ids={"sub_id_2": "{client.nope}"})))
    [problem] = targets.check(settings)
    assert problem.startswith("sources[0].connections[0].sub_ids: sub_id_2: unknown field {client.nope}")
    with pytest.raises(ConfigError) as e:
        list(target_connections(settings, "cpahouse", CpaHouseConnection))
    assert e.value.problems == [problem]


def test_config_check_lists_every_problem_with_a_fix(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml(offer_id="abc", ip_address="nope", country_code="RU")))
    problems = targets.check(settings)
    assert len(problems) == 3
    assert any(p.startswith("sources[0].connections[0].offer_id:") for p in problems)
    assert any(p.startswith("sources[0].connections[0].ip_address:") for p in problems)
    [extra] = [p for p in problems if p.startswith("sources[0].connections[0].country_code:")]
    assert "webmaster_id" in extra  # the fix lists the keys a connection takes


def test_a_disabled_connection_is_not_checked(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml(offer_id="abc", enabled=False)))
    assert targets.check(settings) == []
    assert list(targets.connections(settings, TARGET)) == []


def test_a_scoped_ipv6_address_is_refused_or_sent_as_the_api_takes_it() -> None:
    # ipaddress.ip_address accepts "fe80::1%eth0" (Python >= 3.9); a zone means nothing to a remote server.
    try:
        conn = CpaHouseConnection.model_validate(minimal(ip_address="fe80::1%eth0", user_agent="Mozilla/5.0"))
    except ValidationError:
        return
    validate_order(list(lead_form(event(client()), conn).items()), {KEY: "1001"})
