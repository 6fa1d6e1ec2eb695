"""services.common.logging: every log line masked (personal data, secrets never written), configuration.

The pure masking functions are tested in test_masking.py.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from pydantic import BaseModel, SecretBytes, SecretStr

from services.common.logging import (
    configure_logging,
    get_logger,
    mask_processor,
)

RAW_PHONE = "79991234567"
RAW_EMAIL = "anna.ivanova@example.com"
RAW_NAME = "Иванова Анна Сергеевна"
RAW_TOKEN = "src-tok-9f8e7d6c5b4a"
RAW_ACCESS_TOKEN = "a1b2c3d4e5f6a7b8c9d0"
RAW_SECRET = "s3cr3t-pydantic-value"


def mask(event_dict: dict[str, Any]) -> dict[str, Any]:
    return dict(mask_processor(None, "info", event_dict))


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Undo configure_logging(): structlog defaults, root handlers/level, library logger settings."""
    root = logging.getLogger()
    root_level = root.level
    root_handlers = list(root.handlers)
    prefixes = (
        "uvicorn",
        "faststream",
        "aiokafka",
        "httpx",
        "httpcore",
        "sqlalchemy",
        "aiosqlite",
        "watchfiles",
    )
    library = {
        name: (lg.level, lg.propagate, list(lg.handlers))
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and name.split(".", 1)[0] in prefixes
    }
    structlog.contextvars.clear_contextvars()
    # A clean slate: an in-process uvicorn of an earlier test (its Config's log_level) left these at WARNING.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_StderrHandler":
            root.removeHandler(handler)
    for handler in root_handlers:
        # Only console handlers configure_logging() may have removed; pytest swaps its own per phase.
        if type(handler) is logging.StreamHandler and handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(root_level)
    for name, lg in logging.root.manager.loggerDict.items():
        if not isinstance(lg, logging.Logger):
            continue
        if name in library:
            lg.level, lg.propagate, lg.handlers[:] = library[name][0], library[name][1], library[name][2]
        elif name.split(".", 1)[0] in prefixes:
            lg.setLevel(logging.NOTSET)


# ------------------------------------------------------------------------------------------- secrets


def test_secret_keys_are_dropped_and_non_secret_keys_kept() -> None:
    event = {
        "event": "delivering",
        "token": RAW_TOKEN,
        "access_token": RAW_ACCESS_TOKEN,
        "api_key": "cpa-house-key",
        "apiKey": "cpa-house-key",
        "weeek_token": "weeek-token",
        "client_secret": "plarin-secret",
        "password": "hunter2",
        "dsn": "postgresql://relay:pw@db/relay",
        "headers": {
            "X-Processing-Key": "maxma-key",
            "Authorization": "Bearer weeek-bearer",
            "Accept": "json",
        },
        "key": "salon:123",
        "idempotency_key": "record:42:created",
        "event_key": "visit_created",
        "kafka_key": "salon:123",
        "salon_id": 123,
    }
    masked = mask(event)
    for name in (
        "token",
        "access_token",
        "api_key",
        "apiKey",
        "weeek_token",
        "client_secret",
        "password",
        "dsn",
    ):
        assert masked[name] == "[secret]", name
    assert masked["headers"] == {
        "X-Processing-Key": "[secret]",
        "Authorization": "[secret]",
        "Accept": "json",
    }
    assert masked["key"] == "salon:123"
    assert masked["idempotency_key"] == "record:42:created"
    assert masked["event_key"] == "visit_created"
    assert masked["kafka_key"] == "salon:123"
    assert masked["salon_id"] == 123


def test_secret_values_anywhere_in_nested_structures() -> None:
    event = {
        "event": "settings loaded",
        "settings": {
            "targets": [
                {"kind": "maxma", "credentials": {"value": SecretStr(RAW_SECRET)}},
                {"kind": "weeek", "extra": (SecretBytes(b"raw-bytes-secret"), "visible")},
            ],
            "deep": {"a": {"b": {"c": [SecretStr(RAW_SECRET)]}}},
        },
        "header_pairs": [("x-processing-key", "maxma-key"), ("content-type", "application/json")],
        "raw_headers": [(b"authorization", b"Bearer weeek-bearer")],
        "plain": SecretStr(RAW_SECRET),
    }
    masked = mask(event)
    rendered = json.dumps(masked, ensure_ascii=False, default=repr)
    for secret in (RAW_SECRET, "raw-bytes-secret", "maxma-key", "weeek-bearer"):
        assert secret not in rendered
    assert masked["plain"] == "[secret]"
    assert masked["settings"]["targets"][1]["extra"] == ("[secret]", "visible")
    assert masked["settings"]["deep"]["a"]["b"]["c"] == ["[secret]"]
    assert masked["header_pairs"][1] == ("content-type", "application/json")


