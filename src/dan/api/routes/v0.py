"""The earlier response format of the same API, under ``/v0``: ``{"images": [...]}`` on
success, ``{"msg": "..."}`` on failure (see dan.api.errors). Same code paths as ``/api/sd``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dan.api.auth import account_of
from dan.api.errors import V0_PREFIX
from dan.api.generation import context, submit_txt2img, wait_for_success
from dan.api.schemas import Txt2ImgBody

router = APIRouter(prefix=V0_PREFIX, tags=["v0 format"])


@router.post("/txt2img", summary="txt2img answered in the v0 format")
async def txt2img(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    ctx = context(request)
    record = await submit_txt2img(ctx, account_of(request), body)
    result = await wait_for_success(ctx, record)
    return {"images": result["images"]}
