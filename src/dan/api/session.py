"""Sign-in sessions: a signed cookie that holds an account id, a CSRF token and an expiry.

Starlette's SessionMiddleware signs the cookie (itsdangerous, with ``session_secret``): a cookie
that was forged or altered reads as no session at all. The cookie is http-only and
``SameSite=Lax``, and ``Secure`` when the public URL is https. A session ends
``session_max_age_s`` after sign-in, however often it is used; an expired one is refused and
cleared.

CSRF: a browser sends the cookie with any request to this server, including one a page on
another site makes it send. So a state-changing request (any method but GET, HEAD and OPTIONS)
that the cookie authenticates must also carry ``X-CSRF-Token``, equal to the session's token,
which only pages of this server can read (from ``GET /auth/session``). Requests with an API key
are not affected: a browser never adds a key by itself.

SessionMiddleware is installed only when a sign-in provider is configured; without it no
request has a session, and nothing here changes how requests are authenticated.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import time

from fastapi import FastAPI, Request
from starlette.middleware.sessions import SessionMiddleware

from dan.config import Settings
from dan.errors import PermissionDenied

SESSION_COOKIE = "dan_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ACCOUNT, CSRF, EXPIRES = "account", "csrf", "exp"  # the session's keys
NEXT = "next"  # the page to return to, kept only while the provider is asked


@dataclasses.dataclass(frozen=True)
class Session:
    """A signed-in session: whose, its CSRF token, and when it ends (UNIX seconds)."""

    account: str
    csrf: str
    expires_at: float

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


def install_sessions(app: FastAPI, settings: Settings, secret: str) -> None:
    """Sign and read the session cookie on every request of ``app``."""
    https = (settings.public_url or "").startswith("https://")
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret,
        session_cookie=SESSION_COOKIE,
        max_age=int(settings.session_max_age_s),
        same_site="lax",
        https_only=https,
    )


def session_of(request: Request) -> Session | None:
    """The signed-in session of ``request`` (expired or not), or None if it has none."""
    if "session" not in request.scope:  # sign-in is off: no SessionMiddleware
        return None
    values = request.session
    account, csrf, expires = values.get(ACCOUNT), values.get(CSRF), values.get(EXPIRES)
    if isinstance(account, str) and isinstance(csrf, str) and isinstance(expires, int | float):
        return Session(account, csrf, float(expires))
    return None


def live_session(request: Request) -> Session | None:
    """The request's session if it has not expired; an expired one is cleared, and None."""
    session = session_of(request)
    if session is not None and session.expired(time.time()):
        end_session(request)
        return None
    return session


def start_session(request: Request, account_id: str, max_age_s: float) -> Session:
    """Replace whatever the request's session held by a new signed-in session of
    ``account_id`` with a new CSRF token (so no token from before sign-in stays valid)."""
    session = Session(account_id, secrets.token_urlsafe(32), time.time() + max_age_s)
    request.session.clear()
    request.session.update(
        {ACCOUNT: session.account, CSRF: session.csrf, EXPIRES: session.expires_at}
    )
    return session


def end_session(request: Request) -> None:
    """Empty the session; the response then deletes the cookie."""
    if "session" in request.scope:
        request.session.clear()


def check_session(request: Request, session: Session) -> None:
    """PermissionDenied if ``session`` expired (it is then cleared), or if ``request`` changes
    state without the session's CSRF token (``check_csrf``)."""
    if session.expired(time.time()):
        end_session(request)
        raise PermissionDenied("your sign-in session expired; sign in again")
    check_csrf(request, session)


def check_csrf(request: Request, session: Session) -> None:
    """PermissionDenied if ``request`` changes state (its method is not GET, HEAD or OPTIONS)
    and its ``X-CSRF-Token`` header is not the session's token."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        what = "a wrong" if sent else "no"
        raise PermissionDenied(
            f"this request is signed in by the session cookie and changes something, but it "
            f"sent {what} {CSRF_HEADER} header; send the 'csrf' value of GET /auth/session in it"
        )
