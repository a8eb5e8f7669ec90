"""Real PostgreSQL for the tests: one database per test run (per xdist worker), emptied per test.

The server is the machine's own (127.0.0.1:5432, trust authentication, user postgres; `.ci/run`
starts it when it is down; `CRM_BRIDGE_TEST_PG` names another). Each worker creates
`crm_bridge_test_<worker>_<random>`, migrates it once and drops it at the end; every test that
asks for `pg_url` starts from empty tables. Without a server the PostgreSQL tests skip on a
laptop, and fail in CI (`CI` set), where a skipped backend would be a silent hole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from bridge.store.postgres import PostgresStore

SERVER = os.environ.get("CRM_BRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
TABLES = "events, deliveries, contact_state, webhook_messages, rate_starts, rate_windows"


def _run(coro: Any) -> Any:
    # On a thread of its own: the fixtures are also reached from async fixtures, whose loop runs.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{SERVER}/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _empty(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database(worker_id: str) -> Iterator[str]:
    """The URL of this test run's own database, migrated."""
    name = f"crm_bridge_test_{worker_id}_{secrets.token_hex(4)}"
    try:
        _run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"PostgreSQL is not reachable at {SERVER}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    url = f"{SERVER}/{name}"
    try:
        _run(PostgresStore(url).migrate())
        yield url
    finally:
        _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """The run's database, its tables emptied for this test."""
    _run(_empty(pg_database))
    return pg_database


def fetch(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one query on a test database (beside running daemons)."""

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return list(_run(run()))


def store_yaml(backend: str, request: pytest.FixtureRequest, db_path: Any) -> str:
    """The `store:` block of a test config for `backend`."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
        return f"store:\n  url: {url}\n  pool_min: 1\n  pool_max: 4\n"
    return f"store:\n  type: sqlite\n  path: {db_path}\n"


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_config(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """The `store:` block of a test config, once per backend."""
    return store_yaml(request.param, request, tmp_path / "bridge.db")
