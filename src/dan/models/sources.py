"""Where model files come from: a Hugging Face mirror, and the tokens of sources that need one.

A catalog URL on ``https://huggingface.co`` is fetched from the mirror when one is set, as
``HF_ENDPOINT`` does for the hub's own tools. A token goes only to its own source: the Hugging
Face token to huggingface.co (or the mirror), the CivitAI API key to civitai.com, as
``Authorization: Bearer`` (the header CivitAI's documentation prefers over ``?token=``, which
would put the key into URLs, logs and error messages).

Both sources answer a download with a redirect to a storage host and a pre-signed URL (HF's LFS
CDN, CivitAI's R2 bucket). httpx drops ``Authorization`` when a redirect leaves the request's
origin (``Client._redirect_headers``), and :class:`SourceAuth` adds the header only to a request
for the source's own host, so a token never reaches a third host. Tokens are kept as
``SecretStr`` and appear in no message or log.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr

from dan.config import Settings

HF_ENDPOINT = "https://huggingface.co"
HF_HOST = "huggingface.co"
CIVITAI_HOST = "civitai.com"


@dataclass(frozen=True)
class Source:
    """A source that may need a token: its name, the setting holding the token, the hosts the
    token may be sent to (``host`` for any port, ``host:port`` for one), and what to tell a
    user it refuses."""

    name: str
    setting: str
    hosts: frozenset[str]
    needs: str  # what to set when no token was sent
    check: str  # what to check when the token was refused
    token: SecretStr | None = field(default=None, repr=False)

    def serves(self, url: httpx.URL) -> bool:
        """Whether ``url`` is on one of this source's hosts."""
        return url.host in self.hosts or host_key(url) in self.hosts

    def refusal(self) -> str:
        """What the user can do about a refusal (never the token itself)."""
        if self.token is None:
            return f"{self.name} needs a token for it: set {self.setting} to {self.needs}"
        return f"{self.name} refused the token in {self.setting}: check that {self.check}"


def host_key(url: httpx.URL) -> str:
    """``host`` or ``host:port`` when the URL names a port."""
    return url.host if url.port is None else f"{url.host}:{url.port}"


@dataclass(frozen=True)
class DownloadSources:
    """The Hugging Face endpoint (the hub or a mirror's base URL) and the sources' tokens."""

    hf_endpoint: str = HF_ENDPOINT
    hf_token: SecretStr | None = field(default=None, repr=False)
    civitai_api_key: SecretStr | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadSources:
        return cls(settings.hf_endpoint, settings.hf_token, settings.civitai_api_key)

    def url_for(self, url: str) -> str:
        """``url``, moved to the mirror when it is on the Hugging Face hub and a mirror is set."""
        endpoint = self.hf_endpoint.rstrip("/")
        prefix = HF_ENDPOINT + "/"
        if endpoint == HF_ENDPOINT or not url.startswith(prefix):
            return url
        return f"{endpoint}/{url.removeprefix(prefix)}"

    @property
    def sources(self) -> tuple[Source, ...]:
        mirror = host_key(httpx.URL(self.hf_endpoint))
        hugging_face = Source(
            "Hugging Face",
            "DAN_HF_TOKEN",
            frozenset({HF_HOST, mirror}),
            needs="an access token (https://huggingface.co/settings/tokens) of an account that "
            "has accepted this model's terms on its page",
            check="it is valid and its account has accepted this model's terms on its page",
            token=self.hf_token,
        )
        civitai = Source(
            "CivitAI",
            "DAN_CIVITAI_API_KEY",
            frozenset({CIVITAI_HOST}),
            needs="an API key from https://civitai.com/user/account (the creator of this model "
            "allows downloads to signed-in users only)",
            check="the key is still listed at https://civitai.com/user/account",
            token=self.civitai_api_key,
        )
        return (hugging_face, civitai)

    def source_of(self, url: str) -> Source | None:
        """The source ``url`` belongs to, if any."""
        return _source_for(self.sources, httpx.URL(url))

    def auth(self) -> SourceAuth:
        return SourceAuth(self.sources)


class SourceAuth(httpx.Auth):
    """Adds ``Authorization: Bearer <token>`` to a request for a source's own host that has a
    token; any other request goes as it is. httpx applies it to the first request only; the
    redirects it follows keep the header only within the same origin."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self._sources = tuple(sources)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        source = _source_for(self._sources, request.url)
        if source is not None and source.token is not None:
            request.headers["Authorization"] = f"Bearer {source.token.get_secret_value()}"
        yield request


def _source_for(sources: Iterable[Source], url: httpx.URL) -> Source | None:
    return next((source for source in sources if source.serves(url)), None)
