"""The Plarin connection model (services/plarin/settings.py), alone and inside a whole config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.common import targets
from services.common.config import ConfigError, load_settings, target_connections
from services.common.events import EventName
from services.plarin.app import create_app
from services.plarin.plugin import TARGET
from services.plarin.settings import MACROS, PlarinConnection, macros_of
from services.sandbox import plarin as sandbox_plarin
from tests.plarin.support import BASE, FULL, TOKEN

SOURCE_TOKEN = "salon-token-0123456789abcdef"
DEFAULT_EVENTS = {EventName.VISIT_PAID: "conversion"}


def minimal(**over: Any) -> dict[str, Any]:
    """The keys a connection cannot do without."""
    return {"target": "plarin", "name": "plarin", "postback_url": BASE + "?click_id={click_id}", **over}


def accepted(**over: Any) -> PlarinConnection:
    return PlarinConnection.model_validate(minimal(**over))


def refused(**over: Any) -> str:
    with pytest.raises(ValidationError) as e:
        PlarinConnection.model_validate(minimal(**over))
    return str(e.value)


def test_defaults() -> None:
    c = accepted()
    assert c.events == DEFAULT_EVENTS
    assert c.click_id_params == ("yclid", "gclid", "click_id", "utm_content")
    assert c.event_names == {}
    assert c.currency == "RUB"
    assert c.timeout_s == 15.0
    assert c.enabled is True
    assert c.rate_limit_per_s is None


def test_defaults_are_not_shared_between_connections() -> None:
    a, b = accepted(), accepted(name="b")
    assert a.events is not b.events
    assert a.event_names is not b.event_names


def test_the_model_is_frozen_and_strict() -> None:
    c = accepted()
    with pytest.raises(ValidationError):
        c.currency = "USD"  # type: ignore[misc]
    message = refused(postback_template=FULL)
    assert "postback_template" in message
    assert "Extra inputs are not permitted" in message


def test_the_postback_url_is_required() -> None:
    data = minimal()
    del data["postback_url"]
    with pytest.raises(ValidationError, match="postback_url"):
        PlarinConnection.model_validate(data)


# ---------------------------------------------------------------------------------------------------------
# The postback URL template


def test_the_relay_and_the_sandbox_agree_on_the_macros() -> None:
    assert MACROS == ("click_id", "event", "value", "currency", "event_id", "client_id", "ts")
    assert sandbox_plarin.MACROS == MACROS


@pytest.mark.parametrize("macro", MACROS)
def test_every_macro_is_accepted(macro: str) -> None:
    for template in (
        f"{BASE}?p={{{macro}}}",
        f"{BASE}/{{{macro}}}",
        f"{BASE}?click_id={{click_id}}&m={{{macro}}}",
    ):
        assert accepted(postback_url=template).postback_url == template


def test_all_macros_at_once_in_order() -> None:
    assert accepted(postback_url=FULL).postback_url == FULL
    assert macros_of(FULL) == list(MACROS)
    assert macros_of(BASE + "?a={ts}&b={ts}&c={{x}}") == ["ts", "ts"]


@pytest.mark.parametrize(
    "template",
    [
        BASE + "?click_id={click_id}&src={{klientiks}}",  # literal braces, written doubled
        BASE + "?click_id={click_id}&sub=%D0%B0%20b",  # already percent-encoded literal text
        "http://127.0.0.1:8094/postback/acc-1?click_id={click_id}",
        "HTTPS://Plarin.Example/pb?click_id={click_id}",
    ],
)
def test_other_valid_templates(template: str) -> None:
    assert accepted(postback_url=template).postback_url == template


@pytest.mark.parametrize(
    ("macro", "template"),
    [
        ("{foo}", BASE + "?click_id={click_id}&x={foo}"),
        ("{clickid}", BASE + "?click_id={clickid}"),
        ("{CLICK_ID}", BASE + "?click_id={CLICK_ID}"),
        ("{}", BASE + "?click_id={}"),
        ("{0}", BASE + "?click_id={0}"),
        ("{click_id.x}", BASE + "?click_id={click_id.x}"),
        ("{client.id}", BASE + "?client_id={client.id}"),
        ("{click_id[0]}", BASE + "?click_id={click_id[0]}"),
        ("{utm_source}", BASE + "?click_id={click_id}&utm={utm_source}"),
    ],
)
def test_an_unknown_macro_is_refused_and_named(macro: str, template: str) -> None:
    message = refused(postback_url=template)
    assert "postback_url" in message
    assert f"unknown macro {macro} in the postback URL" in message
    assert "{click_id}, {event}, {value}, {currency}, {event_id}, {client_id}, {ts}" in message  # the fix


@pytest.mark.parametrize(
    "template",
    [BASE + "?click_id={click_id", BASE + "?click_id=}", BASE + "?click_id={click_id}}", BASE + "?a={"],
)
def test_malformed_braces_are_refused(template: str) -> None:
    message = refused(postback_url=template)
    assert "the postback URL is malformed" in message
    assert "write literal braces as {{ and }}" in message


@pytest.mark.parametrize(
    "template",
    [
        BASE + "?click_id={click_id!r}",
        BASE + "?click_id={click_id!s}",
        BASE + "?click_id={click_id:>20}",
        BASE + "?value={value:.2f}",
    ],
)
def test_a_conversion_or_format_spec_is_refused(template: str) -> None:
    assert "write a macro as {name}, without a conversion or format" in refused(postback_url=template)


@pytest.mark.parametrize(
    "template",
    [
        "ftp://plarin.example/pb?c={click_id}",
        "file:///etc/passwd?c={click_id}",
        "javascript:alert({click_id})",
        "plarin.example/pb?c={click_id}",
        "//plarin.example/pb?c={click_id}",
        "https:///pb?c={click_id}",
        "{click_id}",
        "",
    ],
)
def test_a_non_http_url_is_refused(template: str) -> None:
    assert "the postback URL must be an http(s) URL from the Plarin cabinet" in refused(postback_url=template)


@pytest.mark.parametrize(
    "template",
    [
        BASE + "?click_id={click_id} ",
        " " + BASE + "?click_id={click_id}",
        BASE + "?click_id= {click_id}",
        BASE + "?click_id={click_id}\n",
        BASE + "?click_id={click_id}\t&x=1",
        BASE + "?click_id={click_id}&x=a\u00a0b",  # a no-break space
        BASE + "?click_id={click_id}&x=a\u2003b",
    ],
)
def test_whitespace_is_refused(template: str) -> None:
    assert "the postback URL has whitespace in it" in refused(postback_url=template)


# ---------------------------------------------------------------------------------------------------------
# The other keys


@pytest.mark.parametrize("currency", ["RUB", "USD", "EUR", "KZT"])
def test_currency_codes(currency: str) -> None:
    assert accepted(currency=currency).currency == currency


@pytest.mark.parametrize(
    "currency", ["rub", "Rub", "RU", "RUBL", "", " RUB", "RUB ", "RUB\n", "РУБ", "R1B", "₽"]
)
def test_a_bad_currency_is_refused(currency: str) -> None:
    assert "currency" in refused(currency=currency)


def test_events_can_be_chosen() -> None:
    c = accepted(events={"visit-paid": "conversion", "invoice-created": "conversion"})
    assert c.events == {EventName.VISIT_PAID: "conversion", EventName.INVOICE_CREATED: "conversion"}
    assert "events" in refused(events={"visit-paid": "lead"})  # the one action is "conversion"
    assert "events" in refused(events={"visit-payed": "conversion"})  # no such Klientiks event
    assert "events" in refused(events={})


def test_click_id_params_and_event_names() -> None:
    c = accepted(click_id_params=["fbclid", "sub1"], event_names={"visit-paid": "Оплата визита"})
    assert c.click_id_params == ("fbclid", "sub1")
    assert c.event_names == {EventName.VISIT_PAID: "Оплата визита"}
    assert "click_id_params" in refused(click_id_params=[])
    assert "event_names" in refused(event_names={"visit-payed": "conversion"})


def test_an_empty_event_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="event_names"):
        accepted(postback_url=FULL, event_names={"visit-paid": ""})


def test_timeout_and_rate_limit_are_positive() -> None:
    assert "timeout_s" in refused(timeout_s=0)
    assert "rate_limit_per_s" in refused(rate_limit_per_s=0)
    c = accepted(timeout_s=5, rate_limit_per_s=2.5)
    assert (c.timeout_s, c.rate_limit_per_s) == (5.0, 2.5)


# ---------------------------------------------------------------------------------------------------------
# Inside a whole config: the registry types the connection, `config check` reports its problems


def write(tmp_path: Path, *conns: dict[str, Any]) -> Path:
    path = tmp_path / "relay.yaml"
    source = {"name": "salon", "token": SOURCE_TOKEN, "connections": list(conns)}
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


def conn_yaml(**over: Any) -> dict[str, Any]:
    data = minimal(**over)
    data.pop("name")  # the config may leave it out: it defaults to the target's name
    return data


def test_the_registry_knows_the_target() -> None:
    spec = targets.get("plarin")
    assert spec is TARGET
    assert spec.connection is PlarinConnection
    assert spec.title == "Plarin"
    assert spec.url_key == "postback_url"
    assert spec.demo is not None
    demo = PlarinConnection.model_validate({"name": "plarin", **spec.demo("http://127.0.0.1:8094", TOKEN)})
    assert demo.postback_url.startswith(f"http://127.0.0.1:8094/postback?token={TOKEN}&click_id={{click_id}}")
    assert set(macros_of(demo.postback_url)) <= set(MACROS)
    assert demo.events == DEFAULT_EVENTS


def test_a_connection_in_a_config_gets_the_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml(postback_url=FULL)))
    assert settings.sources[0].connections[0].events is None  # unset in the file
    assert targets.check(settings) == []
    [(source, conn)] = list(target_connections(settings, "plarin", PlarinConnection))
    assert source.name == "salon"
    assert conn.name == "plarin"
    assert conn.events == DEFAULT_EVENTS
    assert conn.postback_url == FULL  # the YAML round trip keeps the braces


def test_an_unknown_macro_in_a_config_names_its_path_and_the_macro(tmp_path: Path) -> None:
    path = write(tmp_path, conn_yaml(postback_url=BASE + "?click_id={click_id}&sub={sub1}"))
    settings = load_settings(path)  # the file itself is valid: the target's model is checked by the registry
    [problem] = targets.check(settings)
    assert problem.startswith(
        "sources[0].connections[0].postback_url: unknown macro {sub1} in the postback URL"
    )
    assert "{click_id}" in problem  # the fix lists the macros
    with pytest.raises(ConfigError) as e:
        list(target_connections(settings, "plarin", PlarinConnection))
    assert e.value.problems == [problem]
    assert e.value.file == str(path)
    # The service refuses to start with it.
    with pytest.raises(ConfigError) as started:
        create_app(settings)
    assert started.value.problems == [problem]


def test_the_path_names_the_bad_connection_among_several(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            {**conn_yaml(), "name": "plarin-a"},
            {**conn_yaml(postback_url=BASE + "?click_id={click_id}&v={value:.2f}"), "name": "plarin-b"},
            {**conn_yaml(postback_url=BASE + "?click_id={yclid}"), "name": "plarin-c"},
        )
    )
    problems = targets.check(settings)
    assert len(problems) == 2
    assert problems[0].startswith("sources[0].connections[1].postback_url: write a macro as {name}")
    assert problems[1].startswith("sources[0].connections[2].postback_url: unknown macro {yclid}")


def test_config_check_lists_every_problem_of_a_connection(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, conn_yaml(postback_url="ftp://x/{click_id}", currency="rub", click_ids=["x"]))
    )
    problems = targets.check(settings)
    assert len(problems) == 3
    assert any(p.startswith("sources[0].connections[0].postback_url:") for p in problems)
    assert any(p.startswith("sources[0].connections[0].currency:") for p in problems)
    [extra] = [p for p in problems if p.startswith("sources[0].connections[0].click_ids:")]
    assert "click_id_params" in extra  # the fix lists the keys a connection takes


def test_a_disabled_connection_is_not_checked(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, conn_yaml(postback_url=BASE + "?c={nope}", enabled=False)))
    assert targets.check(settings) == []
    assert list(targets.connections(settings, TARGET)) == []
