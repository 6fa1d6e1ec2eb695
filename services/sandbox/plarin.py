"""In-memory fake of a Plarin conversion-postback receiver, served over real HTTP with FastAPI.

What is known of the real receiver: almost nothing. The Plarin cabinet (Settings -> Postback) gives a postback
URL, and integrators send one GET per conversion carrying the ad/click identifier (webjack's "klientiks.ru ->
Отправка данных о конверсиях в Plarin"). The URL format, the parameter names, the answers and the limits are
not documented anywhere we could find.

The relay renders the cabinet's URL template with the macros ``{click_id}``, ``{event}``, ``{value}``,
``{currency}``, ``{event_id}``, ``{client_id}`` and ``{ts}`` (values URL-encoded) and sends one GET per
conversion; it takes 2xx as success, 429 and 5xx as retryable and any other 4xx as permanent.

Everything below is therefore the sandbox's own assumption, chosen to be as strict as a plausible receiver can
be, so that a relay passing here is unlikely to be refused by the real one. None of it is a Plarin fact:

* ``GET /postback`` and ``GET /postback/<anything>`` (a cabinet URL may carry a path segment, e.g. an account
  id) receive a postback. The answer is HTTP 200 JSON ``{"status": "ok", "id": <int>}``; ``id`` is the
  sandbox's postback number (from 1, restarted by a reset). A refusal is
  ``{"status": "error", "message": "<English text>"}`` with HTTP 400 (a malformed or invalid postback),
  403 (token) or 405 (another method, with ``Allow: GET``). The texts are the sandbox's own.
* The query string must be ASCII (non-ASCII text percent-encoded as UTF-8) and well formed: no empty pair
  (``&&``, a trailing ``&``), every pair ``name=value`` with a non-empty name, no second unencoded ``=`` in a
  pair, no ``%`` that is not followed by two hex digits. ``+`` decodes to a space (as in HTML forms and most
  servers), so a literal ``+`` must be sent as ``%2B`` (e.g. in a ``+03:00`` offset). Over HTTP a raw
  non-ASCII byte in the request target never reaches the sandbox: uvicorn answers it 400 ``text/plain``
  itself (unrecorded); :meth:`PlarinSandbox.receive` refuses it for direct callers. A query longer than
  :data:`MAX_QUERY_BYTES` answers 414 (the nginx-like page a front balancer gives). A GET must have no body.
* A parameter given twice is refused. Names other than the ones below are accepted untouched: the cabinet's
  template may add its own.
* Every name and value (after decoding) must be non-empty and free of control or format characters (Unicode
  Cc, Cf, Zl, Zp), of U+FFFD, of lone surrogates (invalid UTF-8 in the percent-encoding, decoded with
  ``surrogateescape`` to be caught), of leading or trailing whitespace (Unicode, so a no-break space too)
  and of an unrendered macro: any ``{...}`` (``{click_id}``, ``{{name}}``, ``%7B...%7D`` once decoded) or a
  double-encoded ``%7B...%7D``. The decoded path obeys the same character and macro rules.
* The parameters in ``required`` (default ``("click_id",)``) must be present.
* ``value``, when present: a decimal number >= 0 in ASCII digits, no sign, no leading zero, ``.`` as the
  separator with 1 or 2 decimals (``0``, ``1500``, ``0.5``, ``1500.50``), at most 12 integer digits.
* ``currency``, when present: three uppercase ASCII letters (an ISO 4217 shape; the code is not looked up).
* ``ts``, when present: a unix timestamp in seconds (10 digits) or milliseconds (13 digits) without a leading
  zero, or an ISO 8601 date-time ``YYYY-MM-DDTHH:MM[:SS[.ffffff]]`` with ``Z`` or a ``±HH:MM`` offset (a time
  without an offset is ambiguous and refused) naming a real date and time.
* With a ``token`` configured (an assumption: cabinets often put a key in the URL), the query must carry
  ``token=<token>`` exactly, else 403 ``{"status": "error", "message": "invalid token"}``. The checks run in
  this order: query syntax (400), a repeated name (400), the token (403), then the value rules (400). Without
  a token configured a ``token`` parameter is an ordinary one.
* Duplicates (the same ``event_id`` twice) are accepted and each is stored: the real behaviour is unknown,
  and refusing a repeat would turn the retry of a lost answer into a false failure. Count them on
  ``GET /_sandbox/postbacks``.
* Another path answers 404 (nginx-like HTML page). Refused and wrong-path requests are in the request log,
  never in the postbacks.

Everything under ``/_sandbox/`` is a control API for tests, the demo and benchmarks (the kit's routes and
``GET /_sandbox/postbacks``); the real Plarin has no such paths. No record ever shows the value of a ``token``
parameter (any case of the name): it is replaced by ``***`` in the decoded pairs, the params and the raw query.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import model_validator

from services.sandbox import kit

__all__ = [
    "DEFAULT_REQUIRED",
    "MACROS",
    "MASK",
    "MAX_QUERY_BYTES",
    "POSTBACK_PATH",
    "TOKEN_PARAM",
    "FaultSpec",
    "PlarinError",
    "PlarinSandbox",
    "Postback",
    "RecordedRequest",
    "create_plarin_app",
    "parse_query",
    "validate_postback",
]

POSTBACK_PATH = "/postback"
TOKEN_PARAM = "token"  # noqa: S105 - the parameter's name, not a secret
MASK = "***"
DEFAULT_REQUIRED: tuple[str, ...] = ("click_id",)
# The macros the relay renders into the cabinet's URL template.
MACROS: tuple[str, ...] = ("click_id", "event", "value", "currency", "event_id", "client_id", "ts")
# nginx's default large_client_header_buffers (8k) bounds the request line; leave room for the path.
MAX_QUERY_BYTES = 8000

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_MACRO_RE = re.compile(r"\{[^{}]*\}|%7B.*?%7D", re.IGNORECASE)
_VALUE_RE = re.compile(r"(?:0|[1-9][0-9]{0,11})(?:\.[0-9]{1,2})?")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_UNIX_TS_RE = re.compile(r"[1-9][0-9]{9}|[1-9][0-9]{12}")
_ISO_TS_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:Z|[+-][0-9]{2}:[0-9]{2})"
)


class PlarinError(Exception):
    """A refused postback, answered as ``{"status": "error", "message": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_body(message: str) -> dict[str, Any]:
    return {"status": "error", "message": message}


# --------------------------------------------------------------------------------------------
# State records
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RecordedRequest(kit.RecordedRequest):
    """One request, recorded on arrival and completed when answered; never holds a token's value."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]  # decoded pairs in order (best effort if malformed); token -> ***
    raw_query: str  # as sent (non-ASCII bytes shown as \\xNN); token value -> ***
    token_ok: bool | None  # None: no token configured (or not a postback path)
    message: str | None = None  # "message" of a refusal
    postback_id: int | None = None  # id of the stored postback on success


@dataclass
class Postback:
    """An accepted postback: its parameters decoded, in the order sent (a token's value masked)."""

    id: int
    path: str
    params: dict[str, str]
    raw_query: str = ""  # token value masked
    received_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``GET /_sandbox/postbacks``."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


class FaultSpec(kit.FaultSpec):
    """Body of ``POST /_sandbox/faults``: the kit's modes (:mod:`services.sandbox.kit`) and two filters.

    ``path`` narrows a fault to one postback path (e.g. ``/postback/acc-1``); ``match`` to postbacks whose
    query parameters have these values, e.g. ``{"click_id": "abc"}``. Only ``delay`` lets the request reach
    the postback logic, so the other modes never store a postback.
    """

    FILTERS: ClassVar[tuple[str, ...]] = ("path",)

    path: str | None = None
    match: dict[str, str] | None = None

    @model_validator(mode="after")
    def _check_match(self) -> FaultSpec:
        if self.match is not None and any(_is_token_name(name) for name in self.match):
            # The token's value is never recorded, so such a fault could never fire.
            raise ValueError("match cannot name the token")
        return self


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


def _is_token_name(name: str) -> bool:
    return name.casefold() == TOKEN_PARAM


def _unquote(text: str) -> str:
    """Decode a query component; invalid UTF-8 becomes lone surrogates (refused by the value rules)."""
    return unquote_plus(text, encoding="utf-8", errors="surrogateescape")


def _printable(text: str) -> str:
    """``text`` with lone surrogates shown as ``\\xNN`` (JSON cannot carry them)."""
    try:
        data = text.encode("utf-8", "surrogateescape")  # the bytes _unquote could not decode
    except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF, from a Python caller
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "backslashreplace")


def _shown(name: str) -> str:
    return _printable(name)[:64]


def _pieces(text: str) -> list[str]:
    return text.split("&") if text else []


def parse_query(raw: bytes) -> list[tuple[str, str]]:
    """The decoded ``(name, value)`` pairs of a raw query string, in order; raises :class:`PlarinError`."""
    if len(raw) > MAX_QUERY_BYTES:
        raise PlarinError(414, f"query string longer than {MAX_QUERY_BYTES} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PlarinError(400, "query string must be ASCII: percent-encode the values as UTF-8") from None
    pairs = []
    for piece in _pieces(text):
        if not piece:
            raise PlarinError(400, "malformed query string: empty parameter (&& or a trailing &)")
        name, sep, value = piece.partition("=")
        if not name:
            raise PlarinError(400, "malformed query string: parameter without a name")
        shown = _shown(_unquote(name))
        if not sep:
            raise PlarinError(400, f"malformed query string: parameter without '=': {shown}")
        if "=" in value:
            raise PlarinError(400, f"unencoded '=' in the value of parameter: {shown}")
        if _BAD_ESCAPE_RE.search(piece):
            raise PlarinError(400, f"malformed percent-encoding in parameter: {shown}")
        pairs.append((_unquote(name), _unquote(value)))
    return pairs


def _check_text(what: str, text: str) -> None:
    """The rules every name, value and path obeys (emptiness is checked by the caller)."""
    if any(ch == "\ufffd" or unicodedata.category(ch) in _BAD_CATEGORIES for ch in text):
        raise PlarinError(400, f"invalid character in {what}")
    if text != text.strip():
        raise PlarinError(400, f"leading or trailing whitespace in {what}")
    if _MACRO_RE.search(text):
        raise PlarinError(400, f"unrendered macro in {what}")


def _check_ts(ts: str) -> None:
    if _UNIX_TS_RE.fullmatch(ts):
        return
    if _ISO_TS_RE.fullmatch(ts):
        try:
            datetime.fromisoformat(ts)
        except ValueError:
            pass
        else:
            return
    raise PlarinError(
        400, "invalid ts: expected a unix timestamp (10 or 13 digits) or an ISO 8601 date-time with an offset"
    )


def validate_postback(
    pairs: Sequence[tuple[str, str]],
    *,
    token: str | None = None,
    required: Sequence[str] = DEFAULT_REQUIRED,
) -> dict[str, str]:
    """Check decoded query pairs; return them as a dict (in order), or raise :class:`PlarinError`."""
    counts = Counter(name for name, _ in pairs)
    for name, _ in pairs:
        if counts[name] > 1:
            raise PlarinError(400, f"parameter given more than once: {_shown(name)}")
    params = dict(pairs)
    if token is not None:
        given = params.get(TOKEN_PARAM)
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), token.encode("utf-8")
        ):
            raise PlarinError(403, "invalid token")
    for name, value in pairs:
        _check_text(f"parameter name {_shown(name)}", name)
        if value == "":
            raise PlarinError(400, f"empty value of parameter: {_shown(name)}")
        _check_text(f"the value of parameter {_shown(name)}", value)
    for name in required:
        if name not in params:
            raise PlarinError(400, f"missing required parameter: {name}")
    if "value" in params and not _VALUE_RE.fullmatch(params["value"]):
        raise PlarinError(400, "invalid value: expected a decimal number >= 0 with at most 2 decimals")
    if "currency" in params and not _CURRENCY_RE.fullmatch(params["currency"]):
        raise PlarinError(400, "invalid currency: expected 3 uppercase letters (ISO 4217)")
    if "ts" in params:
        _check_ts(params["ts"])
    return params


