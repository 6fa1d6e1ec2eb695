"""What the benchmarks share: the embedded stack's config and environment, process and HTTP helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from services.common import targets

TOKEN = "bench-token-0123456789abcdef"
KEY = "bench-processing-key-0123456789"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Where a benchmark creates its PostgreSQL database: a local server that trusts user postgres (or root).
PG_ADMIN_DSNS = (
    (os.environ["BENCH_PG_DSN"],)
    if os.environ.get("BENCH_PG_DSN")
    else ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://root@127.0.0.1:5432/postgres")
)


def maxma_config(work: Path, sandbox_url: str | None, source: str = "bench") -> Path:
    """A config with one source and, if ``sandbox_url`` is given, its Maxma connection; secrets referenced."""
    return target_config(work, {"maxma": sandbox_url} if sandbox_url else {}, source)


def target_config(work: Path, urls: dict[str, str], source: str = "bench") -> Path:
    """One source with a connection to each target in ``urls``: the registry's demo connection of each, its
    secret in the file ``key`` (every sandbox is started with the same key)."""
    (work / "key").write_text(KEY)
    connections = []
    for name, url in urls.items():
        demo = targets.get(name).demo
        assert demo is not None, f"{name} declares no demo connection"
        connections.append(demo(url, "${file:key}"))
    src: dict[str, Any] = {"name": source, "token": "${BENCH_TOKEN}"}
    if connections:
        src["connections"] = connections
    config = work / "relay.yaml"
    config.write_text(yaml.safe_dump({"sources": [src]}, allow_unicode=True, sort_keys=False))
    return config


def relay_env(
    config: Path, bootstrap: str, work: Path, *, database_url: str | None = None, **extra: str
) -> dict[str, str]:
    """The environment of a `relay` role on the embedded stack (no RELAY_* of the caller leaks in).

    The ledger is SQLite in ``work`` unless ``database_url`` names another (a PostgreSQL one).
    """
    return (
        {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        | {
            "RELAY_CONFIG": str(config),
            "RELAY_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RELAY_KAFKA__ENABLE_IDEMPOTENCE": "false",
            "RELAY_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{work}/relay.db",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_LOG_FORMAT": "json",
            # The benchmarks measure the system, not the per-source webhook rate limit.
            "RELAY_INGEST__RATE_LIMIT_PER_S": "1000000",
            "RELAY_INGEST__RATE_LIMIT_BURST": "1000000",
            "BENCH_TOKEN": TOKEN,
        }
        | extra
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_times(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system; all threads) the process has used so far; NaN once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan"), float("nan")
    # Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    return sum(cpu_times(pid))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stop_proc(p: subprocess.Popen[bytes], timeout: float = 25) -> None:
    """SIGTERM, wait, then kill: a benchmark never leaves a process behind."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def wait_http(url: str, status: int = 200, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url, timeout=1)).status_code == status:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer {status}")


@contextlib.asynccontextmanager
async def pg_database(name: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database ``name`` (one left by a killed run is dropped first); yields its
    SQLAlchemy URL and drops it afterwards, also on failure."""
    import asyncpg  # type: ignore[import-untyped]

    dsn = None
    for candidate in PG_ADMIN_DSNS:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await (await asyncpg.connect(candidate, timeout=5)).close()
            dsn = candidate
            break
    if dsn is None:
        raise RuntimeError(
            f"no PostgreSQL server trusts us at {' or '.join(PG_ADMIN_DSNS)} (set BENCH_PG_DSN)"
        )

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{dsn.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def pg_pids(url: str) -> list[int]:
    """The server processes working for the database at ``url`` (SQLAlchemy URL): its backends (this query's
    own left out) and the WAL writer, checkpointer and background writer, which its commits also keep busy."""
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND pid <> pg_backend_pid())"
            " OR backend_type IN ('walwriter', 'checkpointer', 'background writer')"
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]
