"""Signing in with an OpenID Connect provider, end to end: a real provider on loopback
(tests/fixtures/sign_in.py), the real server under uvicorn, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dan.api.app import create_app
from dan.api.routes.signin import local_path
from dan.api.session import SESSION_COOKIE
from dan.db.tables import accounts, identities
from dan.services import Services, build_services
from tests.api.conftest import install_dummy_checkpoint, make_settings
from tests.fixtures.fake_github import FakeGitHub
from tests.fixtures.live import serving
from tests.fixtures.postgres import schema_url
from tests.fixtures.server import free_port
from tests.fixtures.sign_in import (
    Browser,
    cookie_values,
    oidc_provider,
    register_client,
    session_cookie,
    set_claims,
    set_session_cookie,
)

POSTGRES_URL = os.environ.get("DAN_TEST_POSTGRES_URL")
SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
IDP_NAME = "Example ID"


@dataclass
class Site:
    """A DAN server with sign-in through the provider at ``issuer``; ``browser`` is one
    browser's view of it, ``url`` its address."""

    services: Services
    browser: Browser
    issuer: str
    url: str

    def new_browser(self) -> Browser:
        client = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)
        self._opened.append(client)
        return Browser(client)

    def bearer(self, method: str, path: str, key: str, **kwargs: Any) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=30.0, trust_env=False) as client:
            headers = {"Authorization": f"Bearer {key}"}
            response = client.request(method, path, headers=headers, **kwargs)
        return {**response.json(), "_http": response.status_code}

    def __post_init__(self) -> None:
        self._opened: list[httpx.Client] = []


Start = Callable[..., Site]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Start]:
    """Starts a provider and a DAN server that signs in with it (keys required unless
    ``overrides`` say otherwise)."""
    with contextlib.ExitStack() as stack:

        def start_site(**overrides: Any) -> Site:
            if request.param == "postgresql":
                if not POSTGRES_URL:
                    pytest.skip("set DAN_TEST_POSTGRES_URL to run the sign-in suite on PostgreSQL")
                overrides["database_url"] = stack.enter_context(schema_url(POSTGRES_URL))
            issuer = stack.enter_context(oidc_provider())
            port = free_port()
            client = register_client(issuer, f"http://127.0.0.1:{port}/auth/callback/oidc")
            install_dummy_checkpoint(tmp_path / "models")
            values = {
                "auth": "required",
                "oidc_issuer": client.issuer,
                "oidc_client_id": client.client_id,
                "oidc_client_secret": client.client_secret,
                "oidc_name": IDP_NAME,
                **overrides,
            }
            services = build_services(make_settings(tmp_path, **values))
            stack.callback(services.close)
            dan = stack.enter_context(serving(create_app(services), port=port))
            site = Site(services, Browser(dan), issuer, f"http://127.0.0.1:{port}")
            stack.callback(lambda: [opened.close() for opened in site._opened])
            return site

        yield start_site


def identity_rows(services: Services) -> list[Any]:
    with services.db.connect() as conn:
        return list(conn.execute(select(identities)).mappings())


def email_of(services: Services, account_id: str) -> Any:
    with services.db.connect() as conn:
        query = select(accounts.c.email).where(accounts.c.id == account_id)
        return conn.execute(query).scalar_one()


def test_sign_in_makes_an_account_with_the_signup_honor(start: Start) -> None:
    site = start()
    browser = site.browser
    before = browser.session()
    assert before == {
        "signedIn": False,
        "account": None,
        "csrf": None,
        "providers": [{"id": "oidc", "name": IDP_NAME}],
    }
    set_claims(site.issuer, "sub-alice", preferred_username="alice", email="al@example.org")

    back = browser.sign_in("sub-alice", next_path="/gallery?page=2")

    assert back.status_code == 302
    assert back.headers["location"] == "/gallery?page=2#signed-in"
    cookie = back.headers["set-cookie"].lower()
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "httponly" in cookie
    assert "samesite=lax" in cookie and "secure" not in cookie  # served over http
    stored = browser.dan.cookies[SESSION_COOKIE]
    assert set(cookie_values(stored)) == {"account", "csrf", "exp"}  # no provider token
    assert browser.dan.get("/auth/session").headers["cache-control"] == "no-store"
    session = browser.session()
    assert session["signedIn"] is True and isinstance(session["csrf"], str)
    account = session["account"]
    assert (account["nickname"], account["honor"]) == ("alice", 10.0)
    assert (account["isAdmin"], account["canRunNodes"]) == (False, False)
    [row] = identity_rows(site.services)
    assert (row["provider"], row["subject"], row["account"]) == (
        site.issuer,
        "sub-alice",
        account["id"],
    )
    assert email_of(site.services, account["id"]) is None  # nothing kept but the subject
    info = browser.call("GET", "/api/user/info")  # the API knows the session
    assert (info["_http"], info["data"]["id"]) == (200, account["id"])