def _masked_pairs(raw: bytes) -> tuple[tuple[str, str], ...]:
    """Best-effort decoded pairs for the log (never raises); token values masked."""
    pairs = []
    for piece in _pieces(raw.decode("utf-8", "surrogateescape")):
        name, _, value = piece.partition("=")
        name = _printable(_unquote(name))
        pairs.append((name, MASK if _is_token_name(name) else _printable(_unquote(value))))
    return tuple(pairs)


def _masked_raw(raw: bytes) -> str:
    """The raw query for the log (non-ASCII bytes as ``\\xNN``); token values masked."""
    out = []
    for piece in _pieces(raw.decode("utf-8", "backslashreplace")):
        name, sep, _ = piece.partition("=")
        out.append(f"{name}={MASK}" if sep and _is_token_name(_unquote(name)) else piece)
    return "&".join(out)


def _mask_params(params: Mapping[str, str]) -> dict[str, str]:
    return {name: MASK if _is_token_name(name) else value for name, value in params.items()}


# --------------------------------------------------------------------------------------------
# The sandbox state
# --------------------------------------------------------------------------------------------


def _first_values(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    first: dict[str, str] = {}
    for name, value in pairs:
        first.setdefault(name, value)
    return first


class PlarinSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    """In-memory Plarin postback receiver: accepted postbacks, recorded requests and injected faults.

    Usable directly in tests (``sandbox.postbacks``, ``sandbox.add_fault(...)``,
    ``await sandbox.wait_for_requests(...)``) and over HTTP via :func:`create_plarin_app`.
    """

    fault_spec = FaultSpec

    def __init__(self) -> None:
        super().__init__()
        self.postbacks: list[Postback] = []
        self._next_postback_id = 1

    def reset(self) -> None:
        """Forget postbacks, recorded requests, faults and latency; restart the counters."""
        with self.lock:
            self.postbacks.clear()
            self._next_postback_id = 1
            super().reset()

    def add_postback(self, path: str, params: Mapping[str, str], raw_query: str = "") -> Postback:
        """Store an accepted postback (token values masked) with the next id."""
        with self.lock:
            postback = Postback(
                id=self._next_postback_id, path=path, params=_mask_params(params), raw_query=raw_query
            )
            self._next_postback_id += 1
            self.postbacks.append(postback)
        return postback

    def receive(
        self,
        path: str,
        raw_query: bytes,
        *,
        token: str | None = None,
        required: Sequence[str] = DEFAULT_REQUIRED,
    ) -> tuple[int, dict[str, Any]]:
        """Handle one postback GET: validate, store; return the HTTP status and the JSON answer."""
        try:
            pairs = parse_query(raw_query)
            params = validate_postback(pairs, token=token, required=required)
            _check_text("the path", path)
        except PlarinError as exc:
            return exc.status, _error_body(exc.message)
        postback = self.add_postback(path, params, _masked_raw(raw_query))
        return 200, {"status": "ok", "id": postback.id}

    def fault_applies(self, spec: FaultSpec, rec: RecordedRequest) -> bool:
        if not super().fault_applies(spec, rec):
            return False
        if spec.match is None:
            return True
        given = _first_values(rec.query)
        return all(given.get(name) == value for name, value in spec.match.items())


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def create_plarin_app(
    token: str | None = None,
    state: PlarinSandbox | None = None,
    required: tuple[str, ...] = DEFAULT_REQUIRED,
) -> FastAPI:
    """Build the sandbox app; with ``token`` every postback must carry ``token=<token>``.

    ``required`` names the parameters a postback must have. The state is reachable as ``app.state.sandbox``.
    """
    if token is not None and (not token or token != token.strip()):
        raise ValueError("the token must be non-empty, without leading or trailing whitespace")
    if any(not name for name in required):
        raise ValueError("required parameter names must be non-empty")
    sandbox = state if state is not None else PlarinSandbox()
    app = FastAPI(title="Plarin postback sandbox", version="1")
    app.state.sandbox = sandbox
    kit.add_control_routes(app, sandbox)

    async def postback(request: Request) -> Response:
        raw = request.scope.get("query_string", b"")
        path: str = request.scope["path"]
        is_get = request.method == "GET"
        rec = RecordedRequest(
            method=request.method,
            path=path,
            query=_masked_pairs(raw),
            raw_query=_masked_raw(raw),
            token_ok=None if token is None or not is_get else _token_ok(raw, token),
        )

        if not is_get:

            async def refuse_method() -> Response:
                rec.message = "method not allowed"
                return JSONResponse(_error_body(rec.message), status_code=405, headers={"Allow": "GET"})

            return await sandbox.serve(request, rec, refuse_method, may_fault=False)

        # Read before serve: after a delay fault the client may be gone, and the postback still counts.
        body = await request.body()

        async def answer() -> Response:
            if body:
                status, reply = 400, _error_body("a postback GET has no body")
            else:
                with sandbox.lock:
                    status, reply = sandbox.receive(path, raw, token=token, required=required)
            rec.message = reply.get("message")
            rec.postback_id = reply.get("id")
            if status == 414:
                return Response(kit.nginx_page(414), status_code=414, media_type="text/html")
            return JSONResponse(reply, status_code=status)

        return await sandbox.serve(request, rec, answer)

    for route in (POSTBACK_PATH, POSTBACK_PATH + "/{rest:path}"):
        app.add_api_route(route, postback, methods=_METHODS, tags=["plarin"])

    @app.get("/_sandbox/postbacks", tags=["sandbox"])
    async def list_postbacks(request: Request) -> JSONResponse:
        """Accepted postbacks in arrival order, duplicates included; ``?name=value`` filters on params."""
        want = dict(request.query_params)
        with sandbox.lock:
            return JSONResponse(
                [p.to_dict() for p in sandbox.postbacks if all(p.params.get(k) == v for k, v in want.items())]
            )

    # Registered last, so every route above wins: a wrong path is recorded, not silently lost.
    @app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def elsewhere(request: Request, path: str) -> Response:
        full = "/" + path
        if full.startswith("/_sandbox/"):
            return JSONResponse({"detail": "Not Found"}, status_code=404)  # a control typo, not traffic
        raw = request.scope.get("query_string", b"")
        rec = RecordedRequest(
            method=request.method,
            path=full,
            query=_masked_pairs(raw),
            raw_query=_masked_raw(raw),
            token_ok=None,
        )

        async def answer() -> Response:
            return Response(kit.nginx_page(404), status_code=404, media_type="text/html")

        return await sandbox.serve(request, rec, answer, may_fault=False)

    return app


def _token_ok(raw: bytes, token: str) -> bool:
    """Whether the query carries exactly one ``token`` equal to ``token`` (for the log's ``token_ok``)."""
    try:
        pairs = parse_query(raw)
    except PlarinError:
        return False
    values = [value for name, value in pairs if name == TOKEN_PARAM]
    return len(values) == 1 and hmac.compare_digest(
        values[0].encode("utf-8", "surrogatepass"), token.encode("utf-8")
    )
