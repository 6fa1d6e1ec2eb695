"""The Maxma connection model: which events each action takes, the shop an order needs, confirm_on."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common.events import EventName
from services.maxma.settings import MaxmaConnection

BASE: dict[str, Any] = {"target": "maxma", "name": "maxma", "processing_key": "k" * 20}


def conn(**kw: Any) -> MaxmaConnection:
    return MaxmaConnection.model_validate({**BASE, **kw})


def test_a_full_connection() -> None:
    c = conn(
        events={"client-created": "new-client", "visit-paid": "set-order", "invoice-created": "set-order",
                "appointment-changed": "cancel-order"},
        shop_code="main", shop_name="Салон", cancel_statuses=[" Cancelled ", "missed"],
    )  # fmt: skip
    assert c.confirm_on is EventName.VISIT_PAID
    assert c.cancel_statuses == ("cancelled", "missed")


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ({"client-created": "set-order"}, "set-order takes only invoice-created, visit-paid"),
        ({"visit-paid": "cancel-order"}, "cancel-order takes only appointment-changed"),
        ({"visit-paid": "confirm-order"}, "literal_error"),
    ],
)
def test_an_action_on_an_event_it_cannot_serve_is_refused(events: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        conn(events=events, shop_code="main", shop_name="M")
    assert message in str(e.value) or message in {err["type"] for err in e.value.errors()}


def test_an_order_needs_the_shop() -> None:
    with pytest.raises(ValidationError, match="shop_code and shop_name"):
        conn(events={"visit-paid": "set-order"})


def test_confirm_on_must_be_an_event_that_sets_the_order() -> None:
    with pytest.raises(ValidationError, match="confirm_on is invoice-created"):
        conn(
            events={"visit-paid": "set-order"}, shop_code="main", shop_name="M", confirm_on="invoice-created"
        )
    c = conn(events={"invoice-created": "set-order", "visit-paid": "set-order"}, shop_code="main", shop_name="M",
             confirm_on="invoice-created")  # fmt: skip
    assert c.confirm_on is EventName.INVOICE_CREATED


@pytest.mark.parametrize("shop", [" main", "ma\u0000in", ""])
def test_the_shop_is_clean_text(shop: str) -> None:
    with pytest.raises(ValidationError):
        conn(events={"visit-paid": "set-order"}, shop_code=shop, shop_name="M")


def test_new_client_alone_needs_no_shop() -> None:
    assert conn(events={"client-created": "new-client"}).shop_code is None
