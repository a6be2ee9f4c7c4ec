"""sha256 of model files, with a persistent cache so that an unchanged file is hashed only once.

Hashing a 4 GB checkpoint takes seconds; a restart with 50 GB of models must not redo it. The
cache maps an absolute path to the (size, mtime_ns) the file had when it was hashed; any change
of either makes the entry stale. It lives in one JSON file, replaced atomically (temp file and
``os.replace``), so a reader never sees a torn write. Two processes may update it concurrently:
each merges what is on disk with its own new entries before writing, and the last writer wins,
which at worst costs a re-hash. A corrupt or unreadable cache file is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024
CACHE_FILE_NAME = "sha256.json"
_FORMAT_VERSION = 1

Hasher = Callable[[Path], str]


class FileChanged(OSError):
    """The file changed while it was being hashed (e.g. it is still being copied)."""


def sha256_file(path: Path, *, chunk_bytes: int = CHUNK_BYTES) -> str:
    """The lower-case hex sha256 of the file at ``path``, read in ``chunk_bytes`` chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class HashCache:
    """sha256 of files, remembered in ``<cache_dir>/sha256.json`` across restarts.

    Thread-safe. ``hasher`` is the function that reads a file (tests count its calls).
    """

    def __init__(self, cache_dir: Path, *, hasher: Hasher = sha256_file) -> None:
        self.path = cache_dir / CACHE_FILE_NAME
        self._hasher = hasher
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None

    def sha256(self, path: Path) -> str:
        """The sha256 of ``path``: from the cache if the file's size and mtime are unchanged,
        else read and remembered. Raises ``OSError`` if the file cannot be read, and
        :class:`FileChanged` if it changed while being read (nothing is cached then)."""
        key = str(path.resolve())
        stamp = _stamp(path)
        cached = self.get(path, stamp)
        if cached is not None:
            return cached
        digest = self._hasher(path)
        if _stamp(path) != stamp:
            raise FileChanged(f"{path} changed while it was being hashed")
        self._store(key, stamp, digest)
        return digest

    def get(self, path: Path, stamp: tuple[int, int] | None = None) -> str | None:
        """The cached sha256 of ``path`` if its entry is still valid; never reads the file."""
        key = str(path.resolve())
        stamp = stamp or _stamp(path)
        with self._lock:
            entry = self._loaded().get(key)
        if entry and (entry.get("size"), entry.get("mtime_ns")) == stamp:
            return str(entry["sha256"])
        return None

    def record(self, path: Path, sha256: str) -> None:
        """Remember that ``path``, as it is now, has ``sha256`` (a download hashed it while
        streaming, so the registry need not read it again)."""
        self._store(str(path.resolve()), _stamp(path), sha256.lower())

    def _store(self, key: str, stamp: tuple[int, int], digest: str) -> None:
        entry = {"size": stamp[0], "mtime_ns": stamp[1], "sha256": digest}
        with self._lock:
            self._loaded()[key] = entry
            merged = self._read_file()
            merged[key] = entry
            self._entries = merged
            self._write_file(merged)

    def _loaded(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    def _read_file(self) -> dict[str, dict[str, Any]]:
        """The entries on disk; ``{}`` when the file is missing, unreadable or corrupt."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable hash cache %s: %s", self.path, exc)
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or data.get("version") != _FORMAT_VERSION:
            log.warning("ignoring hash cache %s in an unknown format", self.path)
            return {}
        return {k: v for k, v in files.items() if isinstance(v, dict) and "sha256" in v}

    def _write_file(self, entries: dict[str, dict[str, Any]]) -> None:
        """Replace the cache file atomically; a failure is logged, not raised (it is a cache)."""
        payload = json.dumps({"version": _FORMAT_VERSION, "files": entries}, indent=0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, payload)
        except OSError as exc:
            log.warning("could not write hash cache %s: %s", self.path, exc)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix.

    The temporary file has a unique name in the same directory, so concurrent writers never
    share one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
