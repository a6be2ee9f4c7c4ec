"""Health and the public API key the original example clients ask for first."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request

from dan import __version__
from dan.api.generation import context
from dan.api.routes.sd import ok
from dan.errors import ResourceUnavailable

router = APIRouter(tags=["system"])
log = logging.getLogger(__name__)


@router.get("/health", summary="Liveness and database reachability")
async def health(request: Request) -> dict[str, Any]:
    store = context(request).services.store
    try:
        await asyncio.to_thread(store.ping)
    except Exception as exc:
        # The driver's message names the database's host and user: for the log, not for anyone.
        log.warning("health check: the database is unreachable: %s", exc)
        raise ResourceUnavailable("the database is unreachable") from exc
    return ok({"status": "ok", "version": __version__})


@router.get(
    "/api/user/public-api-key",
    summary="A key anonymous clients may use (lowest priority); 403 if the server has none",
)
async def public_api_key(request: Request) -> dict[str, Any]:
    return ok({"apiKey": context(request).services.accounts.public_api_key()})
