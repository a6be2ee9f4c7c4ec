"""Signing in from the page, end to end: the real `dan serve` (keys required, no worker) with
sign-in through a real OpenID Connect provider on loopback (oidc-provider-mock, as
tests/api/test_sign_in.py uses), the browser going to the provider's form and back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import Tab
from tests.fixtures.server import Server, free_port, start_server
from tests.fixtures.sign_in import oidc_provider, register_client, set_claims

if TYPE_CHECKING:  # the tests skip, rather than fail to import, without playwright
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROVIDER = "Example ID"


@dataclass
class SignInSite:
    server: Server
    issuer: str


@pytest.fixture(scope="module")
def site(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignInSite]:
    root: Path = tmp_path_factory.mktemp("sign-in")
    port = free_port()
    with oidc_provider() as issuer:
        client = register_client(issuer, f"http://127.0.0.1:{port}/auth/callback/oidc")
        server = start_server(
            root,
            port=port,
            DAN_WORKER="false",
            DAN_AUTH="required",
            DAN_OIDC_ISSUER=client.issuer,
            DAN_OIDC_CLIENT_ID=client.client_id,
            DAN_OIDC_CLIENT_SECRET=client.client_secret,
            DAN_OIDC_NAME=PROVIDER,
        )
        try:
            yield SignInSite(server, issuer)
        finally:
            server.stop()


def test_sign_in_make_a_key_and_sign_out(open_tab: Callable[..., Tab], site: SignInSite) -> None:
    set_claims(site.issuer, "sub-carol", preferred_username="carol", email="carol@example.org")
    tab = open_tab(base=site.server.url)
    page = tab.open("account")
    link = page.locator("#signin-providers a")
    link.wait_for()
    assert link.inner_text() == f"Sign in with {PROVIDER}"
    assert page.locator("#me-error").inner_text().startswith("no API key")

    link.click()  # off to the provider's authorization form
    page.fill("input[name=sub]", "sub-carol")
    page.click("button:has-text('Authorize')")
    page.wait_for_url(f"{site.server.url}/#/account")  # back, and on the account view
    page.wait_for_selector("#me:visible")
    assert page.locator("#signin-state").inner_text().startswith("Signed in as carol")
    assert page.locator("#me-nickname").inner_text() == "carol"
    assert page.locator("#who").inner_text().startswith("carol · ")
    csrf = page.evaluate("async () => (await (await fetch('/auth/session')).json()).data.csrf")

    # A POST with the session alone: it carries the CSRF token, and no key.
    with page.expect_request("**/auth/key") as made:
        page.click("#signin-key")
    assert made.value.headers.get("x-csrf-token") == csrf
    assert "authorization" not in made.value.headers
    page.wait_for_selector("#new-key:visible")
    key = page.input_value("#new-key-value")
    info = site.server.client.get("/api/user/info", headers={"Authorization": f"Bearer {key}"})
    assert info.json()["data"]["nickname"] == "carol"
    page.wait_for_selector("#keys tr")

    page.click("#signout")
    link.wait_for()
    assert page.locator("#signout").is_hidden()
    assert page.locator("#who").inner_text() == "No API key"
    assert page.locator("#me").is_hidden()
