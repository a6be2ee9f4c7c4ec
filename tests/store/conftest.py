"""The store suite runs on SQLite always, and on PostgreSQL when DAN_TEST_POSTGRES_URL is set
(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from dan.db import create_db_engine, migrate
from dan.tasks.store import SqlTaskStore
from tests.fixtures.postgres import schema_url

POSTGRES_URL = os.environ.get("DAN_TEST_POSTGRES_URL")


class Clock:
    """A clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dan.sqlite3'}"
    elif not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL to run the store suite on PostgreSQL")
    else:
        with schema_url(POSTGRES_URL) as url:
            yield url


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    migrate(db_url)
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db: Engine, clock: Clock) -> SqlTaskStore:
    return SqlTaskStore(db, clock=clock)
