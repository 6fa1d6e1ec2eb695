"""Structured logging for klientiks-relay, with personal data masked and secrets removed.

Every line, whether it comes from our own structlog loggers or from a library that logs through the
stdlib ``logging`` module (uvicorn, aiokafka, faststream, httpx), goes through :func:`mask_processor`
before it is rendered: each field is masked by :func:`services.common.masking.mask_field` (secrets
replaced with ``"[secret]"`` and never written; phones, e-mails, names and URLs masked; free text, the
message and exception tracebacks included, scanned for personal data and credentials).

Usage::

    from services.common.logging import configure_logging, get_logger

    configure_logging(level="INFO")  # once, at process start-up
    log = get_logger(__name__)
    log.info("record created", client_phone="79991234567", salon_id=12)

Run uvicorn with ``log_config=None`` and give FastStream brokers a logger that propagates (for example
``logging.getLogger("faststream")`` after this module configured it), otherwise those libraries install
their own handlers that write past the masking.
"""

from __future__ import annotations

import logging as stdlib_logging
import sys
from typing import Final, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Re-exported: the masking functions were imported from here before services.common.masking existed.
from services.common.masking import (
    SECRET_PLACEHOLDER,
    mask_email,
    mask_field,
    mask_name,
    mask_phone,
    redact_url,
)

__all__ = [
    "SECRET_PLACEHOLDER",
    "configure_logging",
    "get_logger",
    "mask_email",
    "mask_name",
    "mask_phone",
    "mask_processor",
    "redact_url",
]

# --------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------

# Keys that belong to the logging machinery; their values are objects we must hand on untouched.
_PASSTHROUGH_KEYS: Final = frozenset({"_record", "_from_structlog", "_logger", "_name"})


def mask_processor(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: return a masked copy of *event_dict* (the input is never mutated).

    A pending ``exc_info`` is rendered to an ``exception`` string first, so tracebacks are masked too.
    """
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(logger, method_name, dict(event_dict))
    return {
        key: value if key in _PASSTHROUGH_KEYS else mask_field(key, value)
        for key, value in event_dict.items()
    }


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

# Libraries that are chatty at INFO/DEBUG. They still log warnings and errors.
_QUIET_LOGGERS: Final = (
    "alembic",
    "aiokafka",
    "httpx",
    "httpcore",
    "sqlalchemy.engine",
    "aiosqlite",
    "watchfiles",
)
# Libraries that install their own handlers (writing past our masking); we take those over.
_TAKEOVER_PREFIXES: Final = ("uvicorn", "faststream")
# Record attributes that duplicate the message: uvicorn's ANSI-coloured copy, and the attributes another
# handler's logging.Formatter may already have set on the shared record.
_DROPPED_EXTRAS: Final = ("color_message", "message", "asctime")


class _StderrHandler(stdlib_logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at emit time (survives stream swaps, e.g. in tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: stdlib_logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _parse_level(level: str) -> int:
    mapping = stdlib_logging.getLevelNamesMapping()
    name = str(level).strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in mapping:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(mapping)}")
    return mapping[name]


def _drop_extras(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    for key in _DROPPED_EXTRAS:
        event_dict.pop(key, None)
    return event_dict


def _mask_foreign(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # structlog events were masked in their own chain already; stdlib records are masked here.
    if event_dict.get("_from_structlog"):
        return event_dict
    return mask_processor(logger, method_name, event_dict)


def _is_plain_console_handler(handler: stdlib_logging.Handler) -> bool:
    return type(handler) is stdlib_logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


def _take_over_library_loggers() -> None:
    names = [
        name
        for name in list(stdlib_logging.root.manager.loggerDict)
        if name.split(".", 1)[0] in _TAKEOVER_PREFIXES
    ]
    for name in names:
        lib_logger = stdlib_logging.getLogger(name)
        for handler in list(lib_logger.handlers):
            lib_logger.removeHandler(handler)
        lib_logger.propagate = True


def configure_logging(level: str = "INFO", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    """Configure structlog and the stdlib root logger to write masked lines to stderr.

    *fmt* ``"json"`` writes one JSON object per line; ``"console"`` writes human-readable lines;
    ``"auto"`` picks console when stderr is a terminal and JSON otherwise. Safe to call more than once:
    the previous configuration is replaced, not added to.
    """
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'auto', 'json' or 'console'")
    numeric_level = _parse_level(level)
    is_tty = sys.stderr is not None and sys.stderr.isatty()
    use_json = fmt == "json" or (fmt == "auto" and not is_tty)

    renderer: Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        # Plain tracebacks: rich "pretty" tracebacks print local variables, i.e. unmasked data.
        renderer = structlog.dev.ConsoleRenderer(
            colors=is_tty, exception_formatter=structlog.dev.plain_traceback
        )

    common: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *common,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            mask_processor,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        context_class=dict,
        logger_factory=structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__]),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger created (and used) before configure_logging() must pick up the masking.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*common, structlog.stdlib.ExtraAdder(), _drop_extras],
        processors=[_mask_foreign, structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)

    root = stdlib_logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _StderrHandler) or _is_plain_console_handler(old):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    _take_over_library_loggers()
    for name in _QUIET_LOGGERS:
        stdlib_logging.getLogger(name).setLevel(max(numeric_level, stdlib_logging.WARNING))


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger backed by the stdlib logger *name* (the caller's module when omitted)."""
    if name is None:
        return structlog.stdlib.get_logger()
    return structlog.stdlib.get_logger(name)
