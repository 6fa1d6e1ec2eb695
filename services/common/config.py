"""Settings: one YAML file (``RELAY_CONFIG``) plus ``RELAY_*`` environment variables.

Secrets are referenced, never written in the file: ``${ENV_NAME}``, ``${ENV_NAME:-default}`` or
``${file:/path/to/secret}``. Every error names the file, the path inside it and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from services.common.events import EventName

# The product's targets (each has its DLQ topic); more can be registered (services/common/targets.py).
TARGETS = ("maxma", "cpahouse", "weeek", "plarin")
_REGISTERED: set[str] = set()


def known_targets() -> tuple[str, ...]:
    """The product's targets, then any registered at run time (a test's, a plugin's)."""
    return TARGETS + tuple(sorted(_REGISTERED - set(TARGETS)))


def add_target_name(name: str) -> None:
    """Let connections name ``name`` (called by the target registry)."""
    _REGISTERED.add(name)


_REF = re.compile(r"\$\{(file:[^}]+|[A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Target-specific connection keys stay plain strings until the target's model types them; mask these in repr.
_SECRET_KEY = re.compile(r"(key|token|secret|password|postback_url)$", re.IGNORECASE)
MIN_TOKEN_LENGTH = 16
# The phone index key: `relay token` makes 32 characters (192 random bits).
MIN_PHONE_KEY_LENGTH = 32


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is the message for the operator (file, path, fix)."""

    def __init__(self, problems: Sequence[str], file: str | None = None) -> None:
        self.problems = list(problems)
        self.file = file
        where = file or "configuration"
        lines = [f"{where}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KlientiksApi(Strict):
    """Klientiks REST API credentials of a source (enrichment of thin webhooks)."""

    account_id: str
    user_id: str
    access_token: SecretStr
    base_url: str = "https://klientiks.ru/clientix/Restapi"
    rate_limit_per_s: float = Field(1.0, gt=0)


class ConnectionConfig(BaseModel):
    """A source's link to one target. Target-specific keys are validated by that target's service."""

    model_config = ConfigDict(extra="allow", frozen=True)

    target: str
    name: str = ""
    enabled: bool = True
    # Klientiks event -> target action, e.g. {"client-created": "new-client"}; unset: the target's default.
    events: dict[EventName, str] | None = None
    rate_limit_per_s: float | None = Field(None, gt=0)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for k, v in super().__repr_args__():
            yield k, (SecretStr(v) if k and isinstance(v, str) and _SECRET_KEY.search(k) else v)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v not in known_targets():
            raise ValueError(f"unknown target {v!r}; fix: use one of {', '.join(known_targets())}")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> ConnectionConfig:
        if not self.name:
            object.__setattr__(self, "name", self.target)
        return self


class SourceConfig(Strict):
    """One Klientiks account sending webhooks."""

    name: str
    token: SecretStr
    timezone: str = "Europe/Moscow"
    phone_region: str = "RU"
    klientiks: KlientiksApi | None = None
    # Webhooks per second this source may send; unset: `ingest.rate_limit_per_s`.
    rate_limit_per_s: float | None = Field(None, gt=0)
    connections: list[ConnectionConfig] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"source name {v!r} must be lowercase letters, digits, '-' or '_' (it is part of Kafka keys); "
                "fix: rename it, e.g. 'salon-center'"
            )
        return v

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < MIN_TOKEN_LENGTH or not re.fullmatch(
            r"[A-Za-z0-9_-]+", v.get_secret_value()
        ):
            raise ValueError(
                f"token must be at least {MIN_TOKEN_LENGTH} URL-safe characters (it is the webhook credential); "
                "fix: generate one with `relay token`"
            )
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r}; fix: use an IANA name such as 'Europe/Moscow'"
            ) from None
        return v

    @field_validator("phone_region")
    @classmethod
    def _region(cls, v: str) -> str:
        v = v.upper()
        if v not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {v!r}; fix: use an ISO 3166 code such as 'RU' or 'KZ'")
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class KafkaSettings(Strict):
    bootstrap_servers: str = "127.0.0.1:9092"
    # Real Kafka: on. Tansu (embedded) cannot do idempotent producers.
    enable_idempotence: bool = True
    # A dead broker must surface fast on the ingest path.
    request_timeout_ms: int = Field(5000, ge=500)
    # Tansu joins a group in session_timeout_ms / 2.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    # Tansu does not wake a waiting fetch when data arrives.
    fetch_max_wait_ms: int = Field(20, ge=1)
    replication_factor: int = Field(1, ge=1)
    partitions: dict[str, int] = Field(default_factory=dict)
    client_id: str = "klientiks-relay"
    # A consumer failing, or not committing while records wait, this long is not ready (/readyz 503).
    stall_after_s: float = Field(120.0, gt=0)


class DeliverySettings(Strict):
    """The delivery runtime shared by every target service."""

    # Deliveries waiting on their target at once, per process.
    max_in_flight: int = Field(100, ge=1)
    # Records held in memory before the partitions are paused (memory stays bounded).
    max_buffered: int = Field(1000, ge=10)
    retry_schedule: str = "0,5s,5m,30m,2h,5h,10h,10h"
    retry_jitter: float = Field(0.2, ge=0, lt=1)
    # At least this long after a 429 or a timeout.
    throttle_floor_s: float = Field(60.0, ge=0)
    # A retry due sooner than this waits in memory; a later one is parked in the ledger.
    hold_in_memory_s: float = Field(10.0, ge=0)
    circuit_failures: int = Field(5, ge=1)
    circuit_open_s: float = Field(30.0, gt=0)
    circuit_max_open_s: float = Field(600.0, gt=0)
    commit_interval_s: float = Field(0.5, gt=0)
    park_poll_s: float = Field(1.0, gt=0)
    # How long SIGTERM or a rebalance waits for attempts already on the wire.
    shutdown_grace_s: float = Field(20.0, gt=0)

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        from services.common.delivery.policy import parse_schedule

        parse_schedule(v)
        return v


class IngestSettings(Strict):
    """The ingest API and the normalizer."""

    # Kafka must confirm a webhook within this long, or it goes to the spool (the issue caps it at 5 s).
    publish_timeout_s: float = Field(5.0, gt=0, le=5)
    # Webhooks per second per source token (token bucket); a source may set its own.
    rate_limit_per_s: float = Field(100.0, gt=0)
    rate_limit_burst: int = Field(200, ge=1)
    # Identical webhooks received within this window become one event.
    dedupe_window_s: float = Field(600.0, ge=0)
    # Thin webhooks of one source waiting for the Klientiks API at most; past it they go to quarantine
    # (`enrichment_backlog`), so a burst cannot grow without bound. At ~1 API request/s, 100 is minutes.
    enrichment_backlog: int = Field(100, ge=1)
    # Spooled webhooks published per round when Kafka is back.
    spool_batch: int = Field(500, ge=1)
    # The ingest API's connection limits (services/ingest/server.py): request line and headers over
    # max_header_bytes are 431; headers not complete header_timeout_s after the connection opened (or the
    # request's first byte, on a kept-alive connection) are 408, and so is a webhook body not read in full
    # within body_timeout_s; an idle kept-alive connection closes after keepalive_timeout_s; a connection
    # past max_connections is answered 503 with Retry-After and closed.
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    body_timeout_s: float = Field(10.0, gt=0, le=300)
    keepalive_timeout_s: float = Field(5.0, gt=0, le=3600)
    max_connections: int = Field(1000, ge=1)


# The events topic and the dead-letter topics keep records this long (services/common/kafka.py): an idempotency
# key purged sooner could let a redelivered or replayed event reach its target twice.
REPLAYABLE_DAYS = 30.0


class RetentionSettings(Strict):
    """How long the ledger keeps each kind of row, in days (null: for ever), and how the purge runs."""

    # `events`: the raw webhook request and what it was normalized to (by `received_at`).
    events_days: float | None = Field(30.0, gt=0)
    # `delivery_attempts` (by `started_at`): vendor answers, errors.
    attempts_days: float | None = Field(90.0, gt=0)
    # Settled `deliveries` (delivered or failed; by `updated_at`), with their attempts and steps: the
    # idempotency keys. For ever by default: a key must live as long as the target's object does.
    deliveries_days: float | None = Field(None, gt=0)
    # `entity_map` (by `updated_at`): the target's id of a client or visit; never an in-doubt create.
    entities_days: float | None = Field(None, gt=0)
    # How often the normalizer purges, and rows per transaction (short locks on SQLite and PostgreSQL).
    interval_s: float = Field(3600.0, gt=0)
    batch: int = Field(1000, ge=1, le=10_000)  # the ledger's MAX_PURGE_BATCH: one bound parameter a row

    @field_validator("events_days", "attempts_days", "deliveries_days", "entities_days", mode="before")
    @classmethod
    def _forever(cls, v: Any) -> Any:
        # An environment variable cannot be YAML's null: `RELAY_RETENTION__EVENTS_DAYS=null` (or empty) is.
        return None if isinstance(v, str) and v.strip().lower() in {"", "null", "none"} else v

    @field_validator("deliveries_days")
    @classmethod
    def _keys_outlive_replays(cls, v: float | None) -> float | None:
        if v is not None and v < REPLAYABLE_DAYS:
            raise ValueError(
                f"deliveries_days must be at least {REPLAYABLE_DAYS:g}: Kafka keeps events and dead letters that "
                "long, and one replayed after its idempotency key is gone reaches the target twice; "
                f"fix: use {REPLAYABLE_DAYS:g} or more, or null to keep the keys"
            )
        return v


class Settings(BaseSettings):
    """Process settings: the YAML file first, ``RELAY_*`` variables override (``RELAY_KAFKA__BOOTSTRAP_SERVERS``)."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    config: Path | None = None
    kafka: KafkaSettings = KafkaSettings()
    delivery: DeliverySettings = DeliverySettings()
    ingest: IngestSettings = IngestSettings()
    retention: RetentionSettings = RetentionSettings()
    database_url: str = "sqlite+aiosqlite:///relay.db"
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    # Test-only crash points (see services.common.failpoints); empty in production.
    failpoints: frozenset[str] = frozenset()
    # HMAC key of the ledger's phone index; unset: events are not findable by phone (nothing weaker is kept).
    phone_hash_key: SecretStr | None = None
    # The ingest API's gc.freeze() after start-up (services/common/heap.py); off only to measure it. The
    # normalizer and the delivery services measured no difference with it (docs/benchmarks.md).
    gc_freeze: bool = True
    sources: list[SourceConfig] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, the opposite of pydantic-settings' default.
        return (env_settings, init_settings)

    @field_validator("phone_hash_key")
    @classmethod
    def _phone_key(cls, v: SecretStr | None) -> SecretStr | None:
        # `${PHONE_KEY:-}` left empty on purpose means "not set", not a one-character key.
        if v is None or not v.get_secret_value().strip():
            return None
        if len(v.get_secret_value().strip()) < MIN_PHONE_KEY_LENGTH:
            raise ValueError(
                f"phone_hash_key must be at least {MIN_PHONE_KEY_LENGTH} characters (a short key can be "
                "guessed, and with it every phone in the index); fix: generate one with `relay token`"
            )
        return SecretStr(v.get_secret_value().strip())

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}; fix: rename one")
        tokens = [s.token.get_secret_value() for s in self.sources]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two sources share a token; fix: give each source its own `relay token`")
        for s in self.sources:
            cnames = [c.name for c in s.connections]
            if len(set(cnames)) != len(cnames):
                raise ValueError(
                    f"source {s.name!r} has two connections with the same name; "
                    "fix: set `name:` on each connection to the same target"
                )
        return self

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def _resolve(value: str, path: str, base: Path) -> tuple[str, list[str]]:
    problems: list[str] = []

    def sub(m: re.Match[str]) -> str:
        ref, default = m.group(1).strip(), m.group(2)
        if ref.startswith("file:"):
            f = Path(ref[5:].strip())
            f = f if f.is_absolute() else base / f
            try:
                return f.read_text(encoding="utf-8").strip()
            except OSError as e:
                problems.append(
                    f"{path}: cannot read secret file {str(f)!r} ({e.strerror}); fix: mount or create it"
                )
                return ""
        if ref in os.environ:
            return os.environ[ref]
        if default is not None:
            return default
        problems.append(
            f"{path}: environment variable {ref} is not set; fix: export {ref}=... or use ${{{ref}:-default}}"
        )
        return ""

    return _REF.sub(sub, value), problems


