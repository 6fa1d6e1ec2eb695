"""Unit tests for services.common.config: the YAML file, references to secrets, RELAY_* overrides, errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from services.common.config import ConfigError, Settings, load_settings, target_connections
from services.common.events import EventName
from services.maxma.settings import MaxmaConnection

SALON_TOKEN = "salon-token-0123456789abcdef"
CLINIC_TOKEN = "clinic-token-9876543210fedcba"
MAXMA_KEY = "mx-processing-key-5f1e2d3c"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELAY_* variable from the developer's shell may leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    for name in ("SALON_TOKEN", "CLINIC_TOKEN", "MAXMA_KEY"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def problems(err: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(err.value)


VALID = f"""
database_url: sqlite+aiosqlite:///relay-test.db
kafka:
  bootstrap_servers: kafka-0.kafka:9092
  enable_idempotence: false
sources:
  - name: salon
    token: {SALON_TOKEN}
    timezone: Europe/Moscow
    phone_region: ru
    connections:
      - target: maxma
        events:
          client-created: new-client
          appointment-created: new-client
        processing_key: {MAXMA_KEY}
        rate_limit_per_s: 5
  - name: clinic-almaty
    token: {CLINIC_TOKEN}
    timezone: Asia/Almaty
    phone_region: KZ
    klientiks:
      account_id: "3301"
      user_id: "17"
      access_token: klientiks-access-token-abc
