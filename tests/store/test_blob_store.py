"""The BlobStore contract, on files, in memory, and in the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import Engine

from dan.db import create_db_engine, migrate
from dan.storage import BlobStore, InMemoryBlobStore, LocalBlobStore, SqlBlobStore


@pytest.fixture(params=["files", "memory", "sqlite"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "files":
        return LocalBlobStore(tmp_path / "blobs")
    if request.param == "memory":
        return InMemoryBlobStore()
    url = f"sqlite:///{tmp_path / 'blobs.sqlite3'}"
    migrate(url)
    return SqlBlobStore(create_db_engine(url))


def test_put_get_replace_and_delete_a_group(blobs: BlobStore) -> None:
    exercise(blobs)


def exercise(blobs: BlobStore) -> None:
    blobs.put("task-1/0.png", b"first")
    blobs.put("task-1/0.png", b"second")
    blobs.put("task-1/1.png", b"\x00\xff" * 1000)
    blobs.put("task-2/0.png", b"other")
    assert blobs.get("task-1/0.png") == b"second"
    assert blobs.get("task-1/1.png") == b"\x00\xff" * 1000
    assert sorted(blobs.groups()) == ["task-1", "task-2"]
    blobs.delete_group("task-1")
    with pytest.raises(KeyError):
        blobs.get("task-1/0.png")
    assert list(blobs.groups()) == ["task-2"]
    blobs.delete_group("no-such-task")
    blobs.delete("task-2/0.png")
    blobs.delete("task-2/0.png")  # deleting what is not there is no error
    with pytest.raises(KeyError):
        blobs.get("task-2/0.png")


@pytest.mark.parametrize("key", ["../etc/passwd", "a/b/c", "no-slash", "a/..", "/abs"])
def test_keys_that_could_escape_are_refused(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        blobs.put(key, b"x")


def test_two_stores_on_one_database_share_their_blobs(db: Engine) -> None:
    # ``db`` is SQLite, and PostgreSQL when configured.
    exercise(SqlBlobStore(db))
    replica_a, replica_b = SqlBlobStore(db), SqlBlobStore(db)
    replica_a.put("task-9/0.png", b"made on a node, uploaded through replica A")
    assert replica_b.get("task-9/0.png").endswith(b"replica A")


def test_a_file_blob_reaches_the_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    blobs.put("task-1/0.png", b"old")
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    blobs.put("task-1/0.png", b"new")
    assert len(synced) == 2  # the file, then its folder (the rename)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        blobs.put("task-1/0.png", b"lost")
    assert blobs.get("task-1/0.png") == b"new"  # the old bytes, whole
    assert [p.name for p in (tmp_path / "blobs" / "task-1").iterdir()] == ["0.png"]
