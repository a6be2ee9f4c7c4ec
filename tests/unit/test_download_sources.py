"""Downloads real users can complete: a Hugging Face mirror, and tokens sent only to their own
host, against a local HTTP server.

The server plays every host: the mirror directly, and huggingface.co, civitai.com and the CDNs
they redirect to as the HTTP proxy of the client (it tells them apart by the Host header).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from dan.domain import ModelKind
from dan.errors import DownloadError, DownloadUnauthorized
from dan.models.catalog import CatalogEntry
from dan.models.download import pull, target_path
from dan.models.sources import DownloadSources
from tests.fixtures.file_server import BODY, SHA, FileServer, Seen, Serve

HF_URL = "http://huggingface.co/org/repo/resolve/main/tiny.safetensors"
CIVITAI_URL = "http://civitai.com/api/download/models/1"
OTHER_URL = "http://models.example/tiny.safetensors"
HF_TOKEN = "hf_token_that_must_stay_secret"
CIVITAI_KEY = "civitai_key_that_must_stay_secret"
SETTING = {"huggingface.co": "DAN_HF_TOKEN", "civitai.com": "DAN_CIVITAI_API_KEY"}


def entry_for(url: str) -> CatalogEntry:
    return CatalogEntry(ModelKind.LORA, "tiny", SHA, url, "tiny.safetensors")


def with_tokens(hf: str | None = HF_TOKEN, civitai: str | None = CIVITAI_KEY) -> DownloadSources:
    return DownloadSources(
        hf_token=SecretStr(hf) if hf else None,
        civitai_api_key=SecretStr(civitai) if civitai else None,
    )


@pytest.fixture
def server(serve: Serve) -> FileServer:
    return serve("ok")


@pytest.fixture
def via_proxy(server: FileServer) -> Iterator[httpx.Client]:
    """A client that sends every request through ``server`` as its HTTP proxy."""
    with httpx.Client(proxy=f"http://{server.netloc}", trust_env=False, timeout=5.0) as client:
        yield client


@pytest.fixture
def direct() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        yield client


def test_a_mirror_serves_hugging_face_urls(
    server: FileServer, direct: httpx.Client, tmp_path: Path
) -> None:
    sources = DownloadSources(hf_endpoint=f"http://{server.netloc}/hf-mirror/")
    entry = entry_for("https://huggingface.co/org/repo/resolve/main/tiny.safetensors")
    path = pull(entry, tmp_path, client=direct, progress=False, sources=sources)
    assert path.read_bytes() == BODY
    assert server.seen == [
        Seen(server.netloc, "/hf-mirror/org/repo/resolve/main/tiny.safetensors", None)
    ]
    assert sources.url_for(CIVITAI_URL) == CIVITAI_URL
    assert sources.url_for("https://huggingface.co.example/x") == "https://huggingface.co.example/x"


def test_the_hugging_face_token_goes_to_the_mirror(
    server: FileServer, direct: httpx.Client, tmp_path: Path
) -> None:
    server.tokens[server.netloc] = HF_TOKEN
    sources = DownloadSources(f"http://{server.netloc}", SecretStr(HF_TOKEN))
    entry = entry_for("https://huggingface.co/org/repo/resolve/main/tiny.safetensors")
    assert pull(entry, tmp_path, client=direct, progress=False, sources=sources).exists()
    assert [seen.authorization for seen in server.seen] == [f"Bearer {HF_TOKEN}"]


@pytest.mark.parametrize(
    ("url", "token", "cdn"),
    [
        (HF_URL, HF_TOKEN, "http://cdn-lfs.example/blob?X-Amz-Signature=abc"),
        (CIVITAI_URL, CIVITAI_KEY, "http://r2.example/model.safetensors?X-Amz-Signature=abc"),
    ],
)
def test_a_token_goes_to_its_own_host_and_not_through_a_redirect(
    server: FileServer, via_proxy: httpx.Client, tmp_path: Path, url: str, token: str, cdn: str
) -> None:
    host = httpx.URL(url).host
    server.tokens[host] = token
    server.redirects[host] = cdn
    path = pull(entry_for(url), tmp_path, client=via_proxy, progress=False, sources=with_tokens())
    assert path.read_bytes() == BODY
    assert server.seen == [
        Seen(host, url, f"Bearer {token}"),
        Seen(httpx.URL(cdn).host, cdn, None),
    ]


def test_a_third_host_gets_no_token(
    server: FileServer, via_proxy: httpx.Client, tmp_path: Path
) -> None:
    pull(entry_for(OTHER_URL), tmp_path, client=via_proxy, progress=False, sources=with_tokens())
    assert server.seen == [Seen("models.example", OTHER_URL, None)]


@pytest.mark.parametrize("url", [HF_URL, CIVITAI_URL])
def test_a_refusal_names_the_setting_that_holds_the_token(
    server: FileServer, via_proxy: httpx.Client, tmp_path: Path, url: str
) -> None:
    host = httpx.URL(url).host
    server.tokens[host] = "the-right-token"
    entry = entry_for(url)
    with pytest.raises(DownloadUnauthorized) as missing:
        pull(entry, tmp_path, client=via_proxy, progress=False)
    assert "HTTP 401" in missing.value.message
    assert f"needs a token for it: set {SETTING[host]}" in missing.value.message
    assert missing.value.data == {"setting": SETTING[host], "status": 401}
    with pytest.raises(DownloadUnauthorized) as refused:
        pull(entry, tmp_path, client=via_proxy, progress=False, sources=with_tokens())
    assert "HTTP 403" in refused.value.message
    assert f"refused the token in {SETTING[host]}" in refused.value.message
    assert HF_TOKEN not in refused.value.message and CIVITAI_KEY not in refused.value.message
    assert list((tmp_path / "loras").iterdir()) == []  # no file, no .part


@pytest.mark.parametrize("login_elsewhere", [False, True])
def test_a_sign_in_page_is_refused_and_names_the_setting(
    server: FileServer, via_proxy: httpx.Client, tmp_path: Path, login_elsewhere: bool
) -> None:
    # CivitAI has answered downloads that need a key with its sign-in page, at times on
    # another of its hosts.
    if login_elsewhere:
        server.redirects["civitai.com"] = "http://civitai.red/login?reason=download-auth"
        server.pages.add("civitai.red")
    else:
        server.pages.add("civitai.com")
    entry = entry_for(CIVITAI_URL)
    with pytest.raises(
        DownloadUnauthorized,
        match=r"a web page instead of tiny\.safetensors.*set DAN_CIVITAI_API_KEY",
    ):
        pull(entry, tmp_path, client=via_proxy, progress=False)
    assert not target_path(entry, tmp_path).exists()


def test_a_refusal_from_another_host_is_a_plain_download_error(
    server: FileServer, via_proxy: httpx.Client, tmp_path: Path
) -> None:
    server.tokens["models.example"] = "something"
    with pytest.raises(DownloadError, match=r"HTTP 401 from http://models\.example/") as info:
        pull(entry_for(OTHER_URL), tmp_path, client=via_proxy, progress=False)
    assert not isinstance(info.value, DownloadUnauthorized)


def test_messages_leave_out_signed_queries(
    server: FileServer, via_proxy: httpx.Client, tmp_path: Path
) -> None:
    server.redirects["huggingface.co"] = "http://cdn-lfs.example/blob?X-Amz-Signature=abc"
    server.tokens["cdn-lfs.example"] = "expired"
    with pytest.raises(DownloadUnauthorized) as info:
        pull(entry_for(HF_URL), tmp_path, client=via_proxy, progress=False)
    assert "HTTP 401 from http://cdn-lfs.example/blob;" in info.value.message
    assert "X-Amz-Signature" not in info.value.message


def test_tokens_appear_in_no_log_or_message(
    server: FileServer,
    via_proxy: httpx.Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at DEBUG/INFO
    server.tokens.update({"huggingface.co": HF_TOKEN, "civitai.com": "another-key"})
    server.redirects["huggingface.co"] = "http://cdn-lfs.example/blob"
    sources = with_tokens()
    pull(entry_for(HF_URL), tmp_path / "ok", client=via_proxy, progress=False, sources=sources)
    with pytest.raises(DownloadUnauthorized) as info:
        pull(entry_for(CIVITAI_URL), tmp_path, client=via_proxy, progress=False, sources=sources)
    assert "huggingface.co" in caplog.text and "civitai.com" in caplog.text  # it did log
    shown = [caplog.text, info.value.message, str(info.value.data), repr(sources)]
    shown += [repr(source) for source in sources.sources]
    for text in shown:
        assert HF_TOKEN not in text and CIVITAI_KEY not in text
