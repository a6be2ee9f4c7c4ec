"""Download catalog models: resumable, verified, and invisible until verified.

A download streams into ``<final name>.part`` next to its destination, hashing as it goes. Only a
file whose sha256 matches the catalog is renamed (``os.replace``) to its final name, so the
registry never sees a partial or corrupt model. An interrupted download keeps its ``.part`` and
the next :func:`pull` resumes it with an HTTP ``Range`` request. Concurrent pulls of the same
file are refused (an exclusive ``flock`` on the ``.part``; POSIX only).

Where a file comes from and which token goes with it is :mod:`dan.models.sources`' business: a
Hugging Face URL may be moved to a mirror, and a source's token goes only to its own host.
Messages show URLs without their query (a CDN's pre-signed URL is a credential of sorts).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from tqdm import tqdm

from dan.errors import ChecksumMismatch, DownloadError, DownloadUnauthorized
from dan.models.catalog import CatalogEntry
from dan.models.hashing import CHUNK_BYTES, HashCache, sha256_file
from dan.models.sources import DownloadSources

PART_SUFFIX = ".part"
_TIMEOUT = httpx.Timeout(30.0, read=120.0)
_REFUSED = frozenset({401, 403})


@dataclass(frozen=True)
class _Transfer:
    """One pull's request: the entry, the URL it is fetched from, and how."""

    entry: CatalogEntry
    url: str
    client: httpx.Client
    sources: DownloadSources
    bar: bool


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
    sources: DownloadSources | None = None,
) -> Path:
    """Download ``entry`` into ``models_dir`` and return the installed file's path.

    Idempotent: an installed file with the right sha256 is returned without any request.
    ``client`` is used as given and not closed; redirects are followed. ``sources`` (default:
    the hub, no tokens) moves Hugging Face URLs to a mirror and adds a source's token to its
    own requests. The progress bar goes to stderr, only when it is a terminal. ``hashes``, if
    given, answers the check of an installed file and learns the new file's hash.

    Raises :class:`ChecksumMismatch` (the ``.part`` is deleted; ``data`` has ``expected`` and
    ``actual``), :class:`DownloadUnauthorized` when a source with a token setting answers 401
    or 403 or a sign-in page (``data["setting"]`` names the setting), and
    :class:`DownloadError` for other HTTP errors, network failures (the ``.part`` is kept, so
    calling again resumes), a concurrent pull of the same file, or an installed file with a
    different sha256 (left untouched).
    """
    target = target_path(entry, models_dir)
    if target.exists():
        return _verified_existing(entry, target, hashes)
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(httpx.Client(follow_redirects=True, timeout=_TIMEOUT))
        sources = sources if sources is not None else DownloadSources()
        bar = progress and sys.stderr.isatty()
        transfer = _Transfer(entry, sources.url_for(entry.url), client, sources, bar)
        part = target.with_name(target.name + PART_SUFFIX)
        file = stack.enter_context(_locked_part(part))
        digest = _fetch(transfer, file)
        _install(transfer, part, target, digest)
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


def _fetch(transfer: _Transfer, file: IO[bytes]) -> str:
    """Complete ``file`` from ``transfer.url`` and return the sha256 of its whole content.

    A second round happens only when the server refused to resume (a 416 for a ``.part`` that
    is not the complete file, or a 206 for the wrong range); it starts from zero.
    """
    entry = transfer.entry
    for _ in range(2):
        offset = file.seek(0, os.SEEK_END)
        hasher = _hash_prefix(file, offset)
        try:
            digest = _fetch_once(transfer, file, offset, hasher)
        except httpx.HTTPError as exc:
            file.flush()
            raise DownloadError(
                f"downloading {entry.name} from {_shown(transfer.url)} failed after "
                f"{file.tell()} bytes: {exc!r}; run the pull again to resume"
            ) from exc
        except OSError as exc:
            raise DownloadError(f"writing the download of {entry.name} failed: {exc}") from exc
        if digest is not None:
            return digest
        file.truncate(0)
    raise DownloadError(f"{_shown(transfer.url)} refused to resume the download of {entry.name}")


def _fetch_once(
    transfer: _Transfer, file: IO[bytes], offset: int, hasher: hashlib._Hash
) -> str | None:
    """One request; the digest of the complete file, or ``None`` to start again from zero."""
    entry = transfer.entry
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    auth = transfer.sources.auth()
    with transfer.client.stream(
        "GET", transfer.url, headers=headers, auth=auth, follow_redirects=True
    ) as response:
        status = response.status_code
        if status == 416 and offset:
            # Nothing left to send: the .part may already be complete.
            return hasher.hexdigest() if hasher.hexdigest() in entry.hashes else None
        if status == 206 and offset and _range_start(response) != offset:
            return None
        _check_answer(transfer, response)
        if status == 200 and offset:
            # The server ignored Range and sends the whole file: start over.
            file.truncate(0)
            offset, hasher = 0, hashlib.sha256()
        _copy_body(response, file, hasher, offset, desc=entry.file_name, bar=transfer.bar)
    return hasher.hexdigest()


def _check_answer(transfer: _Transfer, response: httpx.Response) -> None:
    """Raise unless ``response`` is the file (200 or 206, and not a web page)."""
    status = response.status_code
    answered = status in (200, 206)
    page = answered and response.headers.get("content-type", "").startswith("text/html")
    if answered and not page:
        return
    what = f"a web page instead of {transfer.entry.file_name}" if page else f"HTTP {status}"
    message = f"downloading {transfer.entry.name}: {what} from {_shown(response.url)}"
    source = transfer.sources.source_of(transfer.url)
    if source is not None and (page or status in _REFUSED):
        # A sign-in page is how CivitAI has answered a download that needs a key.
        message += f"; {source.refusal()}"
        raise DownloadUnauthorized(message, setting=source.setting, status=status)
    raise DownloadError(message)


def _shown(url: str | httpx.URL) -> str:
    """``url`` without its query and fragment."""
    return str(httpx.URL(url).copy_with(query=None, fragment=None))


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


def _install(transfer: _Transfer, part: Path, target: Path, digest: str) -> None:
    """Rename the verified ``.part`` to ``target``, or delete it and raise on a mismatch."""
    entry = transfer.entry
    if digest not in entry.hashes:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{_shown(transfer.url)} sent a file with sha256 {digest}, but {entry.name} has sha256 "
            f"{entry.sha256}; the download was deleted",
            expected=entry.sha256,
            actual=digest,
        )
    os.replace(part, target)