"""


def test_valid_file_with_two_sources_and_a_maxma_connection(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    s = load_settings(path)
    assert s.config == path
    assert s.database_url == "sqlite+aiosqlite:///relay-test.db"
    assert s.kafka.bootstrap_servers == "kafka-0.kafka:9092"
    assert s.kafka.enable_idempotence is False
    assert s.kafka.request_timeout_ms == 5000  # a default kept
    assert [src.name for src in s.sources] == ["salon", "clinic-almaty"]
    salon, clinic = s.sources
    assert salon.token.get_secret_value() == SALON_TOKEN
    assert salon.phone_region == "RU"  # upper-cased
    assert str(salon.zone) == "Europe/Moscow"
    assert clinic.phone_region == "KZ"
    assert str(clinic.zone) == "Asia/Almaty"
    assert clinic.klientiks is not None
    assert clinic.klientiks.account_id == "3301"
    assert clinic.klientiks.access_token.get_secret_value() == "klientiks-access-token-abc"
    assert clinic.connections == []
    (conn,) = salon.connections
    assert conn.target == "maxma"
    assert conn.name == "maxma"  # defaults to the target
    assert conn.events == {
        EventName.CLIENT_CREATED: "new-client",
        EventName.APPOINTMENT_CREATED: "new-client",
    }
    assert s.source("clinic-almaty") is clinic
    with pytest.raises(KeyError):
        s.source("nope")


def test_config_from_relay_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, VALID)
    monkeypatch.setenv("RELAY_CONFIG", str(path))
    s = load_settings()
    assert [src.name for src in s.sources] == ["salon", "clinic-almaty"]


def test_no_file_gives_defaults() -> None:
    s = load_settings()
    assert s.sources == []
    assert s.config is None
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"


def test_env_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALON_TOKEN", SALON_TOKEN)
    monkeypatch.setenv("KAFKA_HOST", "broker.internal")
    path = write(
        tmp_path,
        """
        kafka:
          bootstrap_servers: ${KAFKA_HOST}:9092
        sources:
          - name: salon
            token: ${SALON_TOKEN}
        """,
    )
    s = load_settings(path)
    assert s.sources[0].token.get_secret_value() == SALON_TOKEN
    assert s.kafka.bootstrap_servers == "broker.internal:9092"


def test_env_default_used_only_when_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"""
        sources:
          - name: salon
            token: ${{SALON_TOKEN:-{SALON_TOKEN}}}
            timezone: ${{SALON_TZ:-Europe/Samara}}
        """
    path = write(tmp_path, text)
    s = load_settings(path)
    assert s.sources[0].token.get_secret_value() == SALON_TOKEN
    assert s.sources[0].timezone == "Europe/Samara"
    monkeypatch.setenv("SALON_TZ", "Asia/Yekaterinburg")
    assert load_settings(path).sources[0].timezone == "Asia/Yekaterinburg"


def test_file_reference_relative_to_the_yaml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "salon-token").write_text(SALON_TOKEN + "\n", encoding="utf-8")
    (conf_dir / "secrets" / "maxma-key").write_text(MAXMA_KEY, encoding="utf-8")
    path = write(
        conf_dir,
        """
        sources:
          - name: salon
            token: ${file:secrets/salon-token}
            connections:
              - target: maxma
                events: {client-created: new-client}
                processing_key: ${file:secrets/maxma-key}
        """,
    )
    # The working directory must not matter.
    monkeypatch.chdir(tmp_path)
    s = load_settings(path)
    assert s.sources[0].token.get_secret_value() == SALON_TOKEN  # trailing newline stripped
    ((_, conn),) = target_connections(s, "maxma", MaxmaConnection)
    assert conn.processing_key.get_secret_value() == MAXMA_KEY


def test_missing_secret_file_names_path_and_fix(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sources:
          - name: salon
            token: ${file:secrets/absent}
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert str(path) in msg
    assert "sources[0].token" in msg
    assert str(tmp_path / "secrets" / "absent") in msg
    assert "fix:" in msg


def test_missing_env_var_names_file_path_and_export(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        sources:
          - name: salon
            token: ${SALON_TOKEN}
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert msg.startswith(str(path))
    assert "sources[0].token" in msg
    assert "SALON_TOKEN" in msg
    assert "export SALON_TOKEN=" in msg
    assert e.value.file == str(path)
    assert len(e.value.problems) == 1


def test_unknown_key_names_path_and_fix(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            time_zone: Europe/Moscow
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert str(path) in msg
    assert "sources[0].time_zone" in msg
    assert "fix: remove it, or check its spelling" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "sourcez: []\n")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "sourcez" in problems(e)
    assert "fix:" in problems(e)


def test_bad_time_zone_suggests_iana_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            timezone: Europe/Moskow
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert "sources[0].timezone" in msg
    assert "Europe/Moskow" in msg
    assert "IANA" in msg
    assert "Europe/Moscow" in msg


def test_bad_phone_region(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            phone_region: RUS
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "sources[0].phone_region" in problems(e)
    assert "ISO 3166" in problems(e)


@pytest.mark.parametrize(
    "token", ["short-token", "has spaces in it 0123456789", "токен-кириллицей-0123456789"]
)
def test_short_or_unsafe_token(tmp_path: Path, token: str) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: "{token}"
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert "sources[0].token" in msg
    assert "at least 16" in msg
    assert "relay token" in msg
    assert token not in msg  # the secret is never echoed


def test_bad_source_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: Салон Центр
            token: {SALON_TOKEN}
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "sources[0].name" in problems(e)
    assert "fix: rename it" in problems(e)


def test_duplicate_source_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
          - name: salon
            token: {CLINIC_TOKEN}
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert "unique" in msg
    assert "salon" in msg
    assert "fix: rename one" in msg


def test_two_sources_sharing_a_token(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
          - name: clinic
            token: {SALON_TOKEN}
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert "share a token" in msg
    assert SALON_TOKEN not in msg


def test_two_connections_with_the_same_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            connections:
              - target: maxma
                events: {{client-created: new-client}}
                processing_key: {MAXMA_KEY}
              - target: maxma
                events: {{appointment-created: new-client}}
                processing_key: other-key
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "same name" in problems(e)
    assert "name:" in problems(e)


def test_unknown_event_and_target_in_a_connection(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            connections:
              - target: amocrm
                events: {{client-created: new-client}}
              - target: maxma
                events: {{client-deleted: new-client}}
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert "sources[0].connections[0].target" in msg
    assert "sources[0].connections[1].events.client-deleted" in msg


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
           timezone: Europe/Moscow
        """,
    )
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = problems(e)
    assert str(path) in msg
    assert "line 4, column 4" in msg
    assert "not valid YAML" in msg


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- salon\n- clinic\n")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "must be a mapping" in problems(e)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "absent.yaml")
    assert "absent.yaml" in problems(e)
    assert "RELAY_CONFIG" in problems(e)


def test_relay_env_vars_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, VALID)
    monkeypatch.setenv("RELAY_DATABASE_URL", "postgresql+asyncpg://relay@db/relay")
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", "kafka-env:9093")
    s = load_settings(path)
    assert s.database_url == "postgresql+asyncpg://relay@db/relay"
    assert s.kafka.bootstrap_servers == "kafka-env:9093"
    # The rest of the file's kafka section is kept, not reset to defaults.
    assert s.kafka.enable_idempotence is False
    assert [src.name for src in s.sources] == ["salon", "clinic-almaty"]


