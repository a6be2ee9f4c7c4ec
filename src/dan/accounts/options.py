"""Client options: the settings an AUTOMATIC1111 client stores with ``POST /sdapi/v1/options``.

A1111 keeps one global set of options, so one client choosing a checkpoint changes it for every
other. DAN keeps them per caller instead: under the caller's API key (``key:<key id>``), or,
for a caller without a stored key (the embedded server's local account, an anonymous lane, a
signed-in session), under its account (``account:<account id>``). Only what DAN acts on is
kept: the checkpoint, by sha256.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from dan.db.tables import client_options

Clock = Callable[[], float]


def options_owner(account_id: str, key_id: str | None) -> str:
    """Whose options a caller reads and writes: its stored key's, else its account's."""
    return f"key:{key_id}" if key_id else f"account:{account_id}"


class ClientOptionsStore(Protocol):
    """Persistence of client options. Synchronous and thread-safe."""

    def checkpoint(self, owner: str) -> str | None:
        """The sha256 of the checkpoint ``owner`` chose, or None."""
        ...

    def set_checkpoint(self, owner: str, sha256: str) -> None:
        """Remember ``sha256`` as ``owner``'s checkpoint (replacing an earlier choice)."""
        ...


class SqlClientOptionsStore:
    """ClientOptionsStore on SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def checkpoint(self, owner: str) -> str | None:
        query = select(client_options.c.checkpoint).where(client_options.c.owner == owner)
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            found: str | None = conn.execute(query).scalar_one_or_none()
        return found

    def set_checkpoint(self, owner: str, sha256: str) -> None:
        values = {"owner": owner, "checkpoint": sha256, "updated_at": self._clock()}
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        insert = dialect.insert(client_options).values(**values)
        upsert = insert.on_conflict_do_update(
            index_elements=[client_options.c.owner],
            set_={"checkpoint": sha256, "updated_at": values["updated_at"]},
        )
        with self._engine.begin() as conn:
            conn.execute(upsert)


class ClientOptions:
    """The rules of client options: each caller has its own, and a caller that never chose
    a checkpoint has none (the server's default applies)."""

    def __init__(self, store: ClientOptionsStore) -> None:
        self._store = store

    def checkpoint(self, owner: str) -> str | None:
        """The sha256 of ``owner``'s checkpoint, or None when it chose none."""
        return self._store.checkpoint(owner)

    def choose_checkpoint(self, owner: str, sha256: str) -> None:
        """Make ``sha256`` (an installed checkpoint, resolved by the caller) ``owner``'s
        checkpoint for its later requests that name none."""
        if len(sha256) != 64:
            raise ValueError(f"a checkpoint is kept by its sha256, got {sha256!r}")
        self._store.set_checkpoint(owner, sha256.lower())
