"""LISTEN/NOTIFY: a watcher in one process wakes when another finishes the task.

LISTEN/NOTIFY is PostgreSQL's, so this module runs on PostgreSQL only (no SQLite variant that
would skip); without DAN_TEST_POSTGRES_URL its tests skip as postgres tests."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from dan.db import create_db_engine
from dan.db.notify import NotifyListener, notify
from dan.domain import TaskKind, TaskResult
from dan.tasks.store import NewTask, SqlTaskStore
from dan.tasks.watcher import TaskWatcher, running
from tests.fixtures.postgres import schema_url

pytestmark = pytest.mark.postgres

POSTGRES_URL = os.environ.get("DAN_TEST_POSTGRES_URL")


def postgres_url() -> str:
    if not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL to run the LISTEN/NOTIFY tests")
    return POSTGRES_URL


@pytest.fixture
def db_url() -> Iterator[str]:
    """The store suite's database, on PostgreSQL only."""
    with schema_url(postgres_url()) as url:
        yield url


@pytest.fixture
def pg(db: Engine, db_url: str) -> tuple[Engine, str]:
    return db, db_url


def test_a_finished_task_wakes_a_slow_polling_watcher_at_once(pg: tuple[Engine, str]) -> None:
    db, url = pg
    replica_a, replica_b = SqlTaskStore(db), SqlTaskStore(db)
    task = NewTask(str(uuid.uuid4()), "alice", TaskKind.TXT2IMG, {})
    replica_a.submit(task, max_pending=10)

    async def scenario() -> float:
        # Polling every 30 s: only the notification can wake it within the test's time.
        watcher = TaskWatcher(replica_a, interval_s=30.0)
        loop = asyncio.get_running_loop()
        listener = NotifyListener(url, lambda tid: loop.call_soon_threadsafe(watcher.poke, tid))
        listener.start()
        try:
            assert await asyncio.to_thread(listener.listening.wait, 10)
            async with running(watcher):
                waiting = asyncio.create_task(watcher.wait(task.id, timeout_s=20))
                await asyncio.sleep(0.3)  # the watcher has looked once and now sleeps
                claimed = replica_b.claim("node:b", lease_s=30)
                assert claimed is not None
                started = time.monotonic()
                replica_b.complete(task.id, "node:b", TaskResult(("k",), (1,)))
                assert await waiting
                return time.monotonic() - started
        finally:
            listener.stop()

    assert asyncio.run(scenario()) < 5.0


def listener_threads(channel: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"listen-{channel}"]


def run_outside_a_transaction(url: str, sql: str) -> None:
    """CREATE/DROP DATABASE, which PostgreSQL refuses inside a transaction, on the server of
    ``url`` (connected to its ``postgres`` database)."""
    admin = create_db_engine(
        make_url(url).set(database="postgres").render_as_string(hide_password=False)
    )
    try:
        with admin.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(sql))
    finally:
        admin.dispose()


@pytest.fixture
def missing_database() -> Iterator[str]:
    """The URL of a database on the test server that does not exist yet; dropped afterwards."""
    url = make_url(postgres_url()).set(database="dan_notify_" + uuid.uuid4().hex[:12])
    yield url.render_as_string(hide_password=False)
    run_outside_a_transaction(
        postgres_url(), f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'
    )


def test_the_listener_survives_a_bad_database_url_and_listens_once_it_is_good(
    missing_database: str,
) -> None:
    channel = "dan_test_" + uuid.uuid4().hex[:12]
    calls: list[str] = []
    listener = NotifyListener(missing_database, calls.append, channel=channel).start()
    try:
        time.sleep(0.5)  # at least one failed connection
        assert not listener.listening.is_set() and calls == []
        assert len(listener_threads(channel)) == 1  # still alive, retrying
        run_outside_a_transaction(
            missing_database, f'CREATE DATABASE "{make_url(missing_database).database}"'
        )
        assert listener.listening.wait(15), "the listener never reconnected"
        sender = create_db_engine(missing_database)
        try:
            with sender.begin() as conn:
                notify(conn, channel, "hello")
        finally:
            sender.dispose()
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert calls == ["hello"]
    finally:
        listener.stop()
    assert listener_threads(channel) == []
    assert not listener.listening.is_set()  # no longer connected