def test_the_key_of_the_web_page_works_and_rotates(start: Start) -> None:
    site = start(max_keys_per_account=2)
    browser = site.browser
    set_claims(site.issuer, "sub-bob", preferred_username="bob")
    browser.sign_in("sub-bob")
    csrf = browser.session()["csrf"]
    admin_made = site.services.accounts.issue_key("bob").key.key  # `dan keys create`

    answer = browser.dan.post("/auth/key", headers={"X-CSRF-Token": csrf})
    assert answer.headers["cache-control"] == "no-store"
    first = {**answer.json(), "_http": answer.status_code}
    assert first["_http"] == 200, first
    assert first["data"]["origin"] == "web"
    key = first["data"]["key"]
    assert key.startswith("sk-") and first["data"]["prefix"] == key[:7]
    submitted = site.bearer("POST", "/api/sd/txt2img/async", key, json=SMALL)
    assert submitted["_http"] == 200 and submitted["data"]["taskId"], submitted

    second = browser.call("POST", "/auth/key", csrf)["data"]["key"]
    old = site.bearer("GET", "/api/user/info", key)
    assert old["_http"] == 403 and "revoked" in old["message"]
    assert site.bearer("GET", "/api/user/info", second)["data"]["nickname"] == "bob"
    assert site.bearer("GET", "/api/user/info", admin_made)["_http"] == 200  # kept
    keys = browser.call("GET", "/api/user/keys")["data"]
    assert sorted(k["prefix"] for k in keys) == sorted([admin_made[:7], second[:7]])

    site.services.accounts.revoke_keys(site.services.accounts.find(nickname="bob"))
    site.services.accounts.issue_key("bob")
    site.services.accounts.issue_key("bob")  # the admin's keys fill the account's two
    full = browser.call("POST", "/auth/key", csrf)
    assert full["_http"] == 409 and "DAN_MAX_KEYS_PER_ACCOUNT=2" in full["message"]


def test_state_changes_need_the_csrf_token(start: Start) -> None:
    site = start()
    browser = site.browser
    browser.sign_in("sub-carol")
    csrf = browser.session()["csrf"]
    for token in (None, "wrong", csrf[:-1]):
        for method, path, body in (
            ("POST", "/auth/key", None),
            ("POST", "/api/sd/txt2img/async", SMALL),
            ("POST", "/api/user/keys", None),
            ("POST", "/auth/logout", None),
        ):
            refused = browser.call(method, path, token, json=body)
            assert (refused["_http"], refused["code"]) == (403, 1000), (path, refused)
            assert "X-CSRF-Token" in refused["message"]
    assert site.services.tasks.statistics().total == 0
    assert browser.session()["signedIn"] is True  # the forged logout did nothing
    submitted = browser.call("POST", "/api/sd/txt2img/async", csrf, json=SMALL)
    assert submitted["_http"] == 200, submitted


def test_sign_out_ends_the_session(start: Start) -> None:
    site = start()
    browser = site.browser
    browser.sign_in("sub-dave")
    csrf = browser.session()["csrf"]
    assert browser.call("POST", "/auth/logout", csrf)["_http"] == 200
    assert browser.session()["signedIn"] is False
    after = browser.call("GET", "/api/user/info")
    assert after["_http"] == 403 and "needs an API key" in after["message"]
    assert browser.call("POST", "/auth/key", csrf)["_http"] == 403


