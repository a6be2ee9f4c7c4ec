"""Download catalog models: resumable, verified, and invisible until verified.

A download streams into ``<final name>.part`` next to its destination, hashing as it goes. Only a
file whose sha256 matches the catalog is renamed (``os.replace``) to its final name, so the
registry never sees a partial or corrupt model. An interrupted download keeps its ``.part`` and
the next :func:`pull` resumes it with an HTTP ``Range`` request. Concurrent pulls of the same
file are refused (an exclusive ``flock`` on the ``.part``; POSIX only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
from tqdm import tqdm

from dan.errors import ChecksumMismatch, DownloadError
from dan.models.catalog import CatalogEntry
from dan.models.hashing import CHUNK_BYTES, HashCache, sha256_file

PART_SUFFIX = ".part"
_TIMEOUT = httpx.Timeout(30.0, read=120.0)


def target_path(entry: CatalogEntry, models_dir: Path) -> Path:
    """Where ``entry`` is installed: ``<models_dir>/<kind folder>/<file_name>``."""
    return models_dir / entry.kind.folder / entry.file_name


def pull(
    entry: CatalogEntry,
    models_dir: Path,
    *,
    client: httpx.Client | None = None,
    progress: bool = True,
    hashes: HashCache | None = None,
) -> Path:
    """Download ``entry`` into ``models_dir`` and return the installed file's path.

    Idempotent: an installed file with the right sha256 is returned without any request.
    ``client`` (e.g. one carrying a civitai token) is used as given and not closed; redirects
    are followed. The progress bar goes to stderr, only when it is a terminal. ``hashes``, if
    given, answers the check of an installed file and learns the new file's hash.

    Raises :class:`ChecksumMismatch` (the ``.part`` is deleted; ``data`` has ``expected`` and
    ``actual``) and :class:`DownloadError` for HTTP errors, network failures (the ``.part`` is
    kept, so calling again resumes), a concurrent pull of the same file, or an installed file
    with a different sha256 (left untouched).
    """
    target = target_path(entry, models_dir)
    if target.exists():
        return _verified_existing(entry, target, hashes)
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(httpx.Client(follow_redirects=True, timeout=_TIMEOUT))
        part = target.with_name(target.name + PART_SUFFIX)
        file = stack.enter_context(_locked_part(part))
        digest = _fetch(entry, file, client, progress)
        _install(entry, part, target, digest)
    if hashes is not None:
        hashes.record(target, digest)
    return target


def _verified_existing(entry: CatalogEntry, target: Path, hashes: HashCache | None) -> Path:
    digest = hashes.sha256(target) if hashes is not None else sha256_file(target)
    if digest in entry.hashes:
        return target
    raise DownloadError(
        f"{target} exists but its sha256 is {digest}, not {entry.name}'s {entry.sha256}; "
        "move it away and pull again"
    )


@contextlib.contextmanager
def _locked_part(part: Path) -> Iterator[IO[bytes]]:
    """The ``.part`` file opened for appending and reading, locked against other pulls.

    An empty ``.part`` (the request failed before any byte arrived) is removed on exit."""
    with part.open("a+b", buffering=CHUNK_BYTES) as file:
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise DownloadError(f"{part} is being downloaded by another process") from exc
        try:
            yield file
        finally:
            if file.seek(0, os.SEEK_END) == 0:
                part.unlink(missing_ok=True)


def _fetch(entry: CatalogEntry, file: IO[bytes], client: httpx.Client, progress: bool) -> str:
    """Complete ``file`` from ``entry.url`` and return the sha256 of its whole content.

    A second round happens only when the server refused to resume (a 416 for a ``.part`` that
    is not the complete file, or a 206 for the wrong range); it starts from zero.
    """
    for _ in range(2):
        offset = file.seek(0, os.SEEK_END)
        hasher = _hash_prefix(file, offset)
        try:
            digest = _fetch_once(entry, file, client, progress, offset, hasher)
        except httpx.HTTPError as exc:
            file.flush()
            raise DownloadError(
                f"downloading {entry.name} from {entry.url} failed after "
                f"{file.tell()} bytes: {exc!r}; run the pull again to resume"
            ) from exc
        except OSError as exc:
            raise DownloadError(f"writing the download of {entry.name} failed: {exc}") from exc
        if digest is not None:
            return digest
        file.truncate(0)
    raise DownloadError(f"{entry.url} refused to resume the download of {entry.name}")


def _fetch_once(
    entry: CatalogEntry,
    file: IO[bytes],
    client: httpx.Client,
    progress: bool,
    offset: int,
    hasher: hashlib._Hash,
) -> str | None:
    """One request; the digest of the complete file, or ``None`` to start again from zero."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", entry.url, headers=headers, follow_redirects=True) as response:
        status = response.status_code
        if status == 416 and offset:
            # Nothing left to send: the .part may already be complete.
            return hasher.hexdigest() if hasher.hexdigest() in entry.hashes else None
        if status == 206 and offset and _range_start(response) != offset:
            return None
        if status not in (200, 206):
            raise DownloadError(f"downloading {entry.name}: HTTP {status} from {response.url}")
        if status == 200 and offset:
            # The server ignored Range and sends the whole file: start over.
            file.truncate(0)
            offset, hasher = 0, hashlib.sha256()
        bar = progress and sys.stderr.isatty()
        _copy_body(response, file, hasher, offset, desc=entry.file_name, bar=bar)
    return hasher.hexdigest()


def _range_start(response: httpx.Response) -> int | None:
    """The first byte position of a ``Content-Range: bytes START-END/TOTAL`` header."""
    value = response.headers.get("content-range", "")
    unit, _, spec = value.partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _hash_prefix(file: IO[bytes], size: int) -> hashlib._Hash:
    """A sha256 object fed with the first ``size`` bytes of ``file``."""
    hasher = hashlib.sha256()
    file.seek(0)
    remaining = size
    while remaining > 0 and (chunk := file.read(min(CHUNK_BYTES, remaining))):
        hasher.update(chunk)
        remaining -= len(chunk)
    return hasher


def _copy_body(
    response: httpx.Response,
    file: IO[bytes],
    hasher: hashlib._Hash,
    offset: int,
    *,
    desc: str,
    bar: bool,
) -> None:
    length = response.headers.get("content-length", "")
    total = offset + int(length) if length.isdigit() else None
    with tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not bar,
    ) as progress:
        # No chunk_size: each network chunk is written at once, so an interrupted download
        # keeps every byte it received.
        for chunk in response.iter_bytes():
            file.write(chunk)
            hasher.update(chunk)
            progress.update(len(chunk))
    file.flush()
    os.fsync(file.fileno())


def _install(entry: CatalogEntry, part: Path, target: Path, digest: str) -> None:
    """Rename the verified ``.part`` to ``target``, or delete it and raise on a mismatch."""
    if digest not in entry.hashes:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{entry.url} sent a file with sha256 {digest}, but {entry.name} has sha256 "
            f"{entry.sha256}; the download was deleted",
            expected=entry.sha256,
            actual=digest,
        )
    os.replace(part, target)
