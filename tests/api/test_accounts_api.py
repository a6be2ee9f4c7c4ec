"""Accounts over HTTP: keys, ownership of tasks, honor, the public key and the embedded mode."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from sqlalchemy import select

from dan.accounts import HonorReason, SqlAccountStore, queue_weight
from dan.api.app import create_app
from dan.api.auth import require_node_runner
from dan.db.tables import accounts as accounts_table
from dan.domain import PUBLIC_ACCOUNT, Account, ModelKind
from dan.errors import PermissionDenied
from dan.services import build_services
from tests.api.conftest import Api, install_dummy_checkpoint, make_settings
from tests.fixtures.live import serving

TXT2IMG = "/api/sd/txt2img"
SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}


@contextlib.contextmanager
def serve(tmp_path: Path, **overrides: object) -> Iterator[Api]:
    """The app on its own data folder, with settings ``overrides`` and a test-only route
    that only node runners may call."""
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path, **overrides))
    app = create_app(services)

    @app.get("/_test/node-runner")
    def node_runner(account: Annotated[Account, Depends(require_node_runner)]) -> dict[str, str]:
        return {"id": account.id}

    # The playground's mount at / answers whatever no earlier route took: go before it.
    app.router.routes.insert(0, app.router.routes.pop())
    sha = services.registry.list(ModelKind.CHECKPOINT)[0].sha256
    with TestClient(app) as client:
        yield Api(client, services, sha)
    services.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_for(api: Api, nickname: str, **roles: bool) -> str:
    return api.services.accounts.issue_key(nickname, **roles).key.key


def post_as(api: Api, path: str, body: object, key: str) -> dict[str, Any]:
    return api.post(path, body, headers=bearer(key))


def get(api: Api, path: str, **kwargs: Any) -> dict[str, Any]:
    response = api.client.get(path, **kwargs)
    return {**response.json(), "_http": response.status_code}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Api]:
    """A server that requires keys and offers no public key."""
    with serve(tmp_path, auth="required") as api:
        yield api


def test_bearer_and_bare_keys_both_work(secured: Api) -> None:
    key = key_for(secured, "alice")
    for headers in (bearer(key), {"Authorization": key}, {"Authorization": f"bearer  {key} "}):
        reply = get(secured, "/api/user/info", headers=headers)
        assert (reply["_http"], reply["code"], reply["message"]) == (200, 200, "success")
        data = reply["data"]
        assert (data["nickname"], data["honor"], data["isAdmin"], data["canRunNodes"]) == (
            "alice",
            10.0,
            False,
            False,
        )


def refused_everywhere(api: Api, headers: dict[str, str]) -> None:
    calls: list[tuple[str, str, object]] = [
        ("GET", "/api/user/info", None),
        ("GET", "/api/user/keys", None),
        ("POST", "/api/user/keys", None),
        ("DELETE", "/api/user/keys/some-id", None),
        ("POST", "/api/admin/honor", {"nickname": "alice", "amount": 5}),
        ("POST", f"{TXT2IMG}/async", SMALL),
        ("POST", TXT2IMG, SMALL),
        ("POST", "/api/sd/task/status", {"taskId": "x"}),
        ("POST", "/api/sd/task/cancel", {"taskId": "x"}),
        ("GET", "/_test/node-runner", None),
    ]
    for method, path, body in calls:
        response = api.client.request(method, path, json=body, headers=headers)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["code"] == 1000, path
    v0 = api.client.post("/v0/txt2img", json=SMALL, headers=headers)
    assert v0.status_code == 403 and "key" in v0.json()["msg"]


def test_missing_invalid_and_revoked_keys_are_refused(secured: Api) -> None:
    issued = secured.services.accounts.issue_key("alice")
    secured.services.accounts.revoke_key(None, issued.key.info.id)
    refused_everywhere(secured, {})
    refused_everywhere(secured, bearer("sk-" + "x" * 48))
    refused_everywhere(secured, bearer(issued.key.key))
    missing = get(secured, "/api/user/info")
    assert "needs an API key" in missing["message"]
    revoked = get(secured, "/api/user/info", headers=bearer(issued.key.key))
    assert "revoked" in revoked["message"]
    assert secured.services.tasks.statistics().total == 0


def test_another_accounts_task_answers_404(secured: Api) -> None:
    alice, bob = key_for(secured, "alice"), key_for(secured, "bob")
    admin = key_for(secured, "root", is_admin=True)
    task_id = secured.post(f"{TXT2IMG}/async", SMALL, headers=bearer(alice))["data"]["taskId"]
    for path in ("/api/sd/task/status", "/api/sd/task/cancel"):
        reply = secured.post(path, {"taskId": task_id}, headers=bearer(bob))
        assert (reply["_http"], reply["code"]) == (404, 3000), reply
    mine = secured.post("/api/sd/task/status", {"taskId": task_id}, headers=bearer(alice))
    assert mine["_http"] == 200 and mine["data"]["status"] == 0  # bob's cancel did nothing
    seen = secured.post("/api/sd/task/status", {"taskId": task_id}, headers=bearer(admin))
    assert seen["_http"] == 200
    cancelled = secured.post("/api/sd/task/cancel", {"taskId": task_id}, headers=bearer(admin))
    assert cancelled["_http"] == 200 and cancelled["data"]["status"] == 3


def test_only_admins_grant_honor(secured: Api) -> None:
    alice = key_for(secured, "alice")
    admin = key_for(secured, "root", is_admin=True)
    grant = {"nickname": "alice", "amount": 5, "note": "thanks"}
    refused = secured.post("/api/admin/honor", grant, headers=bearer(alice))
    assert (refused["_http"], refused["code"]) == (403, 1000)
    granted = secured.post("/api/admin/honor", grant, headers=bearer(admin))
    assert granted["_http"] == 200 and granted["data"]["honor"] == 15.0
    alice_id = granted["data"]["id"]
    by_id = post_as(secured, "/api/admin/honor", {"account": alice_id, "amount": -2.5}, admin)
    assert by_id["data"]["honor"] == 12.5
    info = get(secured, "/api/user/info", headers=bearer(alice))["data"]
    assert info["honor"] == 12.5 and info["queueWeight"] > 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"nickname": "alice", "amount": 0}, "amount must be a non-zero number"),
        ({"nickname": "alice", "amount": "abc"}, "Invalid amount"),
        ({"nickname": "alice", "amount": 1e9}, "Invalid amount"),
        ({"nickname": "alice"}, "Invalid amount: is required"),
        ({"amount": 5}, "exactly one of account (id) or nickname"),
        (
            {"nickname": "alice", "account": "x", "amount": 5},
            "exactly one of account (id) or nickname",
        ),
        ({"nickname": "nobody", "amount": 5}, "no account with nickname 'nobody'"),
        ({"account": "nobody", "amount": 5}, "no account with id 'nobody'"),
    ],
)
def test_bad_honor_grants_are_400(secured: Api, body: dict[str, Any], message: str) -> None:
    key_for(secured, "alice")
    admin = key_for(secured, "root", is_admin=True)
    reply = post_as(secured, "/api/admin/honor", body, admin)
    assert (reply["_http"], reply["code"]) == (400, 3000), reply
    assert message in reply["message"]


def test_only_node_runners_and_admins_pass_require_node_runner(secured: Api) -> None:
    keys = {
        "alice": key_for(secured, "alice"),
        "runner": key_for(secured, "runner", can_run_nodes=True),
        "root": key_for(secured, "root", is_admin=True),
    }
    codes = {
        n: secured.client.get("/_test/node-runner", headers=bearer(k)).status_code
        for n, k in keys.items()
    }
    assert codes == {"alice": 403, "runner": 200, "root": 200}


def test_keys_are_listed_by_prefix_and_shown_only_when_made(secured: Api) -> None:
    first = key_for(secured, "alice")
    made = post_as(secured, "/api/user/keys", None, first)
    assert made["_http"] == 200
    second = made["data"]["key"]
    assert second.startswith("sk-") and made["data"]["prefix"] == second[:7]
    listing = secured.client.get("/api/user/keys", headers=bearer(second))
    assert first not in listing.text and second not in listing.text
    keys = listing.json()["data"]
    assert [k["prefix"] for k in keys] == [first[:7], second[:7]]
    assert all(k["revokedAt"] is None and k["createdAt"] > 0 for k in keys)
    assert keys[0]["lastUsedAt"] is not None

    bob = key_for(secured, "bob")
    not_bobs = secured.client.delete(f"/api/user/keys/{keys[0]['id']}", headers=bearer(bob))
    assert (
        not_bobs.status_code == 400 and "no API key of this account" in not_bobs.json()["message"]
    )
    revoked = secured.client.delete(f"/api/user/keys/{keys[0]['id']}", headers=bearer(second))
    assert revoked.status_code == 200 and revoked.json()["data"]["revokedAt"] is not None
    assert get(secured, "/api/user/info", headers=bearer(first))["_http"] == 403
    remaining = get(secured, "/api/user/keys", headers=bearer(second))["data"]
    assert [k["prefix"] for k in remaining] == [second[:7]]


def test_public_key_off_refuses_anonymous_callers(secured: Api) -> None:
    reply = get(secured, "/api/user/public-api-key")
    assert (reply["_http"], reply["code"]) == (403, 1000)
    assert "no public API key" in reply["message"]
    file_key = secured.services.public_api_key  # exists, but is not accepted
    assert get(secured, "/api/user/info", headers=bearer(file_key))["_http"] == 403


def test_public_key_on_is_the_public_account_at_the_lowest_weight(tmp_path: Path) -> None:
    with serve(tmp_path, auth="required", public_key=True) as api:
        public = get(api, "/api/user/public-api-key")["data"]["apiKey"]
        assert public.startswith("sk-") and len(public) == 51
        assert get(api, "/api/user/info")["_http"] == 403  # still no keyless access
        info = get(api, "/api/user/info", headers={"Authorization": public})["data"]
        alice = get(api, "/api/user/info", headers=bearer(key_for(api, "alice")))["data"]
        assert info["id"] == PUBLIC_ACCOUNT and info["queueWeight"] == 0.25
        assert info["queueWeight"] < 1.0 < alice["queueWeight"]
        queued = api.post(f"{TXT2IMG}/async", SMALL, headers=bearer(public))
        assert queued["_http"] == 200
        assert api.services.tasks.get(queued["data"]["taskId"]).account == PUBLIC_ACCOUNT
        refused = api.post("/api/user/keys", None, headers=bearer(public))
        assert (refused["_http"], refused["code"]) == (403, 1000)


def test_embedded_default_needs_no_key(tmp_path: Path) -> None:
    with serve(tmp_path) as api:  # auth auto, 127.0.0.1, SQLite
        settings = api.services.settings
        assert settings.auth == "auto" and not settings.keys_required
        assert get(api, "/api/user/info")["data"]["id"] == "local"
        task_id = api.post(f"{TXT2IMG}/async", SMALL)["data"]["taskId"]
        assert api.post("/api/sd/task/status", {"taskId": task_id})["_http"] == 200
        assert get(api, "/api/user/public-api-key")["_http"] == 200
        loose = get(api, "/api/user/info", headers=bearer("my-own-lane"))["data"]
        assert loose["id"].startswith("anon-") and loose["nickname"] == loose["id"]
        assert loose["honor"] == 0.0  # inventing keys earns nothing
        # A loose key's account cannot see the local account's task...
        other = api.post("/api/sd/task/status", {"taskId": task_id}, headers=bearer("my-own-lane"))
        assert other["_http"] == 404
        # ...and a stored key still means its own account; a revoked one is refused.
        issued = api.services.accounts.issue_key("alice")
        assert get(api, "/api/user/info", headers=bearer(issued.key.key))["data"]["id"] == (
            issued.account.id
        )
        api.services.accounts.revoke_key(None, issued.key.info.id)
        assert get(api, "/api/user/info", headers=bearer(issued.key.key))["_http"] == 403


def test_leaderboard_shows_nicknames_and_node_honor_only(secured: Api) -> None:
    accounts = secured.services.accounts
    store = SqlAccountStore(secured.services.db)  # node rewards are written by others
    alice = accounts.issue_key("alice", can_run_nodes=True).account
    bob = accounts.issue_key("bob", email="bob@example.org", can_run_nodes=True).account
    store.grant(alice.id, 2.0, HonorReason.TASK, task_id="t1")
    store.grant(bob.id, 3.0, HonorReason.ONLINE, node_id="n1")
    response = secured.client.get("/api/honor/leaderboard")  # public: no key needed
    assert response.status_code == 200 and "example.org" not in response.text
    assert response.json()["data"] == [
        {"rank": 1, "nickname": "bob", "honor": 3.0},
        {"rank": 2, "nickname": "alice", "honor": 2.0},
    ]
    assert get(secured, "/api/honor/leaderboard", params={"limit": 0})["_http"] == 400


def test_queue_weight_grows_with_honor_with_diminishing_returns() -> None:
    def weight(honor: float) -> float:
        return queue_weight(Account("a", "a", honor=honor))

    assert weight(0) == 1.0 and weight(-50) == 1.0
    assert weight(10) == pytest.approx(1 + math.log(2))
    steps = [weight(h) for h in (0, 10, 100, 1000, 10000)]
    assert steps == sorted(steps)
    assert weight(1000) < 10 * weight(10)
    assert queue_weight(Account(PUBLIC_ACCOUNT, "public", honor=1e6)) == 0.25


# -- revoking every key of an account (a stolen key's offspring die with it) ---------------------
def key_ids(api: Api, key: str) -> list[str]:
    return [k["id"] for k in get(api, "/api/user/keys", headers=bearer(key))["data"]]


def test_a_key_minted_with_a_stolen_key_dies_with_the_others(secured: Api) -> None:
    accounts = secured.services.accounts
    mine = key_for(secured, "alice")
    stolen = accounts.issue_key("alice")
    minted = post_as(secured, "/api/user/keys", None, stolen.key.key)["data"]["key"]
    accounts.revoke_key(None, stolen.key.info.id)  # what an admin could do before
    assert get(secured, "/api/user/info", headers=bearer(minted))["_http"] == 200

    revoked = secured.client.delete("/api/user/keys", headers=bearer(mine))
    assert revoked.status_code == 200
    assert [k["prefix"] for k in revoked.json()["data"]] == [minted[:7]]
    assert all(k["revokedAt"] is not None for k in revoked.json()["data"])
    assert get(secured, "/api/user/info", headers=bearer(minted))["_http"] == 403
    assert len(key_ids(secured, mine)) == 1  # the key in use is kept
    again = secured.client.delete("/api/user/keys", headers=bearer(mine))
    assert again.status_code == 200 and again.json()["data"] == []


def test_admins_revoke_every_key_of_an_account(secured: Api) -> None:
    alice = [key_for(secured, "alice") for _ in range(3)]
    bob = key_for(secured, "bob")
    admin = key_for(secured, "root", is_admin=True)
    path = "/api/admin/accounts/alice/keys"
    refused = secured.client.delete(path, headers=bearer(bob))
    assert (refused.status_code, refused.json()["code"]) == (403, 1000)
    assert "needs an admin" in refused.json()["message"]
    done = secured.client.delete(path, headers=bearer(admin))
    assert done.status_code == 200
    assert sorted(k["prefix"] for k in done.json()["data"]) == sorted(k[:7] for k in alice)
    for key in alice:
        assert get(secured, "/api/user/info", headers=bearer(key))["_http"] == 403
    assert get(secured, "/api/user/info", headers=bearer(bob))["_http"] == 200
    unknown = secured.client.delete("/api/admin/accounts/nobody/keys", headers=bearer(admin))
    assert unknown.status_code == 400 and "no account with nickname 'nobody'" in unknown.text


# -- roles that can be taken away -----------------------------------------------------------------
def patch_roles(api: Api, nickname: str, body: object, key: str) -> dict[str, Any]:
    response = api.client.patch(f"/api/admin/accounts/{nickname}", json=body, headers=bearer(key))
    return {**response.json(), "_http": response.status_code}


def test_admins_give_and_take_roles(secured: Api) -> None:
    alice = key_for(secured, "alice", can_run_nodes=True)
    admin = key_for(secured, "root", is_admin=True)
    assert secured.client.get("/_test/node-runner", headers=bearer(alice)).status_code == 200
    taken = patch_roles(secured, "alice", {"canRunNodes": False}, admin)
    assert taken["_http"] == 200 and taken["data"]["canRunNodes"] is False
    assert taken["data"]["isAdmin"] is False  # left out: kept
    runner = secured.client.get("/_test/node-runner", headers=bearer(alice))
    assert runner.status_code == 403 and "dan keys roles" in runner.json()["message"]
    assert patch_roles(secured, "alice", {"isAdmin": True}, alice)["_http"] == 403

    given = patch_roles(secured, "alice", {"isAdmin": True, "canRunNodes": True}, admin)
    assert given["data"]["isAdmin"] and given["data"]["canRunNodes"]
    # alice, now an admin, takes root's admin role; root can then no longer do it back
    assert patch_roles(secured, "root", {"isAdmin": False}, alice)["data"]["isAdmin"] is False
    assert patch_roles(secured, "alice", {"isAdmin": False}, admin)["_http"] == 403


def test_the_last_admin_keeps_the_admin_role(secured: Api) -> None:
    admin = key_for(secured, "root", is_admin=True)
    refused = patch_roles(secured, "root", {"isAdmin": False}, admin)
    assert (refused["_http"], refused["code"]) == (400, 3000)
    assert "'root' is the only admin" in refused["message"]
    info = get(secured, "/api/user/info", headers=bearer(admin))["data"]
    assert info["isAdmin"] is True


@pytest.mark.parametrize(
    ("nickname", "body", "status", "message"),
    [
        ("alice", {}, 400, "name a role to give or take"),
        ("alice", {"isAdmin": "no"}, 400, "Invalid isAdmin"),
        ("alice", {"admin": False}, 400, "Invalid admin"),
        ("nobody", {"isAdmin": True}, 400, "no account with nickname 'nobody'"),
        ("local", {"isAdmin": True}, 403, "built in or anonymous"),
    ],
)
def test_bad_role_changes_are_refused(
    secured: Api, nickname: str, body: dict[str, Any], status: int, message: str
) -> None:
    key_for(secured, "alice")
    admin = key_for(secured, "root", is_admin=True)
    reply = patch_roles(secured, nickname, body, admin)
    assert reply["_http"] == status and message in reply["message"], reply


# -- a cap on active keys -------------------------------------------------------------------------
def test_an_account_has_at_most_max_keys_per_account_active_keys(tmp_path: Path) -> None:
    with serve(tmp_path, auth="required", max_keys_per_account=2) as api:
        first = key_for(api, "alice")
        second = post_as(api, "/api/user/keys", None, first)
        assert second["_http"] == 200
        third = post_as(api, "/api/user/keys", None, first)
        assert (third["_http"], third["code"]) == (409, 3000)
        assert "already has 2 active API keys" in third["message"]
        assert "DAN_MAX_KEYS_PER_ACCOUNT=2" in third["message"]
        assert len(key_ids(api, first)) == 2
        api.client.delete(f"/api/user/keys/{second['data']['id']}", headers=bearer(first))
        assert post_as(api, "/api/user/keys", None, first)["_http"] == 200  # room again


# -- requests through a proxy need a key on the embedded server -----------------------------------
PROXIED = [
    {"Forwarded": "for=203.0.113.7;proto=https"},
    {"X-Forwarded-For": "203.0.113.7"},
    {"X-Real-IP": "203.0.113.7"},
    {"Via": "1.1 proxy.example"},
    {"CF-Connecting-IP": "203.0.113.7"},
]


@pytest.mark.parametrize("headers", PROXIED, ids=lambda h: next(iter(h)))
def test_proxied_requests_need_a_valid_key_on_the_embedded_server(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    with serve(tmp_path) as api:  # auth auto, 127.0.0.1, SQLite: keys optional
        assert get(api, "/api/user/info")["data"]["id"] == "local"
        why = f"came through a proxy or tunnel (it has a {next(iter(headers))} header)"
        for sent in (headers, {**headers, **bearer("made-up")}):
            refused = get(api, "/api/user/info", headers=sent)
            assert (refused["_http"], refused["code"]) == (403, 1000), refused
            assert why in refused["message"]
        queued = api.post(f"{TXT2IMG}/async", SMALL, headers=headers)
        assert queued["_http"] == 403 and api.services.tasks.statistics().total == 0
        key = key_for(api, "alice")
        alice = get(api, "/api/user/info", headers={**headers, **bearer(key)})
        assert alice["_http"] == 200 and alice["data"]["nickname"] == "alice"


def test_explicit_optional_auth_trusts_proxied_requests(tmp_path: Path) -> None:
    with serve(tmp_path, auth="optional", host="0.0.0.0") as api:
        headers = {"X-Forwarded-For": "203.0.113.7"}
        assert get(api, "/api/user/info", headers=headers)["data"]["id"] == "local"


def test_a_real_server_behind_a_loopback_proxy_asks_for_a_key(tmp_path: Path) -> None:
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 and rewrites the client address; the
    # header must still reach DAN.
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path))
    try:
        with serving(create_app(services)) as client:
            assert client.get("/api/user/info").json()["data"]["id"] == "local"
            proxied = client.get("/api/user/info", headers={"X-Forwarded-For": "203.0.113.7"})
            assert proxied.status_code == 403 and "proxy" in proxied.json()["message"]
    finally:
        services.close()


# -- unknown keys share a bounded set of anonymous lanes ------------------------------------------
def test_unknown_keys_share_at_most_anonymous_lanes_accounts(tmp_path: Path) -> None:
    with serve(tmp_path, anonymous_lanes=4) as api:
        keys = [f"made-up-{n}" for n in range(40)]
        lanes = [get(api, "/api/user/info", headers=bearer(k))["data"]["id"] for k in keys]
        assert set(lanes) == {"anon-0", "anon-1", "anon-2", "anon-3"}
        again = [get(api, "/api/user/info", headers=bearer(k))["data"]["id"] for k in keys]
        assert again == lanes  # a client keeps its lane
        with api.services.db.connect() as conn:
            ids = conn.execute(select(accounts_table.c.id)).scalars().all()
        assert sorted(ids) == ["anon-0", "anon-1", "anon-2", "anon-3", "local", "public"]
        info = get(api, "/api/user/info", headers=bearer(keys[0]))["data"]
        assert (info["nickname"], info["honor"]) == (lanes[0], 0.0)
        refused = post_as(api, "/api/user/keys", None, keys[0])  # a lane has no keys
        assert (refused["_http"], refused["code"]) == (403, 1000)


def test_accounts_of_loose_keys_from_before_lanes_stay_anonymous(tmp_path: Path) -> None:
    with serve(tmp_path) as api:
        store = SqlAccountStore(api.services.db)
        old = store.ensure_account("key-0123456789abcdef", "anon-0123456789abcdef")
        with pytest.raises(PermissionDenied, match="built in or anonymous"):
            api.services.accounts.create_key(old)