def test_a_second_sign_in_finds_the_same_account(start: Start) -> None:
    site = start()
    set_claims(site.issuer, "sub-erin", preferred_username="erin")
    site.browser.sign_in("sub-erin")
    first = site.browser.session()["account"]
    elsewhere = site.new_browser()
    elsewhere.sign_in("sub-erin")
    again = elsewhere.session()["account"]
    assert (again["id"], again["nickname"], again["honor"]) == (first["id"], "erin", 10.0)
    assert len(identity_rows(site.services)) == 1
    assert elsewhere.session()["csrf"] != site.browser.session()["csrf"]


def test_nicknames_are_made_unique_and_never_reserved(start: Start) -> None:
    site = start()
    set_claims(site.issuer, "sub-1", preferred_username="frank")
    set_claims(site.issuer, "sub-2", preferred_username="frank")
    set_claims(site.issuer, "sub-3", email="frank@example.org")
    set_claims(site.issuer, "sub-4", preferred_username="anon-3", email="local@example.org")
    set_claims(site.issuer, "sub-5", preferred_username="Zoë Dupont")
    names = []
    for subject in ("sub-1", "sub-2", "sub-3", "sub-4", "sub-5"):
        browser = site.new_browser()
        browser.sign_in(subject)
        names.append(browser.session()["account"]["nickname"])
    assert names == ["frank", "frank-2", "frank-3", "user", "Zo-Dupont"]


def test_forged_and_expired_sessions_are_refused(start: Start) -> None:
    site = start()
    site.browser.sign_in("sub-gina")
    real = cookie_values(site.browser.dan.cookies[SESSION_COOKIE])
    secret = site.services.session_secret
    assert secret is not None

    forged = site.new_browser()
    set_session_cookie(forged.dan, session_cookie("another-secret-" + "x" * 32, real))
    assert forged.session()["signedIn"] is False
    refused = forged.call("GET", "/api/user/info")
    assert refused["_http"] == 403 and "needs an API key" in refused["message"]

    expired = site.new_browser()
    past = {**real, "exp": time.time() - 1}
    set_session_cookie(expired.dan, session_cookie(secret, past))
    answer = expired.dan.get("/api/user/info")
    assert answer.status_code == 403 and "expired" in answer.json()["message"]
    cleared = answer.headers["set-cookie"]  # the answer deletes the cookie
    assert cleared.startswith(f"{SESSION_COOKIE}=null;") and "expires=Thu, 01 Jan 1970" in cleared
    set_session_cookie(expired.dan, session_cookie(secret, past))
    assert expired.session()["signedIn"] is False
    assert expired.call("POST", "/auth/key", real["csrf"])["_http"] == 403

    same = site.new_browser()  # the same secret and values: the server's own cookie
    set_session_cookie(same.dan, session_cookie(secret, real))
    assert same.call("GET", "/api/user/info")["_http"] == 200


def test_refusals_at_the_provider_and_replayed_callbacks(start: Start) -> None:
    site = start()
    browser = site.browser
    started = browser.start()
    denied = browser.dan.get(browser.at_provider(started.headers["location"], "", deny=True))
    assert denied.status_code == 400 and "access_denied" in denied.json()["message"]
    assert browser.session()["signedIn"] is False

    started = browser.start()
    callback = browser.at_provider(started.headers["location"], "sub-hal")
    stranger = site.new_browser()  # a callback this browser never started
    assert stranger.dan.get(callback).status_code == 400
    assert stranger.session()["signedIn"] is False
    assert browser.dan.get(callback).status_code == 302
    assert browser.dan.get(callback).status_code == 400  # a callback is good once
    assert browser.session()["account"]["nickname"] == "sub-hal"  # the mock's email: the sub


@pytest.mark.parametrize(
    "target", ["https://evil.example/x", "//evil.example/x", "/\\evil.example", "javascript:x"]
)
def test_next_is_a_path_on_this_server(target: str) -> None:
    assert local_path(target) == "/"


def test_next_keeps_a_local_path_and_its_query() -> None:
    assert local_path("/gallery?page=2#top") == "/gallery?page=2"
    assert local_path("/a\nb") == "/"
    assert local_path(None) == "/"


