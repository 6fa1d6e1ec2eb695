"""Pure masking of personal data and secrets, for log lines and operator output alike.

* secrets (tokens, API keys, ``Authorization`` headers, passwords, DSNs, pydantic ``SecretStr``) are
  replaced with ``"[secret]"``;
* personal data (phones, e-mails, full names) is masked: ``+7*******67``, ``a***@example.com``,
  ``И*** А***``;
* URLs lose the source token of ``/hooks/klientiks/{token}/...``, the ``/t/{access_token}/`` segment of
  Klientiks REST URLs and secret query parameters; personal-data query parameters are masked;
* free text (a message, a traceback, any string value) is scanned for phone numbers, e-mails,
  ``Bearer ...`` credentials and ``token=...``-style assignments.

A value is masked by what its key says it is (``client_phone``, ``email``, ``access_token``) and by its
content. :func:`mask_field` masks one keyed value (the logging processor uses it for each field of a line);
:func:`mask_text`, :func:`mask_pairs` and :func:`mask_data` are for operator output.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote_plus

import pydantic
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE
from pydantic import SecretBytes, SecretStr

__all__ = [
    "SECRET_PLACEHOLDER",
    "mask_data",
    "mask_email",
    "mask_field",
    "mask_name",
    "mask_pairs",
    "mask_phone",
    "mask_text",
    "redact_url",
]

SECRET_PLACEHOLDER: Final = "[secret]"  # noqa: S105 - the replacement text, not a password
_STARS: Final = "***"
_PHONE_STARS: Final = "*******"  # fixed width: the mask does not reveal how long the number was
_MAX_DEPTH: Final = 16

# --------------------------------------------------------------------------------------------------
# Key classification
# --------------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    PLAIN = 0
    SECRET = 1
    PHONE = 2
    EMAIL = 3
    NAME = 4
    URL = 5


_SECRET_KEYS: Final = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "processing_key",
        "x_processing_key",
        "api_key",
        "apikey",
        "authorization",
        "proxy_authorization",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "dsn",
        "cookie",
        "set_cookie",
        "credentials",
    }
)
_SECRET_SUFFIXES: Final = ("_token", "_secret", "_key", "_password", "_apikey", "_dsn", "_authorization")
# Identifiers that merely look like secrets by suffix. Kafka message keys ("salon:123") are not secrets.
_NOT_SECRET_KEYS: Final = frozenset({"key", "idempotency_key", "event_key", "kafka_key"})

_PHONE_KEYS: Final = frozenset({"phone", "phones", "phone_number", "mobile", "mobile_phone", "telephone"})
_PHONE_SUFFIXES: Final = ("_phone", "_phones", "_phone_number")
_EMAIL_KEYS: Final = frozenset({"email", "emails", "e_mail"})
_EMAIL_SUFFIXES: Final = ("_email", "_emails")
_NAME_KEYS: Final = frozenset(
    {
        "name",
        "full_name",
        "first_name",
        "last_name",
        "middle_name",
        "patronymic",
        "patron_name",
        "second_name",
        "surname",
        "client_name",
        "executor_name",
        "fio",
    }
)
_NAME_PREFIXES: Final = ("client_", "executor_")
_URL_KEYS: Final = frozenset(
    {"url", "path", "request_url", "query", "query_string", "uri", "href", "referer"}
)
_URL_SUFFIXES: Final = ("_url", "_uri")

_CAMEL_RE: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_KEY_SEP_RE: Final = re.compile(r"[-\s.]+")


@functools.lru_cache(maxsize=4096)
def _classify(key: str) -> _Kind:
    norm = _KEY_SEP_RE.sub("_", _CAMEL_RE.sub("_", key.strip())).lower()
    if norm in _NOT_SECRET_KEYS:
        return _Kind.PLAIN
    if norm in _SECRET_KEYS or norm.endswith(_SECRET_SUFFIXES):
        return _Kind.SECRET
    if norm in _URL_KEYS or norm.endswith(_URL_SUFFIXES):
        return _Kind.URL
    if norm in _PHONE_KEYS or norm.endswith(_PHONE_SUFFIXES):
        return _Kind.PHONE
    if norm in _EMAIL_KEYS or norm.endswith(_EMAIL_SUFFIXES):
        return _Kind.EMAIL
    if norm in _NAME_KEYS or (norm.startswith(_NAME_PREFIXES) and norm.endswith("name")):
        return _Kind.NAME
    return _Kind.PLAIN


# --------------------------------------------------------------------------------------------------
# Mask functions
# --------------------------------------------------------------------------------------------------

_NON_DIGIT_RE: Final = re.compile(r"\D")
_PHONE_CHARS_RE: Final = re.compile(r"\+?[\d\s\-().\u00a0]+")
_ALREADY_MASKED_PHONE_RE: Final = re.compile(r"\+?\d{0,3}\*{3,}\d{0,2}")
_COUNTRY_CODES: Final = frozenset(str(code) for code in COUNTRY_CODE_TO_REGION_CODE)


def _country_code(digits: str) -> str:
    # E.164 country codes are prefix-free, so the first match is the only one.
    for length in (1, 2, 3):
        if digits[:length] in _COUNTRY_CODES:
            return digits[:length]
    return digits[:1]


def mask_phone(value: str) -> str:
    """Keep the country prefix and the last two digits: ``+79991234567`` -> ``+7*******67``.

    ``79991234567`` -> ``7*******67``, ``8 999 123 45 67`` -> ``8*******67``; a bare 10-digit national
    number keeps only its last two digits. Anything that is not 10-15 digits of phone → ``***``.
    """
    text = str(value).strip()
    if not text:
        return text
    if _ALREADY_MASKED_PHONE_RE.fullmatch(text):
        return text
    if not _PHONE_CHARS_RE.fullmatch(text):
        return _STARS
    digits = _NON_DIGIT_RE.sub("", text)
    if not 10 <= len(digits) <= 15:
        return _STARS
    if text.startswith("+"):
        prefix = "+" + _country_code(digits)
    elif len(digits) == 11 and digits[0] in "78":
        prefix = digits[0]
    else:
        prefix = ""
    return f"{prefix}{_PHONE_STARS}{digits[-2:]}"


def mask_email(value: str) -> str:
    """Keep the first character of the local part and the domain: ``a***@example.com``."""
    text = str(value).strip()
    if not text:
        return text
    local, at, domain = text.rpartition("@")
    if not at or not domain:
        return _STARS
    return f"{local[:1]}{_STARS}@{domain}" if local else f"{_STARS}@{domain}"


def mask_name(value: str) -> str:
    """Each word becomes its first letter and ``***``: ``Иванова Анна`` -> ``И*** А***``."""
    return " ".join(word[0] + _STARS for word in str(value).split())


# --------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------

_URL_STOP: Final = r"\s\"'<>"
_HOOK_TOKEN_RE: Final = re.compile(rf"(/hooks/klientiks/)[^/?#{_URL_STOP}]+", re.IGNORECASE)
_RESTAPI_PATH_RE: Final = re.compile(rf"/restapi/[^?#{_URL_STOP}]*", re.IGNORECASE)
_RESTAPI_T_SEGMENT_RE: Final = re.compile(r"(?<=/t/)[^/]+", re.IGNORECASE)
_USERINFO_RE: Final = re.compile(r"(://[^\s/@:]*:)[^\s/@]+(?=@)")
_QUERY_PARAM_RE: Final = re.compile(rf"(?:(?<=[?&;])|^)([^=&?#;{_URL_STOP}]+)=([^&#;{_URL_STOP}]*)")


def _mask_query_param(match: re.Match[str]) -> str:
    raw_name, raw_value = match.group(1), match.group(2)
    name = unquote_plus(raw_name)
    kind = _classify(name)
    if kind is _Kind.SECRET or name.strip().lower() == "key":
        return f"{raw_name}={_STARS}"
    if not raw_value or kind not in (_Kind.PHONE, _Kind.EMAIL, _Kind.NAME):
        return match.group(0)
    masked = _MASKERS[kind](unquote_plus(raw_value))
    if masked == _STARS and kind is _Kind.PHONE:
        # Not a whole phone (e.g. "phone=+7 (999) ..." cut at a space in free text): leave it to the
        # free-text phone scan, which sees the full number; "***" here would hide its "+7" prefix.
        return match.group(0)
    return f"{raw_name}={masked.replace('%', '%25').replace('&', '%26').replace(' ', '+')}"


def _redact_restapi_path(match: re.Match[str]) -> str:
    return _RESTAPI_T_SEGMENT_RE.sub(_STARS, match.group(0))


def redact_url(value: str) -> str:
    """Remove credentials from a URL (or from text containing URLs) and mask personal query values.

    * ``/hooks/klientiks/{token}/...`` -> ``/hooks/klientiks/***/...``;
    * Klientiks ``/Restapi/.../t/{access_token}/...`` -> ``.../t/***/...``;
    * ``scheme://user:password@host`` -> ``scheme://user:***@host``;
    * secret query parameters (``token``, ``access_token``, ``api_key``, ``key``, ``secret``, ``password``,
      ``processing_key``, anything ending in ``_token``/``_key``/...) -> ``***``;
    * personal query parameters (``client_phone``, ``email``, ``client_name``, ...) are masked with
      :func:`mask_phone`, :func:`mask_email` or :func:`mask_name`.
    """
    text = str(value)
    if "/" in text:
        text = _HOOK_TOKEN_RE.sub(r"\1***", text)
        text = _RESTAPI_PATH_RE.sub(_redact_restapi_path, text)
        if "://" in text:
            text = _USERINFO_RE.sub(r"\1***", text)
    if "=" in text:
        text = _QUERY_PARAM_RE.sub(_mask_query_param, text)
    return text


# --------------------------------------------------------------------------------------------------
# Free text
# --------------------------------------------------------------------------------------------------

_SECRET_ASSIGN_RE: Final = re.compile(
    r"((?<![\w-])[\w-]*?(?:token|secret|passw(?:or)?d|api[_-]?key|processing[_-]?key|authorization|dsn)"
    r"[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
    r"([^\s\"'&,;)}\]]+)",
    re.IGNORECASE,
)
_SECRET_WORDS: Final = ("token", "secret", "passw", "key", "authorization", "dsn")
_BEARER_RE: Final = re.compile(r"\b(bearer|basic)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_EMAIL_RE: Final = re.compile(r"(?<![\w.%+'-])[\w.%+'-]+@(?:[\w-]+\.)+[^\W\d_]{2,}")
# A phone: "+" and 10-15 digits, or "7"/"8" and 9-14 more digits; between digits at most three of " -()".
# It must not be glued to letters/digits nor be part of a decimal number ("78000000000.50"). The
# lookbehinds come after the first character so that the regex engine can skip ahead to "+", "7", "8".
_PHONE_SEP: Final = r"[ \t\u00a0\-()]{0,3}"
_PHONE_RE: Final = re.compile(
    rf"(?:\+(?<![^\W_]\+)(?<!\d[.,]\+)(?:{_PHONE_SEP}\d){{10,15}}"
    rf"|[78](?<![^\W_][78])(?<!\d[.,][78])(?:{_PHONE_SEP}\d){{9,14}})"
    r"(?![^\W_])(?![.,]\d)"
)
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_UUID_LEN: Final = 36


def _mask_phone_match(match: re.Match[str]) -> str:
    found = match.group(0)
    text, start, end = match.string, match.start(), match.end()
    if "-" in found or text[start - 1 : start] == "-" or text[end : end + 1] == "-":
        # Digit groups of a UUID ("78123456-1234-...") are not phones: keep the UUID part and look
        # again at whatever follows it.
        offset = max(0, start - _UUID_LEN)
        for uuid_match in _UUID_RE.finditer(text, offset, min(len(text), end + _UUID_LEN)):
            if uuid_match.start() < end and uuid_match.end() > start:
                split = max(uuid_match.end(), start) - start
                return found[:split] + _PHONE_RE.sub(_mask_phone_match, found[split:])
    return mask_phone(found)


def _mask_email_match(match: re.Match[str]) -> str:
    return mask_email(match.group(0))


def _needs_url_redaction(text: str, lowered: str) -> bool:
    return (
        "/hooks/klientiks/" in lowered
        or "/restapi/" in lowered
        or ("=" in text and ("?" in text or "&" in text or ";" in text or " " not in text[: text.find("=")]))
        or "://" in text
    )


def _scrub_text(text: str, *, url: bool = False) -> str:
    """Mask phones, e-mails and credentials inside free text; everything else is kept as it is."""
    if not text:
        return text
    lowered = text.lower()
    if url or _needs_url_redaction(text, lowered):
        text = redact_url(text)
    if ("=" in text or ":" in text) and any(word in lowered for word in _SECRET_WORDS):
        text = _SECRET_ASSIGN_RE.sub(r"\1***", text)
    if "bearer" in lowered or "basic" in lowered:
        text = _BEARER_RE.sub(r"\1 ***", text)
    if "@" in text:
        text = _EMAIL_RE.sub(_mask_email_match, text)
    return _PHONE_RE.sub(_mask_phone_match, text)


# --------------------------------------------------------------------------------------------------
# Values of any shape
# --------------------------------------------------------------------------------------------------

_SECRET_TYPES: tuple[type, ...] = (SecretStr, SecretBytes)
_generic_secret = getattr(pydantic, "Secret", None)
if isinstance(_generic_secret, type):
    _SECRET_TYPES = (*_SECRET_TYPES, _generic_secret)

_SCALARS: Final = (bool, int, float, decimal.Decimal, _dt.date, _dt.time, _dt.timedelta, uuid.UUID, enum.Enum)
_MASKERS: Final[dict[_Kind, Callable[[str], str]]] = {
    _Kind.PHONE: mask_phone,
    _Kind.EMAIL: mask_email,
    _Kind.NAME: mask_name,
}


def _to_text(value: object) -> str:
    """Same text the JSON renderer would have produced for an unknown object."""
    structlog_repr = getattr(value, "__structlog__", None)
    if callable(structlog_repr):
        return str(structlog_repr())
    return repr(value)


def _scrub_key(key: Any) -> Any:
    return _scrub_text(key) if isinstance(key, str) else key


def _scrub(value: Any, depth: int) -> Any:
    """Mask a value that has no key telling what it is."""
    if isinstance(value, str):
        return _scrub_text(value)
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, _SECRET_TYPES):
        return SECRET_PLACEHOLDER
    if depth >= _MAX_DEPTH:
        return "[truncated]"
    if isinstance(value, Mapping):
        return {_scrub_key(k): _scrub_item(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str | bytes):
        # (name, value) pairs: header lists, httpx.Headers.raw, query parameter lists.
        name = value[0].decode("latin-1") if isinstance(value[0], bytes) else value[0]
        return (_scrub_key(name), _scrub_item(name, value[1], depth + 1))
    if isinstance(value, list | tuple | set | frozenset):
        items = [_scrub(item, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, bytes | bytearray):
        return _scrub_text(bytes(value).decode("utf-8", "backslashreplace"))
    if isinstance(value, pydantic.BaseModel):
        try:
            dumped = value.model_dump()
        except Exception:
            return _scrub_text(_to_text(value))
        return _scrub(dumped, depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            as_dict = dataclasses.asdict(value)
        except Exception:
            return _scrub_text(_to_text(value))
        return _scrub(as_dict, depth + 1)
    return _scrub_text(_to_text(value))


def _scrub_as(kind: _Kind, value: Any, depth: int) -> Any:
    """Mask a value whose key says it is a phone, an e-mail, a name or a URL."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, _SECRET_TYPES):
        return SECRET_PLACEHOLDER
    if isinstance(value, Mapping) or depth >= _MAX_DEPTH:
        return _scrub(value, depth)
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_as(kind, item, depth + 1) for item in value]
    if kind is _Kind.URL:
        return _scrub_text(value if isinstance(value, str) else str(value), url=True)
    if isinstance(value, int | float) and kind is not _Kind.PHONE:
        return value
    text = value if isinstance(value, str) else str(value)
    if not text:
        return text
    return _MASKERS[kind](text)


def _scrub_item(key: Any, value: Any, depth: int) -> Any:
    kind = _classify(key if isinstance(key, str) else str(key))
    if kind is _Kind.SECRET:
        return SECRET_PLACEHOLDER
    if kind is _Kind.PLAIN:
        return _scrub(value, depth)
    return _scrub_as(kind, value, depth)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def mask_field(key: Any, value: Any) -> Any:
    """``value`` masked as its key says (a secret is dropped, a phone masked, ...) and by its content."""
    return _scrub_item(key, value, 0)


def mask_text(text: str) -> str:
    """Free text (a vendor's error description) with phones, e-mails and credentials masked."""
    return str(_scrub(text, 0))


def mask_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Request parameters masked by name (``client_phone``, ``client_name``, ...) and by content."""
    masked = _scrub([(k, v) for k, v in pairs], 0)
    return [(str(k), str(v)) for k, v in masked]


def mask_data(data: Any) -> Any:
    """A JSON-like structure with personal values masked by key (phone, email, names) and by content."""
    return _scrub(data, 0)