def test_bad_env_override_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, VALID)
    monkeypatch.setenv("RELAY_KAFKA__REQUEST_TIMEOUT_MS", "soon")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "kafka.request_timeout_ms" in problems(e)
    assert "whole number" in problems(e)


def test_secrets_are_not_in_repr_or_str(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, VALID))
    for text in (repr(s), str(s), repr(s.sources[0]), str(s.sources)):
        assert SALON_TOKEN not in text
        assert CLINIC_TOKEN not in text
        assert "klientiks-access-token-abc" not in text
        assert MAXMA_KEY not in text
    assert "**********" in repr(s)


def test_target_connections_returns_typed_maxma_connections(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, VALID))
    found = list(target_connections(s, "maxma", MaxmaConnection))
    assert len(found) == 1
    source, conn = found[0]
    assert source.name == "salon"
    assert isinstance(conn, MaxmaConnection)
    assert conn.processing_key.get_secret_value() == MAXMA_KEY
    assert conn.base_url == "https://api.maxma.com"
    assert conn.rate_limit_per_s == 5
    assert conn.events[EventName.CLIENT_CREATED] == "new-client"
    assert list(target_connections(s, "weeek", MaxmaConnection)) == []


def test_target_connections_skips_disabled(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            connections:
              - target: maxma
                enabled: false
                events: {{client-created: new-client}}
        """,
    )
    # Disabled: not validated, not returned (the missing processing_key does not matter).
    assert list(target_connections(load_settings(path), "maxma", MaxmaConnection)) == []


def test_target_connections_missing_processing_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            connections:
              - target: maxma
                events: {{client-created: new-client}}
        """,
    )
    s = load_settings(path)  # target keys are checked by the target's service
    with pytest.raises(ConfigError) as e:
        list(target_connections(s, "maxma", MaxmaConnection))
    msg = problems(e)
    assert str(path) in msg
    assert "sources[0].connections[0].processing_key" in msg
    assert "fix: add this key" in msg


def test_target_connections_unknown_action(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            connections:
              - target: maxma
                events: {{client-created: create-order}}
                processing_key: {MAXMA_KEY}
        """,
    )
    s = load_settings(path)
    with pytest.raises(ConfigError) as e:
        list(target_connections(s, "maxma", MaxmaConnection))
    msg = problems(e)
    assert "sources[0].connections[0].events.client-created" in msg
    assert "new-client" in msg
    assert "fix: use one of the values listed" in msg


def test_target_connections_unknown_maxma_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        sources:
          - name: salon
            token: {SALON_TOKEN}
            connections:
              - target: maxma
                events: {{client-created: new-client}}
                processing_key: {MAXMA_KEY}
                procesing_timeout: 5
        """,
    )
    with pytest.raises(ConfigError) as e:
        list(target_connections(load_settings(path), "maxma", MaxmaConnection))
    assert "sources[0].connections[0].procesing_timeout" in problems(e)


def test_settings_are_frozen(tmp_path: Path) -> None:
    s: Settings = load_settings(write(tmp_path, VALID))
    with pytest.raises(ValueError, match="frozen"):
        s.database_url = "x"  # type: ignore[misc]


# The phone index key (issue 8, part 7)

PHONE_KEY = "phone-index-key-0123456789abcdef-xyz"


def test_phone_hash_key_from_a_secret_file_is_secret(tmp_path: Path) -> None:
    (tmp_path / "phone-key").write_text(PHONE_KEY + "\n")
    settings = load_settings(write(tmp_path, "phone_hash_key: ${file:phone-key}\n"))
    assert settings.phone_hash_key is not None
    assert settings.phone_hash_key.get_secret_value() == PHONE_KEY
    assert PHONE_KEY not in repr(settings)


def test_phone_hash_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_PHONE_HASH_KEY", PHONE_KEY)
    key = load_settings().phone_hash_key
    assert key is not None
    assert key.get_secret_value() == PHONE_KEY


def test_phone_hash_key_unset_or_empty_means_no_phone_index(tmp_path: Path) -> None:
    assert load_settings().phone_hash_key is None
    assert load_settings(write(tmp_path, "phone_hash_key: ${PHONE_KEY:-}\n")).phone_hash_key is None


def test_short_phone_hash_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "phone_hash_key: short-key-123\n"))
    assert "phone_hash_key: phone_hash_key must be at least 32 characters" in problems(err)
    assert "fix: generate one with `relay token`" in problems(err)
    assert "short-key-123" not in problems(err)