def test_sign_in_never_sends_the_browser_elsewhere(start: Start) -> None:
    site = start()
    back = site.browser.sign_in("sub-ivy", next_path="https://evil.example/")
    assert back.headers["location"] == "/#signed-in"
    assert site.browser.start("github").status_code == 404  # not configured here


def test_with_optional_keys_a_session_is_its_account_and_no_cookie_is_local(
    start: Start,
) -> None:
    site = start(auth="optional")
    site.browser.sign_in("sub-jo")
    signed_in = site.browser.call("GET", "/api/user/info")["data"]
    assert signed_in["id"] == site.browser.session()["account"]["id"]
    anonymous = site.new_browser().call("GET", "/api/user/info")["data"]
    assert anonymous["id"] == "local"


def test_a_public_https_url_names_the_callback_and_secures_the_cookie(start: Start) -> None:
    site = start(public_url="https://dan.example/")
    started = site.browser.start()
    query = parse_qs(urlsplit(started.headers["location"]).query)
    assert query["redirect_uri"] == ["https://dan.example/auth/callback/oidc"]
    assert "secure" in started.headers["set-cookie"].lower()


def test_without_a_provider_sign_in_is_off_and_keys_work(tmp_path: Path) -> None:
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path, auth="required"))
    assert services.session_secret is None
    assert not (tmp_path / "data" / "session-secret").exists()
    key = services.accounts.issue_key("kim").key.key  # `dan keys create`
    with TestClient(create_app(services)) as client:
        session = client.get("/auth/session")
        assert session.json()["data"] == {
            "signedIn": False,
            "account": None,
            "csrf": None,
            "providers": [],
        }
        assert "set-cookie" not in session.headers
        for method, path in (
            ("GET", "/auth/login/oidc"),
            ("GET", "/auth/login/github"),
            ("GET", "/auth/callback/oidc?code=x&state=y"),
            ("POST", "/auth/logout"),
            ("POST", "/auth/key"),
        ):
            off = client.request(method, path)
            assert off.status_code == 404, (path, off.text)
            assert "Sign-in is off on this server" in off.json()["message"]
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/api/user/info", headers=headers).json()["data"]["nickname"] == "kim"
        submitted = client.post("/api/sd/txt2img/async", json=SMALL, headers=headers)
        assert submitted.status_code == 200 and "set-cookie" not in submitted.headers
    services.close()


def test_sign_in_with_github(tmp_path: Path) -> None:
    """GitHub's code path against a local fake of its three OAuth endpoints (see
    tests/fixtures/fake_github.py): the user's numeric id is the subject, ``login`` the name."""
    github = FakeGitHub("gh-client", "gh-secret")
    github.sign_in_as(583231, "octocat", "octo@example.org")
    install_dummy_checkpoint(tmp_path / "models")
    with serving(github.app()) as fake:
        url = str(fake.base_url).rstrip("/")
        settings = make_settings(
            tmp_path,
            auth="required",
            github_client_id="gh-client",
            github_client_secret="gh-secret",
            github_url=url,
            github_api_url=url,
        )
        services = build_services(settings)
        with serving(create_app(services)) as dan:
            browser = Browser(dan)
            assert browser.session()["providers"] == [{"id": "github", "name": "GitHub"}]
            started = browser.start("github", next_path="/me")
            assert started.status_code == 302
            at_github = httpx.get(started.headers["location"])
            back = dan.get(at_github.headers["location"])
            assert back.headers["location"] == "/me#signed-in"
            account = browser.session()["account"]
            assert (account["nickname"], account["honor"]) == ("octocat", 10.0)
            [row] = identity_rows(services)
            assert (row["provider"], row["subject"]) == (url, "583231")
            assert set(cookie_values(dan.cookies[SESSION_COOKIE])) == {"account", "csrf", "exp"}
            github.sign_in_as(583231, "octocat-renamed")  # a login can change; the id stays
            again = Browser(httpx.Client(base_url=dan.base_url, trust_env=False))
            started = again.start("github")
            again.dan.get(httpx.get(started.headers["location"]).headers["location"])
            assert again.session()["account"]["id"] == account["id"]
            again.dan.close()
        services.close()