def _substitute(node: Any, path: str, base: Path, problems: list[str]) -> Any:
    if isinstance(node, str):
        value, p = _resolve(node, path or "<root>", base)
        problems.extend(p)
        return value
    if isinstance(node, Mapping):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), base, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}[{i}]", base, problems) for i, v in enumerate(node)]
    return node


def format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "model-")) or part in {"str", "int"}:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


_FIXES = {
    "missing": "add this key",
    "extra_forbidden": "remove it, or check its spelling against docs/configuration.md",
    "literal_error": "use one of the values listed",
    "enum": "use one of the values listed",
    "string_type": "quote the value as a string",
    "int_parsing": "use a whole number",
    "float_parsing": "use a number",
    "bool_parsing": "use true or false",
    "greater_than": "use a larger number",
    "too_short": "add at least one entry",
}


def validation_problems(err: ValidationError, prefix: str = "", allowed: Sequence[str] = ()) -> list[str]:
    """Turn a pydantic error into ``path: message; fix: ...`` lines (``allowed``: the keys a model takes)."""
    out = []
    for e in err.errors(include_url=False):
        loc = format_loc(e["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "<root>" else prefix
        msg = e["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(e["type"])
        if e["type"] == "extra_forbidden" and allowed:
            fix = f"remove it, or use one of the keys this takes: {', '.join(allowed)}"
        if fix and "fix:" not in msg:
            msg = f"{msg}; fix: {fix}"
        out.append(f"{loc}: {msg}")
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """Read the YAML file and resolve its ``${...}`` references."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            [f"cannot read the file ({e.strerror}); fix: set RELAY_CONFIG to an existing file"], str(path)
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(
            [f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix: check indentation and quoting"],
            str(path),
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the file must be a mapping with keys such as `sources:`"], str(path))
    problems: list[str] = []
    data = _substitute(raw, "", path.parent, problems)
    if problems:
        raise ConfigError(problems, str(path))
    return dict(data)


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from the file named by ``config`` or ``RELAY_CONFIG``; raise ConfigError."""
    path = (
        Path(config)
        if config
        else (Path(os.environ["RELAY_CONFIG"]) if os.environ.get("RELAY_CONFIG") else None)
    )
    data: dict[str, Any] = read_config_file(path) if path else {}
    data.update(overrides)
    if path:
        data["config"] = path
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(validation_problems(e), str(path) if path else "environment") from None


M = TypeVar("M", bound=BaseModel)


def target_connections(settings: Settings, target: str, model: type[M]) -> Iterator[tuple[SourceConfig, M]]:
    """Yield (source, typed connection) for every enabled connection to ``target``; raise ConfigError."""
    problems: list[str] = []
    found: list[tuple[SourceConfig, M]] = []
    for si, source in enumerate(settings.sources):
        for ci, conn in enumerate(source.connections):
            if conn.target != target or not conn.enabled:
                continue
            try:
                # Keys not written take the target model's defaults (e.g. its `events`); a key written as
                # null stays null (e.g. Weeek's `description: null` turns the description off).
                data = {**conn.model_dump(exclude_unset=True), "target": conn.target, "name": conn.name}
                found.append((source, model.model_validate(data)))
            except ValidationError as e:
                where = f"sources[{si}].connections[{ci}]"
                problems.extend(validation_problems(e, where, allowed=list(model.model_fields)))
    if problems:
        raise ConfigError(problems, str(settings.config) if settings.config else "environment")
    return iter(found)
