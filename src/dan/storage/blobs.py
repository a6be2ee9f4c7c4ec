"""BlobStore: named byte strings (result images), keyed ``<task id>/<file name>``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}/[A-Za-z0-9_.-]{1,64}$")


def check_key(key: str) -> str:
    """``key`` if it is ``<group>/<name>`` of safe characters; ValueError otherwise."""
    # Keys become file paths: refuse anything that could leave the root.
    if not _KEY.match(key) or ".." in key:
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there; atomic for readers."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; KeyError if there are none."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key``; no error if it is not there."""
        ...

    def delete_group(self, group: str) -> None:
        """Delete every key ``group/...`` (a task's results); no error if there are none."""
        ...

    def groups(self) -> Iterable[str]:
        """The groups present (for sweeping orphans)."""
        ...


class LocalBlobStore:
    """Blobs as files under ``root/<group>/<name>``."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def put(self, key: str, data: bytes) -> None:
        """Written to a temporary file, flushed to disk, then renamed over the old one (and
        the folder flushed): after a crash the key holds the old bytes or the new, whole."""
        path = self._root / check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_folder(path.parent)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._root / check_key(key)).unlink()

    def get(self, key: str) -> bytes:
        try:
            return (self._root / check_key(key)).read_bytes()
        except FileNotFoundError as exc:
            raise KeyError(key) from exc

    def delete_group(self, group: str) -> None:
        check_key(f"{group}/x")
        shutil.rmtree(self._root / group, ignore_errors=True)

    def groups(self) -> Iterable[str]:
        if not self._root.is_dir():
            return []
        return [p.name for p in self._root.iterdir() if p.is_dir()]


class InMemoryBlobStore:
    """The same contract in a dict, for tests of the layers above."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._data[check_key(key)] = bytes(data)

    def get(self, key: str) -> bytes:
        with self._lock:
            return self._data[key]

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def delete_group(self, group: str) -> None:
        with self._lock:
            for key in [k for k in self._data if k.startswith(group + "/")]:
                del self._data[key]

    def groups(self) -> Iterable[str]:
        with self._lock:
            return sorted({k.split("/", 1)[0] for k in self._data})


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
