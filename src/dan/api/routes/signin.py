"""``/auth/...``: signing in with GitHub or an OpenID Connect provider, the session, and the
web page's own API key.

- ``GET /auth/session``: whether the browser is signed in, as whom, the CSRF token, and the
  providers to sign in with (none: sign-in is off).
- ``GET /auth/login/{provider}?next=/path``: off to the provider; ``next`` (a path on this
  server, else "/") is where the browser comes back to.
- ``GET /auth/callback/{provider}``: the provider sends the browser back here; the account is
  found or made, the session starts, and the browser goes on to ``next#signed-in``.
- ``POST /auth/logout``, ``POST /auth/key``: need the session and its CSRF token
  (``X-CSRF-Token``); the key is shown once, and replaces the key made here before.

With no provider configured, the session says so (``providers: []``) and the others answer 404.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from dan.api.generation import context
from dan.api.routes.accounts import account_data, key_data
from dan.api.routes.sd import ok
from dan.api.session import (
    NEXT,
    check_csrf,
    check_session,
    end_session,
    live_session,
    session_of,
    start_session,
)
from dan.api.signin import Providers, providers_of
from dan.errors import PermissionDenied, SignInOff

router = APIRouter(prefix="/auth", tags=["sign in"])

SIGNED_IN_FRAGMENT = "#signed-in"
MAX_NEXT_CHARS = 2000
NO_STORE = "no-store"  # answers with a CSRF token or a key stay out of every cache


def local_path(target: object) -> str:
    """``target`` if it is a path on this server ("/gallery?page=2"), without its fragment;
    anything else (another site, "//host", a scheme, control characters) is "/"."""
    if not isinstance(target, str) or len(target) > MAX_NEXT_CHARS:
        return "/"
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return urlunsplit(("", "", parts.path, parts.query, ""))


def sign_in_on(request: Request) -> Providers:
    """The providers; SignInOff (404) when none is configured."""
    providers = providers_of(request)
    if not providers.listed():
        raise SignInOff()
    return providers


def callback_url(request: Request, provider: str) -> str:
    """Where the provider sends the browser back: under ``public_url`` when it is set."""
    public_url = context(request).services.settings.public_url
    if public_url:
        return f"{public_url.rstrip('/')}/auth/callback/{provider}"
    return str(request.url_for("auth_callback", provider=provider))


@router.get("/session", summary="Whether this browser is signed in, as whom, and how to")
def session_info(request: Request, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = NO_STORE  # it holds the CSRF token
    services = context(request).services
    session = live_session(request)
    account = None
    if session is not None:
        try:
            account = services.sign_in.session_account(session.account)
        except PermissionDenied:  # the account is gone
            end_session(request)
    providers = [{"id": p.id, "name": p.name} for p in providers_of(request).listed()]
    return ok(
        {
            "signedIn": account is not None,
            "account": None if account is None else account_data(account, services.accounts),
            "csrf": None if account is None or session is None else session.csrf,
            "providers": providers,
        }
    )


@router.get("/login/{provider}", summary="Sign in: off to the provider's page")
async def login(provider: str, request: Request, next: str = "/") -> Response:
    providers = sign_in_on(request)
    providers.get(provider)  # 404 for an unknown provider, before anything is kept
    request.session[NEXT] = local_path(next)
    return await providers.redirect(request, provider, callback_url(request, provider))


@router.get("/callback/{provider}", name="auth_callback", summary="The provider's way back")
async def callback(provider: str, request: Request) -> Response:
    services = context(request).services
    identity = await sign_in_on(request).identity(request, provider)
    signed_in = await run_in_threadpool(services.sign_in.sign_in, identity)
    target = local_path(request.session.get(NEXT))
    start_session(request, signed_in.account.id, services.settings.session_max_age_s)
    return RedirectResponse(target + SIGNED_IN_FRAGMENT, status_code=302)


@router.post("/logout", summary="Sign out (needs the X-CSRF-Token header)")
def logout(request: Request) -> dict[str, Any]:
    sign_in_on(request)
    session = live_session(request)
    if session is not None:
        check_csrf(request, session)
    end_session(request)
    return ok(None)


@router.post("/key", summary="A new API key for the signed-in account, shown this once only")
def new_key(request: Request, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = NO_STORE
    sign_in_on(request)
    session = session_of(request)
    if session is None:
        raise PermissionDenied("sign in first: GET /auth/login/{provider}")
    check_session(request, session)
    sign_in = context(request).services.sign_in
    new = sign_in.issue_key(sign_in.session_account(session.account))
    return ok({**key_data(new.info), "key": new.key})
