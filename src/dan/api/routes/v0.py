"""The earlier response format of the same API, under ``/v0``: ``{"images": [...]}`` on
success, ``{"msg": "..."}`` on failure (see dan.api.errors); interrogate answers
``{"caption": "..."}`` or ``{"detail": "..."}``. Same code paths as ``/api/sd``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from dan.api.auth import account_of
from dan.api.errors import V0_PREFIX
from dan.api.generation import (
    Submit,
    context,
    img2img_submit,
    interrogate_submit,
    submit,
    txt2img_submit,
    wait_for_success,
)
from dan.api.schemas import Img2ImgBody, InterrogateBody, Txt2ImgBody
from dan.errors import NodeError

router = APIRouter(prefix=V0_PREFIX, tags=["v0 format"])


async def run(request: Request, queue: Submit) -> dict[str, Any]:
    ctx = context(request)
    record = await submit(ctx, await asyncio.to_thread(account_of, request), queue)
    return {"images": _field(await wait_for_success(ctx, record), "images", record.id)}


def _field(data: dict[str, Any], name: str, task_id: str) -> Any:
    """``data[name]``, or a clear failure if the task's result has another shape."""
    if name not in data:
        raise NodeError(f"task {task_id} finished without {name} in its result", taskId=task_id)
    return data[name]


@router.post("/txt2img", summary="txt2img answered in the v0 format")
async def txt2img(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    return await run(request, txt2img_submit(body))


@router.post("/img2img", summary="img2img answered in the v0 format")
async def img2img(body: Img2ImgBody, request: Request) -> dict[str, Any]:
    return await run(request, img2img_submit(body))


@router.post("/interrogate", summary="interrogate answered in the v0 format")
async def interrogate(body: InterrogateBody, request: Request) -> dict[str, Any]:
    ctx = context(request)
    account = await asyncio.to_thread(account_of, request)
    record = await submit(ctx, account, interrogate_submit(body))
    return {"caption": _field(await wait_for_success(ctx, record), "caption", record.id)}
