"""Accounts, keys and donors in a real browser against the real server (keys required): the
API's own messages for a missing or wrong key, honor and key management, no sign-in panel
where the server has no provider, and a running node on the donors page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.browser.conftest import Tab
from tests.fixtures.browser import Playground

pytestmark = [pytest.mark.browser, pytest.mark.slow]

OpenTab = Callable[..., Tab]


def api_message(playground: Playground, method: str, path: str, key: str | None, **kw: Any) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = playground.server.client.request(method, path, headers=headers, **kw)
    assert reply.status_code == 403, reply.text
    return str(reply.json()["message"])


def test_a_missing_or_wrong_key_shows_the_apis_message(
    open_tab: OpenTab, playground: Playground
) -> None:
    tab = open_tab()  # no key
    page = tab.open("account")
    no_key = api_message(playground, "GET", "/api/user/info", None)
    assert page.locator("#me-error").inner_text() == no_key
    assert page.locator("#who").inner_text() == "No API key"

    page.fill("#api-key", "sk-this-is-not-a-key")
    page.click("#api-key-save")
    page.wait_for_function("() => document.querySelector('#who').textContent === 'Key refused'")
    wrong = api_message(playground, "GET", "/api/user/info", "sk-this-is-not-a-key")
    assert page.locator("#me-error").inner_text() == wrong
    assert page.locator("#me").is_hidden()

    tab.open("create")
    page.fill("#prompt", "a fox")
    page.click("#generate")
    body = {"prompt": "a fox"}
    refused = api_message(
        playground, "POST", "/api/sd/txt2img/async", "sk-this-is-not-a-key", json=body
    )
    error = page.locator("#create-task .error")
    error.wait_for()
    assert error.inner_text() == refused


def test_the_account_view_shows_honor_and_manages_keys(
    open_tab: OpenTab, playground: Playground
) -> None:
    tab = open_tab()
    page = tab.open("account")
    page.fill("#api-key", playground.user_key)
    page.click("#api-key-save")
    page.wait_for_selector("#me:visible")
    assert page.locator("#me-nickname").inner_text() == "alice"
    assert page.locator("#who").inner_text().startswith("alice · ")
    assert page.evaluate("localStorage.getItem('dan.apiKey')") == playground.user_key
    page.wait_for_selector("#keys tr")

    page.click("#key-create")
    page.wait_for_selector("#new-key:visible")
    new_key = page.input_value("#new-key-value")
    assert (
        playground.server.client.get(
            "/api/user/info", headers={"Authorization": f"Bearer {new_key}"}
        ).json()["data"]["nickname"]
        == "alice"
    )

    # Revoke the new key from its row (the confirmation is accepted).
    page.once("dialog", lambda dialog: dialog.accept())
    rows = page.locator("#keys tr")
    prefixes = [rows.nth(i).locator("code").inner_text().rstrip("…") for i in range(rows.count())]
    row = next(i for i, prefix in enumerate(prefixes) if new_key.startswith(prefix))
    with page.expect_response("**/api/user/keys/*"):
        rows.nth(row).locator("button").click()
    assert (
        playground.server.client.get(
            "/api/user/info", headers={"Authorization": f"Bearer {new_key}"}
        ).status_code
        == 403
    )
    page.click("#api-key-forget")
    page.wait_for_function("() => document.querySelector('#who').textContent === 'No API key'")
    assert page.evaluate("localStorage.getItem('dan.apiKey')") is None


def test_sign_in_is_hidden_where_the_server_has_no_provider(
    tab: Tab, playground: Playground
) -> None:
    session = playground.server.client.get("/auth/session").json()["data"]
    assert session["providers"] == []
    page = tab.open("account")
    page.wait_for_selector("#me:visible")
    assert page.locator("#signin").is_hidden()


def register_node(playground: Playground, name: str) -> None:
    reply = playground.server.client.post(
        "/api/node/register",
        json={"name": name, "capabilities": {"device": "test"}},
        headers={"Authorization": f"Bearer {playground.donor_key}"},
    )
    assert reply.status_code == 200, reply.text


def test_the_donors_page_lists_a_running_node_and_the_join_command(
    open_tab: OpenTab, playground: Playground
) -> None:
    register_node(playground, "browser-gpu")
    tab = open_tab(key=playground.donor_key)
    page = tab.open("donors")
    row = page.locator("#nodes tr", has_text="browser-gpu")
    row.wait_for()
    assert [cell.strip() for cell in row.locator("td").all_inner_texts()] == [
        "browser-gpu",
        "donor",
        "0",
        "online",
    ]
    command = page.locator("#join-command")
    assert command.inner_text() == (
        f"dan node --server {playground.url} --api-key {playground.donor_key} --name my-gpu"
    )
    page.fill("#node-name", "kitchen gpu")
    assert command.inner_text().endswith("--name 'kitchen gpu'")
    online = [
        n
        for n in playground.server.client.get("/api/nodes").json()["data"]
        if n["status"] == "online"
    ]
    assert page.locator("#nodes-online").inner_text() == f"{len(online)} online"

    tab.open("")
    stats = playground.server.client.get("/api/sd/statistics").json()["data"]
    page.wait_for_function("() => document.querySelector('#stat-nodes').textContent !== '…'")
    assert page.locator("#stat-nodes").inner_text() == str(len(online))
    assert page.locator("#stat-total").inner_text() == f"{stats['totalCount']:,}"
