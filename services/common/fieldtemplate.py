"""Connection templates over an event's fields: ``"klientiks-{client.id}"``, ``"{attribution.utm.utm_source}"``.

A template is text with ``{path}`` fields; ``{{`` and ``}}`` are literal braces; a date-time takes a
strftime format (``{appointment.start:%d.%m.%Y %H:%M}``); ``{appointment.services}`` is the names joined. The paths are checked when
the config is read (:func:`problems`), so a typo fails at start, named with its config path. A field the
event does not carry makes the whole value absent (:func:`render` returns None): a vendor never gets a
half-filled value such as ``"klientiks-"``.
"""

from __future__ import annotations

import re
import string
import types
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Union, get_args, get_origin

from services.common.events import Appointment, Client, CloudEvent, Invoice

_SCALAR = (str, int, Decimal, datetime, bool)
# Models whose scalar fields a template may name, and the maps whose keys it may name.
_MODELS: dict[str, Any] = {"client": Client, "appointment": Appointment, "invoice": Invoice}
_MAPS = ("extra.", "attribution.utm.", "attribution.click_ids.")
_FIXED = {
    "event.id", "event.type", "event.source", "event.subject", "user_position",
    "attribution.ip", "attribution.user_agent", "appointment.executor.name", "appointment.executor.phone",
    "appointment.start", "appointment.created", "event.time", "appointment.services",
}  # fmt: skip
# Date-times may take a strftime format: `{appointment.start:%d.%m.%Y %H:%M}`.
_DATETIMES = frozenset({"appointment.start", "appointment.created", "event.time"})
_KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def fields() -> list[str]:
    """Every fixed path a template may name (plus ``extra.*``, ``attribution.utm.*``, ``attribution.click_ids.*``)."""
    out = set(_FIXED)
    for prefix, model in _MODELS.items():
        for name, info in model.model_fields.items():
            if info.annotation is not None and _scalar(info.annotation):
                out.add(f"{prefix}.{name}")
    return sorted(out)


def _scalar(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return all(a is type(None) or _scalar(a) for a in get_args(annotation))
    if origin is not None:  # list[...], dict[...]: not one value
        return False
    return isinstance(annotation, type) and issubclass(annotation, _SCALAR)


_KNOWN = frozenset(fields())


def problems(template: str) -> list[str]:
    """What is wrong with ``template``: malformed, or a path no event has."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return [f"malformed template {template!r} ({e}); write literal braces as {{{{ and }}}}"]
    out = [f"{{{name}}}: write a field as {{path}}, without a conversion, or a date-time's format after ':'"
           for _, name, spec, conv in parts if name is not None and (conv or (spec and name not in _DATETIMES))]  # fmt: skip
    paths = [name for _, name, _, _ in parts if name is not None]
    for path in paths:
        if path in _KNOWN:
            continue
        prefix = next((p for p in _MAPS if path.startswith(p)), None)
        if prefix is not None and _KEY.fullmatch(path[len(prefix) :]):
            continue
        out.append(f"unknown field {{{path}}}; use one of {', '.join(sorted(_KNOWN))}, or extra.NAME")
    return out


def _lookup(event: CloudEvent, path: str) -> Any:
    if path.startswith("event."):
        return getattr(event, path[6:])
    node: Any = event.data
    for part in path.split("."):
        if node is None:
            return None
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def _text(value: Any, spec: str = "") -> str | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list):  # appointment.services
        return ", ".join(str(v) for v in value)
    if isinstance(value, datetime) and spec:
        return value.strftime(spec)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def render(template: str, event: CloudEvent) -> str | None:
    """``template`` filled from ``event``; None when a field it names is absent (checked templates only)."""
    out = []
    for literal, name, spec, _conv in string.Formatter().parse(template):
        out.append(literal)
        if name is None:
            continue
        value = _text(_lookup(event, name), spec or "")
        if value is None:
            return None
        out.append(value)
    text = "".join(out).strip()
    return text or None