def test_pydantic_model_values_are_masked_field_by_field() -> None:
    class MaxmaCredentials(BaseModel):
        processing_key: str
        api_secret: SecretStr
        client_phone: str
        comment: str

    value = MaxmaCredentials(
        processing_key="pk-123",
        api_secret=SecretStr(RAW_SECRET),
        client_phone=RAW_PHONE,
        comment="перезвонить на 8 999 123 45 67",
    )
    masked = mask({"event": "x", "creds": value})
    assert masked["creds"] == {
        "processing_key": "[secret]",
        "api_secret": "[secret]",
        "client_phone": "7*******67",
        "comment": "перезвонить на 8*******67",
    }


def test_processor_works_on_a_copy() -> None:
    event = {
        "event": f"call {RAW_PHONE}",
        "client": {"phone": RAW_PHONE, "tags": [RAW_EMAIL], "secret": SecretStr(RAW_SECRET)},
        "token": RAW_TOKEN,
    }
    before = copy.deepcopy(event)
    masked = mask(event)
    assert event["event"] == before["event"]
    assert event["client"]["phone"] == RAW_PHONE  # type: ignore[index]
    assert event["client"]["tags"] == [RAW_EMAIL]  # type: ignore[index]
    assert event["token"] == RAW_TOKEN
    assert masked["client"]["phone"] == "7*******67"


# --------------------------------------------------------------------------------------- personal data


def test_personal_data_keys_are_masked() -> None:
    event = {
        "event": "record created",
        "phone": "+7 (999) 123-45-67",
        "client_phone": RAW_PHONE,
        "executor_phone": 79161234567,
        "phoneNumber": "89991234567",
        "phone_number": "+79991234567",
        "client_phones": ["79991234567", "89161234567"],
        "email": RAW_EMAIL,
        "client_email": "petrov@mail.ru",
        "name": RAW_NAME,
        "full_name": RAW_NAME,
        "fullName": RAW_NAME,
        "firstName": "Анна",
        "lastName": "Иванова",
        "middleName": "Сергеевна",
        "patronymic": "Сергеевна",
        "client_first_name": "Анна",
        "client_second_name": "Иванова",
        "client_patron_name": "Сергеевна",
        "executor_name": "Петрова Мария",
        "surname": "Иванова",
        "client_id": 42,
        "service": "Стрижка",
    }
    masked = mask(event)
    assert masked["phone"] == "+7*******67"
    assert masked["client_phone"] == "7*******67"
    assert masked["executor_phone"] == "7*******67"
    assert masked["phoneNumber"] == "8*******67"
    assert masked["phone_number"] == "+7*******67"
    assert masked["client_phones"] == ["7*******67", "8*******67"]
    assert masked["email"] == "a***@example.com"
    assert masked["client_email"] == "p***@mail.ru"
    for key in ("name", "full_name", "fullName"):
        assert masked[key] == "И*** А*** С***"
    assert masked["firstName"] == masked["client_first_name"] == "А***"
    assert masked["lastName"] == masked["client_second_name"] == masked["surname"] == "И***"
    assert masked["middleName"] == masked["patronymic"] == masked["client_patron_name"] == "С***"
    assert masked["executor_name"] == "П*** М***"
    assert masked["client_id"] == 42
    assert masked["service"] == "Стрижка"


# ---------------------------------------------------------------------------------------------- URLs


def test_url_keys_are_redacted_in_event_dicts() -> None:
    masked = mask(
        {
            "event": "request",
            "url": f"https://relay.example.ru/hooks/klientiks/{RAW_TOKEN}/record_created?phone={RAW_PHONE}",
            "path": f"/hooks/klientiks/{RAW_TOKEN}/record_created",
            "request_url": f"https://klientiks.ru/clientix/Restapi/get/a/1/u/2/t/{RAW_ACCESS_TOKEN}/app/clients",
            "query_string": f"client_phone={RAW_PHONE}&token={RAW_TOKEN}",
            "query": "client_email=anna.ivanova%40example.com",
        }
    )
    rendered = json.dumps(masked, ensure_ascii=False)
    assert RAW_TOKEN not in rendered
    assert RAW_ACCESS_TOKEN not in rendered
    assert RAW_PHONE not in rendered
    assert "anna.ivanova" not in rendered
    assert masked["path"] == "/hooks/klientiks/***/record_created"
    assert masked["query_string"] == "client_phone=7*******67&token=***"


# ----------------------------------------------------------------------------------------- free text


def test_exception_text_is_masked() -> None:
    try:
        raise ValueError(f"no client with phone {RAW_PHONE} and email {RAW_EMAIL}")
    except ValueError:
        masked = mask({"event": "lookup failed", "exc_info": True})
    assert "exc_info" not in masked
    assert "ValueError: no client with phone 7*******67 and email a***@example.com" in masked["exception"]


# --------------------------------------------------------------------------------------- end to end


