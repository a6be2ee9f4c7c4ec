"""The sign-in providers: GitHub (OAuth 2) and one OpenID Connect provider, through Authlib's
Starlette client.

A provider sends the browser back to ``<public URL>/auth/callback/<id>`` with a code, which the
client trades for the provider's tokens; they are used once, to learn who signed in, and
dropped: nothing of them is stored or put in the session. Authlib keeps its state, nonce and
PKCE verifier in the session cookie for the round trip; the callback replaces the session with
the signed-in one, which holds none of them.

Who signed in:
- GitHub: the user's numeric ``id`` (a login can be renamed and reused), names from ``login``
  and the public ``email``; GitHub's access token is asked for no scope (the public profile).
- OpenID Connect: ``sub`` from the ID token (Authlib checks its signature, issuer, audience,
  nonce and expiry against the keys discovered from the issuer), or from the userinfo endpoint
  when the provider sends no ID token; names from ``preferred_username``, ``nickname`` and
  ``email``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
from authlib.integrations.base_client import OAuthError
from authlib.integrations.starlette_client import OAuth
from fastapi import FastAPI
from joserfc.errors import JoseError
from starlette.requests import Request
from starlette.responses import Response

from dan.accounts import Identity
from dan.accounts.signin import provider_namespace
from dan.api.session import install_sessions
from dan.config import GITHUB, OIDC, Settings
from dan.errors import InvalidArgument, ResourceUnavailable, SignInFailed, SignInOff
from dan.services import Services

PROVIDER_TIMEOUT_S = 15.0
OIDC_SCOPE = "openid profile email"
WELL_KNOWN = "/.well-known/openid-configuration"
CLIENT_KWARGS: dict[str, Any] = {"code_challenge_method": "S256", "timeout": PROVIDER_TIMEOUT_S}


@dataclasses.dataclass(frozen=True)
class Provider:
    """A configured provider: ``id`` in the URLs, ``name`` on the button, and the
    ``namespace`` its subjects are stored under."""

    id: str
    name: str
    namespace: str


class Providers:
    """The providers that ``settings`` configure, each registered with an Authlib client of
    its own (nothing is fetched until someone signs in)."""

    def __init__(self, settings: Settings) -> None:
        self._oauth = OAuth()
        self._providers: dict[str, Provider] = {}
        if settings.github_client_id:
            self._register_github(settings)
        if settings.oidc_issuer:
            self._register_oidc(settings, settings.oidc_issuer.rstrip("/"))

    def _register_github(self, settings: Settings) -> None:
        web, api = settings.github_url.rstrip("/"), settings.github_api_url.rstrip("/")
        self._oauth.register(
            GITHUB,
            client_id=settings.github_client_id,
            client_secret=settings.github_client_secret,
            authorize_url=f"{web}/login/oauth/authorize",
            access_token_url=f"{web}/login/oauth/access_token",
            api_base_url=f"{api}/",
            # GitHub documents the client's credentials as form fields of the token request
            client_kwargs={**CLIENT_KWARGS, "token_endpoint_auth_method": "client_secret_post"},
        )
        self._providers[GITHUB] = Provider(GITHUB, "GitHub", provider_namespace(web))

    def _register_oidc(self, settings: Settings, issuer: str) -> None:
        self._oauth.register(
            OIDC,
            client_id=settings.oidc_client_id,
            client_secret=settings.oidc_client_secret,
            server_metadata_url=issuer + WELL_KNOWN,
            client_kwargs={**CLIENT_KWARGS, "scope": OIDC_SCOPE},
        )
        self._providers[OIDC] = Provider(OIDC, settings.oidc_name, provider_namespace(issuer))

    def listed(self) -> list[Provider]:
        """The configured providers, GitHub first; empty when sign-in is off."""
        return list(self._providers.values())

    def get(self, provider_id: str) -> Provider:
        """The provider ``provider_id``; SignInOff if none is configured, InvalidArgument (404)
        if another is."""
        if not self._providers:
            raise SignInOff()
        provider = self._providers.get(provider_id)
        if provider is None:
            offered = ", ".join(self._providers)
            raise UnknownProvider(
                f"no sign-in provider {provider_id!r} on this server; it offers: {offered}"
            )
        return provider

    async def redirect(self, request: Request, provider_id: str, redirect_uri: str) -> Response:
        """The redirect that sends the browser to the provider's authorization page."""
        provider = self.get(provider_id)
        client = self._oauth.create_client(provider.id)
        with _provider_errors(provider):
            response: Response = await client.authorize_redirect(request, redirect_uri)
        return response

    async def identity(self, request: Request, provider_id: str) -> Identity:
        """Who the provider says signed in, from the callback ``request``; SignInFailed if the
        provider refused or the callback does not match the sign-in this browser started,
        ResourceUnavailable if the provider could not be reached."""
        provider = self.get(provider_id)
        client = self._oauth.create_client(provider.id)
        with _provider_errors(provider):
            token = await client.authorize_access_token(request)
            if provider.id == GITHUB:
                return await _github_identity(client, token, provider)
            return await _oidc_identity(client, token, provider)


class UnknownProvider(InvalidArgument):
    """No such sign-in provider on this server."""

    http_status = 404


async def _github_identity(client: Any, token: dict[str, Any], provider: Provider) -> Identity:
    response = await client.get("user", token=token)
    response.raise_for_status()
    user = response.json()
    if not isinstance(user, dict) or user.get("id") is None:
        raise SignInFailed("GitHub's /user answer has no user id; sign in again")
    names = (_text(user.get("login")), _text(user.get("email")))
    return Identity(provider.namespace, str(user["id"]), names)


async def _oidc_identity(client: Any, token: dict[str, Any], provider: Provider) -> Identity:
    claims = token.get("userinfo") or await client.userinfo(token=token)
    subject = _text(claims.get("sub"))
    if not subject:
        raise SignInFailed(f"{provider.name} sent no subject ('sub' claim); sign in again")
    names = tuple(_text(claims.get(name)) for name in ("preferred_username", "nickname", "email"))
    return Identity(provider.namespace, subject, names)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@contextlib.contextmanager
def _provider_errors(provider: Provider) -> Iterator[None]:
    """Translates what a provider's failure raises into DAN errors that name the provider."""
    try:
        yield
    except OAuthError as exc:
        why = ": ".join(part for part in (exc.error, exc.description) if part)
        raise SignInFailed(
            f"signing in with {provider.name} failed ({why}); sign in again"
        ) from exc
    except JoseError as exc:
        raise SignInFailed(
            f"{provider.name}'s ID token is not valid ({exc}); sign in again"
        ) from exc
    except httpx.HTTPError as exc:
        raise ResourceUnavailable(
            f"could not reach the sign-in provider {provider.name} ({exc}); try again later"
        ) from exc


def install_sign_in(app: FastAPI, services: Services) -> None:
    """Give ``app`` its sign-in providers (``app.state.sign_in``) and, when any is configured,
    its session cookies."""
    app.state.sign_in = Providers(services.settings)
    if not app.state.sign_in.listed():
        return
    if services.session_secret is None:
        raise ValueError(
            "a sign-in provider is configured, but the services have no session secret"
        )
    install_sessions(app, services.settings, services.session_secret)


def providers_of(request: Request) -> Providers:
    """The app's sign-in providers (see ``install_sign_in``)."""
    providers = request.app.state.sign_in
    assert isinstance(providers, Providers)
    return providers
