"""SqlBlobStore: blobs in the database, so every API replica and node sees the same results.

Used when the API runs on PostgreSQL (several replicas, possibly on several machines); the
embedded SQLite server keeps files on disk (LocalBlobStore). Images are a few hundred KB and
live for hours, which a database holds well.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from sqlalchemy import Engine, delete, insert, select

from dan.db.tables import blobs
from dan.storage.blobs import check_key


class SqlBlobStore:
    """The BlobStore contract on the ``blobs`` table."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def put(self, key: str, data: bytes) -> None:
        group = check_key(key).split("/", 1)[0]
        row = {"key": key, "grp": group, "data": bytes(data), "created_at": self._clock()}
        with self._engine.begin() as conn:
            # Delete then insert in one transaction: an atomic replace on every database.
            conn.execute(delete(blobs).where(blobs.c.key == key))
            conn.execute(insert(blobs).values(**row))

    def get(self, key: str) -> bytes:
        query = select(blobs.c.data).where(blobs.c.key == key)
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            data = conn.execute(query).scalar_one_or_none()
        if data is None:
            raise KeyError(key)
        return bytes(data)

    def delete(self, key: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(delete(blobs).where(blobs.c.key == check_key(key)))

    def delete_group(self, group: str) -> None:
        check_key(f"{group}/x")
        with self._engine.begin() as conn:
            conn.execute(delete(blobs).where(blobs.c.grp == group))

    def groups(self) -> Iterable[str]:
        query = select(blobs.c.grp).distinct()
        with self._engine.connect().execution_options(dan_read_only=True) as conn:
            return sorted(conn.execute(query).scalars())
