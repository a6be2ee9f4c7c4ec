"""The time every process agrees on: the database's.

Leases, run-time limits and online windows are compared across processes (API replicas,
workers, nodes served through different replicas); each machine's own clock may drift, the
database server's is one clock. SQLite lives on one machine, whose clock it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, text

Clock = Callable[[], float]
_POSTGRES_NOW = text("SELECT extract(epoch FROM clock_timestamp())")


def database_time(conn: Connection) -> float:
    """UNIX seconds now, by the clock of the database ``conn`` talks to."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(_POSTGRES_NOW).scalar_one())
    return time.time()


class DatabaseClock:
    """``now(conn)``: a test's fixed clock when given, else the database's time."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock

    def now(self, conn: Connection) -> float:
        return self._clock() if self._clock is not None else database_time(conn)