def _json_lines(err: str) -> list[dict[str, Any]]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_end_to_end_json_output_has_no_raw_personal_data_or_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(level="INFO", fmt="json")
    log = get_logger("services.ingest.test")

    log.info(
        "webhook accepted",
        client_phone=RAW_PHONE,
        client_email=RAW_EMAIL,
        client_name=RAW_NAME,
        token=RAW_TOKEN,
        target={"maxma": {"settings": {"processing_key": SecretStr(RAW_SECRET)}}},
        url=f"https://relay.example.ru/hooks/klientiks/{RAW_TOKEN}/record_created?phone=%2B{RAW_PHONE}",
        key="salon:123",
    )
    log.warning("Клиент %s перезвонит с %s", "id 42", "+7 (999) 123-45-67")
    try:
        raise RuntimeError(f"Maxma rejected {RAW_EMAIL}")
    except RuntimeError:
        log.exception("delivery failed", name=RAW_NAME)
    logging.getLogger("uvicorn.error").info("client 8 999 123 45 67 connected, mail %s", RAW_EMAIL)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "POST",
        f"/hooks/klientiks/{RAW_TOKEN}/record_created?client_phone={RAW_PHONE}",
        "1.1",
        200,
    )

    err = capsys.readouterr().err
    records = _json_lines(err)
    assert len(records) == 5
    for forbidden in (
        RAW_PHONE,
        "9991234567",
        "999 123 45 67",
        "(999) 123-45-67",
        "anna.ivanova",
        "Иванова",
        "Анна",
        "Сергеевна",
        RAW_TOKEN,
        RAW_SECRET,
    ):
        assert forbidden not in err, forbidden

    structured, formatted, failed, uvicorn_error, uvicorn_access = records
    assert structured["event"] == "webhook accepted"
    assert structured["level"] == "info"
    assert structured["logger"] == "services.ingest.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", structured["timestamp"])
    assert structured["client_phone"] == "7*******67"
    assert structured["client_email"] == "a***@example.com"
    assert structured["client_name"] == "И*** А*** С***"
    assert structured["token"] == "[secret]"
    assert structured["target"] == {"maxma": {"settings": {"processing_key": "[secret]"}}}
    assert (
        structured["url"] == "https://relay.example.ru/hooks/klientiks/***/record_created?phone=+7*******67"
    )
    assert structured["key"] == "salon:123"
    assert formatted["event"] == "Клиент id 42 перезвонит с +7*******67"
    assert failed["level"] == "error"
    assert failed["name"] == "И*** А*** С***"
    assert "RuntimeError: Maxma rejected a***@example.com" in failed["exception"]
    assert uvicorn_error == {
        "event": "client 8*******67 connected, mail a***@example.com",
        "logger": "uvicorn.error",
        "level": "info",
        "timestamp": uvicorn_error["timestamp"],
    }
    assert uvicorn_access["event"] == (
        '127.0.0.1:5000 - "POST /hooks/klientiks/***/record_created?client_phone=7*******67 HTTP/1.1" 200'
    )


def test_console_format_is_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="console")
    get_logger("console").info("hello", client_phone=RAW_PHONE, token=RAW_TOKEN)
    logging.getLogger("faststream").warning("message from %s", RAW_EMAIL)
    err = capsys.readouterr().err
    assert "7*******67" in err
    assert "a***@example.com" in err
    assert RAW_PHONE not in err
    assert RAW_TOKEN not in err
    assert RAW_EMAIL not in err


def test_logger_created_before_configuration_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    early = get_logger("services.early")
    configure_logging(fmt="json")
    early.info("call", phone=RAW_PHONE)
    (record,) = _json_lines(capsys.readouterr().err)
    assert record["phone"] == "7*******67"


def test_configure_logging_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    configure_logging(fmt="json")
    configure_logging(level="debug", fmt="json")
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "_StderrHandler"]
    assert len(handlers) == 1

    get_logger("once").info("structlog line")
    logging.getLogger("uvicorn.error").info("stdlib line")
    records = _json_lines(capsys.readouterr().err)
    assert [r["event"] for r in records] == ["structlog line", "stdlib line"]


def test_levels_and_quiet_libraries(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(level="WARNING", fmt="json")
    get_logger("lvl").info("hidden")
    get_logger("lvl").warning("shown")
    configure_logging(level="INFO", fmt="json")
    logging.getLogger("aiokafka.consumer").info("fetching")
    logging.getLogger("aiokafka.consumer").warning("rebalance")
    logging.getLogger("faststream.access.kafka").info("Received")
    assert [r["event"] for r in _json_lines(capsys.readouterr().err)] == ["shown", "rebalance", "Received"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="LOUD")


def test_library_handlers_are_taken_over(capsys: pytest.CaptureFixture[str]) -> None:
    # faststream and uvicorn install their own stdout/stderr handlers with propagate=False.
    own = logging.getLogger("faststream.access.kafka")
    own.propagate = False
    own.addHandler(logging.StreamHandler())
    configure_logging(fmt="json")
    own.info("processing %s", RAW_PHONE)
    err = capsys.readouterr().err
    assert RAW_PHONE not in err
    assert _json_lines(err)[0]["event"] == "processing 7*******67"
