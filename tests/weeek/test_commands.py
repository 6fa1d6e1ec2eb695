"""`relay weeek funnels` and `relay weeek statuses --funnel ID` against the sandbox Weeek over HTTP.

The commands run in typer's CliRunner on a worker thread (they call ``asyncio.run``) while the sandbox is
served by uvicorn in the test's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from services.cli import app
from services.sandbox.weeek import API_PREFIX, SEED_STATUS_NAMES, WeeekSandbox, create_weeek_app, funnel_id
from tests.support import SOURCE_TOKEN, serve_app, write_config
from tests.weeek.support import FUNNEL, NEW, STALE, TOKEN


@dataclass
class Served:
    sandbox: WeeekSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = WeeekSandbox()
    async with serve_app(create_weeek_app({TOKEN}, sandbox)) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[WeeekSandbox]:
    served.sandbox.reset()
    yield served.sandbox
    served.sandbox.reset()


async def relay(config: Path, *args: str, token: str = TOKEN, **extra: str) -> Result:
    env = {
        "RELAY_CONFIG": str(config),
        "RELAY_TEST_WEEEK_KEY": token,
        "RELAY_TEST_SOURCE_TOKEN": SOURCE_TOKEN,
        "COLUMNS": "200",
        **extra,
    }

    def invoke() -> Result:
        return CliRunner().invoke(app, ["weeek", *args], env=env)

    return await asyncio.to_thread(invoke)


def _two_connections(tmp_path: Path, url: str) -> Path:
    conn: dict[str, Any] = {"target": "weeek", "base_url": url + API_PREFIX, "token": "${RELAY_TEST_WEEEK_KEY}",
                            "status_id": NEW}  # fmt: skip
    source = {"name": "salon", "token": "${RELAY_TEST_SOURCE_TOKEN}",
              "connections": [{**conn, "name": "main"}, {**conn, "name": "second"}]}  # fmt: skip
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


async def test_funnels_lists_the_seeded_funnel(tmp_path: Path, served: Served, sandbox: WeeekSandbox) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    result = await relay(config, "funnels")
    assert result.exit_code == 0, result.output
    assert "Weeek funnels" in result.output
    assert FUNNEL in result.output
    assert "Продажи" in result.output
    assert TOKEN not in result.output
    [request] = sandbox.requests
    assert (request.method, request.route, request.status, request.token_valid) == (
        "GET",
        "/crm/funnels",
        200,
        True,
    )


async def test_statuses_lists_the_funnels_statuses_in_order(
    tmp_path: Path, served: Served, sandbox: WeeekSandbox
) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    result = await relay(config, "statuses", "--funnel", FUNNEL)
    assert result.exit_code == 0, result.output
    assert f"Statuses of funnel {FUNNEL}" in result.output
    assert NEW in result.output
    positions = [result.output.index(name) for name in SEED_STATUS_NAMES]
    assert positions == sorted(positions)
    for status in sandbox.statuses.values():
        assert status.id in result.output


async def test_an_unknown_funnel_is_a_clear_error(
    tmp_path: Path, served: Served, sandbox: WeeekSandbox
) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    result = await relay(config, "statuses", "--funnel", STALE)
    assert result.exit_code == 1
    assert "HTTP 404" in result.output
    assert STALE in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("funnel", ["../funnels", "a b", "id?x=1", ""])
async def test_a_malformed_funnel_id_is_refused_before_any_call(
    tmp_path: Path, served: Served, sandbox: WeeekSandbox, funnel: str
) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    result = await relay(config, "statuses", "--funnel", funnel)
    assert result.exit_code == 2
    assert "--funnel" in result.output
    assert sandbox.requests == []


async def test_statuses_needs_a_funnel(tmp_path: Path, served: Served, sandbox: WeeekSandbox) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    result = await relay(config, "statuses")
    assert result.exit_code == 2
    assert "--funnel" in result.output


async def test_a_refused_token_is_a_clear_error(
    tmp_path: Path, served: Served, sandbox: WeeekSandbox
) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    result = await relay(config, "funnels", token="revoked-token-0123456789")
    assert result.exit_code == 1
    assert "HTTP 401: the Weeek token was refused" in result.output
    assert "revoked-token-0123456789" not in result.output


async def test_an_unreachable_weeek_is_a_clear_error(tmp_path: Path, sandbox: WeeekSandbox) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": "http://127.0.0.1:9"})
    result = await relay(config, "funnels")
    assert result.exit_code == 1
    assert "Weeek is unreachable" in result.output


async def test_two_connections_need_connection(tmp_path: Path, served: Served, sandbox: WeeekSandbox) -> None:
    config = _two_connections(tmp_path, served.url)
    result = await relay(config, "funnels")
    assert result.exit_code == 2
    assert "2 Weeek connections" in result.output
    assert "--connection" in result.output
    assert "salon/main" in result.output
    assert "salon/second" in result.output
    assert sandbox.requests == []
    chosen = await relay(config, "statuses", "--funnel", FUNNEL, "--connection", "salon/second")
    assert chosen.exit_code == 0, chosen.output
    assert NEW in chosen.output
    wrong = await relay(config, "funnels", "--connection", "salon/third")
    assert wrong.exit_code == 2
    assert "no Weeek connection 'salon/third'" in wrong.output
    assert "salon/main" in wrong.output


async def test_a_config_without_weeek_is_a_clear_error(tmp_path: Path, sandbox: WeeekSandbox) -> None:
    config = write_config(tmp_path / "relay.yaml", urls={"cpahouse": "http://127.0.0.1:9"})
    result = await relay(config, "funnels", RELAY_TEST_CPAHOUSE_KEY="cpa-secret-key-0123456789")
    assert result.exit_code == 2
    assert "the config has no Weeek connection" in result.output


async def test_ids_are_printed_whole_in_an_80_column_terminal(
    tmp_path: Path, served: Served, sandbox: WeeekSandbox
) -> None:
    long_funnel = "Запись на процедуры в салоне"
    sandbox.add_funnel(long_funnel, ["Клиент подтвердил запись по телефону", "Отказ"])
    config = write_config(tmp_path / "relay.yaml", urls={"weeek": served.url})
    funnels = await relay(config, "funnels", COLUMNS="80")
    assert funnels.exit_code == 0, funnels.output
    assert FUNNEL in funnels.output
    assert funnel_id(long_funnel) in funnels.output
    statuses = await relay(config, "statuses", "--funnel", funnel_id(long_funnel), COLUMNS="80")
    for status in sandbox.statuses.values():
        if status.funnel_id == funnel_id(long_funnel):
            assert status.id in statuses.output
