"""``/api/user/...``, ``/api/honor/...``, ``/api/admin/...``: accounts, keys and honor.

Handlers are plain functions: FastAPI runs them (and the ``caller`` dependency, which reads the
database) in its thread pool.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool

from dan.accounts import AccountService, ApiKey
from dan.api.auth import api_key, caller, require_admin
from dan.api.generation import context
from dan.api.routes.sd import ok
from dan.api.schemas import real
from dan.domain import Account

router = APIRouter(tags=["accounts"])

Caller = Annotated[Account, Depends(caller)]
Admin = Annotated[Account, Depends(require_admin)]


class HonorGrantBody(BaseModel):
    """Body of ``POST /api/admin/honor``: whom (``account`` id or ``nickname``), how much."""

    model_config = ConfigDict(extra="ignore")

    account: str | None = None
    nickname: str | None = None
    amount: real(-1e6, 1e6)  # type: ignore[valid-type]
    note: str | None = None


class RolesBody(BaseModel):
    """Body of ``PATCH /api/admin/accounts/{nickname}``: roles to give (true) or take (false);
    a role left out is kept."""

    model_config = ConfigDict(extra="forbid")

    isAdmin: StrictBool | None = None
    canRunNodes: StrictBool | None = None


def accounts(request: Request) -> AccountService:
    return context(request).services.accounts


def account_data(account: Account, service: AccountService) -> dict[str, Any]:
    return {
        "id": account.id,
        "nickname": account.nickname,
        "honor": round(account.honor, 4),
        "isAdmin": account.is_admin,
        "canRunNodes": account.can_run_nodes,
        "queueWeight": round(service.queue_weight(account), 4),
    }


def key_data(key: ApiKey) -> dict[str, Any]:
    """A key as listed: its prefix and times, never the key."""
    return {
        "id": key.id,
        "prefix": key.prefix,
        "createdAt": key.created_at,
        "lastUsedAt": key.last_used_at,
        "revokedAt": key.revoked_at,
        "origin": key.origin,
    }


@router.get("/api/user/info", summary="The caller's account and honor")
def user_info(account: Caller, request: Request) -> dict[str, Any]:
    return ok(account_data(account, accounts(request)))


@router.get("/api/user/keys", summary="The caller's active API keys (prefixes, never the keys)")
def list_keys(account: Caller, request: Request) -> dict[str, Any]:
    return ok([key_data(key) for key in accounts(request).list_keys(account)])


@router.post("/api/user/keys", summary="A new API key for the caller, shown this once only")
def create_key(account: Caller, request: Request) -> dict[str, Any]:
    new = accounts(request).create_key(account)
    return ok({**key_data(new.info), "key": new.key})


@router.delete(
    "/api/user/keys", summary="Revoke every API key of the caller's but the one this request uses"
)
def revoke_other_keys(account: Caller, request: Request) -> dict[str, Any]:
    revoked = accounts(request).revoke_keys(account, keep_key=api_key(request))
    return ok([key_data(key) for key in revoked])


@router.delete("/api/user/keys/{key_id}", summary="Revoke one of the caller's API keys")
def revoke_key(key_id: str, account: Caller, request: Request) -> dict[str, Any]:
    return ok(key_data(accounts(request).revoke_key(account, key_id)))


@router.get(
    "/api/user/webhook", summary="The secret that signs the caller's webhooks (made on first use)"
)
def webhook_secret(account: Caller, request: Request) -> dict[str, Any]:
    return ok({"secret": context(request).services.webhooks.secret(account.id)})


@router.post(
    "/api/user/webhook/rotate",
    summary="A new webhook secret for the caller: webhooks sent from now on are signed with it",
)
def rotate_webhook_secret(account: Caller, request: Request) -> dict[str, Any]:
    return ok({"secret": context(request).services.webhooks.rotate_secret(account.id)})


@router.get("/api/honor/leaderboard", summary="Donors ranked by the honor their nodes earned")
def leaderboard(request: Request, limit: int = 20) -> dict[str, Any]:
    entries = accounts(request).leaderboard(limit)
    return ok(
        [
            {"rank": rank, "nickname": entry.nickname, "honor": round(entry.honor, 4)}
            for rank, entry in enumerate(entries, start=1)
        ]
    )


@router.post("/api/admin/honor", summary="Grant honor to an account (admins only)")
def grant_honor(body: HonorGrantBody, admin: Admin, request: Request) -> dict[str, Any]:
    service = accounts(request)
    target = service.find(account_id=body.account, nickname=body.nickname)
    account = service.grant_honor(target, body.amount, by=admin, note=body.note)
    return ok(account_data(account, service))


@router.patch("/api/admin/accounts/{nickname}", summary="Give or take roles (admins only)")
def set_roles(nickname: str, body: RolesBody, _: Admin, request: Request) -> dict[str, Any]:
    service = accounts(request)
    target = service.find(nickname=nickname)
    account = service.set_roles(target, is_admin=body.isAdmin, can_run_nodes=body.canRunNodes)
    return ok(account_data(account, service))


@router.delete(
    "/api/admin/accounts/{nickname}/keys",
    summary="Revoke every API key of an account (admins only)",
)
def revoke_account_keys(nickname: str, _: Admin, request: Request) -> dict[str, Any]:
    service = accounts(request)
    revoked = service.revoke_keys(service.find(nickname=nickname))
    return ok([key_data(key) for key in revoked])
