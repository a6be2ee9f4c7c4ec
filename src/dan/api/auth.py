"""Who is calling: the caller's account, by the rules of dan.accounts.service.

A request carries its key as ``Authorization: Bearer sk-...`` or, as the original accepted,
the bare key; under the AUTOMATIC1111 facade (``/sdapi``, ``/controlnet``) also as HTTP Basic
credentials with the key as the password (any user name), which is what A1111 clients send.
A request without a key but with a sign-in session cookie is the session's account
(state-changing ones must carry the session's CSRF token: see dan.api.session).
Each function here is a plain function of the request, usable as a FastAPI dependency
(``Depends(caller)``: FastAPI then runs it in its thread pool, off the event loop) or called
directly. They raise PermissionDenied, which the error table answers with 403 and
code 1000 (under the facade: 401 with ``WWW-Authenticate: Basic``).

A request that carries one of ``PROXY_HEADERS`` came through a reverse proxy or a tunnel, so
its peer address says nothing about the client: with ``auth=auto`` it needs a key even on the
embedded server. A proxy that adds none of these headers (nginx's ``proxy_pass`` as it comes, an
SSH tunnel) cannot be told from a local client; behind one, set ``DAN_AUTH=required``.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import Request

from dan.api.a1111 import is_facade_path
from dan.api.generation import context
from dan.api.session import check_session, session_of
from dan.domain import Account
from dan.errors import PermissionDenied

# Headers that reverse proxies, load balancers, CDNs and tunnels (nginx and Apache when told
# to, Caddy, Traefik, cloudflared, ngrok, ...) add to say whom they forward for.
PROXY_HEADERS = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Real-IP",
    "Via",
    "CF-Connecting-IP",
    "True-Client-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "Fastly-Client-IP",
)


def proxy_header(request: Request) -> str | None:
    """The first of ``PROXY_HEADERS`` the request carries, or None if it has none."""
    return next((name for name in PROXY_HEADERS if name in request.headers), None)


def api_key(request: Request) -> str | None:
    """The key the request sends, with or without ``Bearer`` (or as the password of HTTP
    Basic credentials, under the A1111 facade); None if it sends none."""
    header = request.headers.get("authorization", "").strip()
    if header[:6].lower() == "basic " and is_facade_path(request.url.path):
        return basic_password(header[6:].strip())
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    return header or None


def basic_password(credentials: str) -> str | None:
    """The password of HTTP Basic ``credentials`` (base64 of ``user:password``); the user
    name when there is no password (some clients put the key there); None when both are empty.
    Credentials that do not decode are taken as they are, as a key no account has."""
    try:
        text = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return credentials or None
    user, _, password = text.partition(":")
    return password or user or None


def caller(request: Request) -> Account:
    """The caller's account (looked up once per request, then remembered on it)."""
    known = getattr(request.state, "dan_account", None)
    if isinstance(known, Account):
        return known
    services = context(request).services
    key = api_key(request)
    session = session_of(request) if key is None else None
    if session is not None:  # signed in on the web page (see dan.api.session)
        check_session(request, session)
        account = services.sign_in.session_account(session.account)
    else:
        account = services.accounts.authenticate(key, proxy_header=proxy_header(request))
    request.state.dan_account = account
    return account


def account_of(request: Request) -> str:
    """The id of the caller's account: the queue lane its tasks join."""
    return caller(request).id


def require_admin(request: Request) -> Account:
    """The caller, who must be an admin."""
    account = caller(request)
    if not account.is_admin:
        raise PermissionDenied("this needs an admin account")
    return account


def require_node_runner(request: Request) -> Account:
    """The caller, whose account must be allowed to run nodes (admins are)."""
    account = caller(request)
    if not (account.can_run_nodes or account.is_admin):
        raise PermissionDenied(
            "this account may not run nodes; an admin can allow it with "
            "`dan keys roles NICKNAME --nodes`"
        )
    return account


def task_owner(account: Account) -> str | None:
    """Whose tasks ``account`` may see and cancel: its own, or (None) any for an admin."""
    return None if account.is_admin else account.id
