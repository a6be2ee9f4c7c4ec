"""Downloads against a local HTTP server: verified, resumable, refused when corrupt."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dan.domain import ModelKind
from dan.errors import ChecksumMismatch, DownloadError
from dan.models.catalog import CatalogEntry
from dan.models.download import PART_SUFFIX, pull, target_path
from dan.models.hashing import HashCache
from tests.fixtures.file_server import BODY, SHA, FileServer, Serve


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        yield http


def entry_for(url: str, sha256: str = SHA) -> CatalogEntry:
    return CatalogEntry(
        kind=ModelKind.LORA, name="tiny", sha256=sha256, url=url, file_name="tiny.safetensors"
    )


def test_download_is_verified_and_installed(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    server = serve("ok")
    entry = entry_for(server.url)
    hashes = HashCache(tmp_path / "cache")
    path = pull(entry, tmp_path / "models", client=client, progress=False, hashes=hashes)
    assert (
        path
        == tmp_path / "models" / "loras" / "tiny.safetensors"
        == target_path(entry, tmp_path / "models")
    )
    assert path.read_bytes() == BODY
    assert not path.with_name(path.name + PART_SUFFIX).exists()
    assert server.ranges == [None]
    assert hashes.get(path) == SHA  # the registry will not read the file again


def test_redirects_are_followed(serve: Serve, client: httpx.Client, tmp_path: Path) -> None:
    server = serve("redirect")
    path = pull(entry_for(server.url), tmp_path, client=client, progress=False)
    assert path.read_bytes() == BODY
    assert len(server.ranges) == 2


def test_broken_download_resumes_with_range(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    server = serve("drop_once")
    entry = entry_for(server.url)
    part = target_path(entry, tmp_path).with_name("tiny.safetensors" + PART_SUFFIX)
    with pytest.raises(DownloadError, match="run the pull again to resume"):
        pull(entry, tmp_path, client=client, progress=False)
    received = part.stat().st_size
    assert 0 < received < len(BODY)
    assert not target_path(entry, tmp_path).exists()
    path = pull(entry, tmp_path, client=client, progress=False)
    assert server.ranges == [None, f"bytes={received}-"]
    assert path.read_bytes() == BODY
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    server = serve("ignore_range")
    entry = entry_for(server.url)
    part = target_path(entry, tmp_path).with_name("tiny.safetensors" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that must not stay in front")
    path = pull(entry, tmp_path, client=client, progress=False)
    assert server.ranges == ["bytes=35-"]
    assert path.read_bytes() == BODY


def test_complete_part_answered_416_is_installed(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    server = serve("ok")
    entry = entry_for(server.url)
    part = target_path(entry, tmp_path).with_name("tiny.safetensors" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY)
    path = pull(entry, tmp_path, client=client, progress=False)
    assert server.ranges == [f"bytes={len(BODY)}-"]
    assert path.read_bytes() == BODY


def test_corrupt_download_is_refused_and_deleted(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    server = serve("wrong")
    entry = entry_for(server.url)
    with pytest.raises(ChecksumMismatch) as info:
        pull(entry, tmp_path, client=client, progress=False)
    assert info.value.data == {"expected": SHA, "actual": hashlib.sha256(BODY[::-1]).hexdigest()}
    assert SHA in info.value.message
    assert list((tmp_path / "loras").iterdir()) == []  # neither the file nor its .part


def test_installed_file_short_circuits(serve: Serve, client: httpx.Client, tmp_path: Path) -> None:
    server = serve("ok")
    entry = entry_for(server.url)
    target = target_path(entry, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(BODY)
    assert pull(entry, tmp_path, client=client, progress=False) == target
    assert server.ranges == []


def test_installed_file_with_other_content_is_left_alone(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    entry = entry_for(serve("ok").url)
    target = target_path(entry, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"someone else's model")
    with pytest.raises(DownloadError, match="move it away"):
        pull(entry, tmp_path, client=client, progress=False)
    assert target.read_bytes() == b"someone else's model"


def test_http_error_and_unreachable_server(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        pull(entry_for(serve("missing").url), tmp_path, client=client, progress=False)
    assert list((tmp_path / "loras").iterdir()) == []  # no empty .part left behind
    closed = FileServer("ok")
    url = closed.url
    closed.server_close()
    with pytest.raises(DownloadError, match="failed after 0 bytes"):
        pull(entry_for(url), tmp_path / "other", client=client, progress=False)


def test_default_client_is_created_and_closed(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    server = serve("ok")
    path = pull(entry_for(server.url), tmp_path, progress=True)  # stderr is not a tty here
    assert path.read_bytes() == BODY


@pytest.mark.skipif(os.name != "posix", reason="the .part lock uses flock")
def test_concurrent_pull_of_the_same_file_is_refused(
    serve: Serve, client: httpx.Client, tmp_path: Path
) -> None:
    import fcntl

    server = serve("ok")
    entry = entry_for(server.url)
    part = target_path(entry, tmp_path).with_name("tiny.safetensors" + PART_SUFFIX)
    part.parent.mkdir(parents=True)
    with part.open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another process"):
            pull(entry, tmp_path, client=client, progress=False)
    assert server.ranges == []
    assert pull(entry, tmp_path, client=client, progress=False).read_bytes() == BODY
