"""``/api/sd/...``: generation, task status and cancel, model listing, statistics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from dan.api.auth import account_of
from dan.api.generation import context, submit_txt2img, task_status, wait_for_success
from dan.api.schemas import TaskIdBody, Txt2ImgBody
from dan.domain import SAMPLERS, ModelKind

router = APIRouter(prefix="/api/sd", tags=["generation"])


def ok(data: Any) -> dict[str, Any]:
    """The success envelope of the reference."""
    return {"code": 200, "data": data, "message": "success"}


@router.post("/txt2img", summary="Generate images from text and wait for them")
async def txt2img(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    ctx = context(request)
    record = await submit_txt2img(ctx, account_of(request), body)
    result = await wait_for_success(ctx, record)
    return ok({"taskId": record.id, **result})


@router.post("/txt2img/async", summary="Queue a txt2img task and return its taskId at once")
async def txt2img_async(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    record = await submit_txt2img(context(request), account_of(request), body)
    return ok(
        {"status": int(record.status), "taskId": record.id, "queuePosition": record.queue_position}
    )


@router.post("/task/status", summary="Status, progress and result of a task")
async def status(body: TaskIdBody, request: Request) -> dict[str, Any]:
    return ok(await task_status(context(request), body.taskId, None))


@router.post("/task/cancel", summary="Cancel a task (a running one stops within one step)")
async def cancel(body: TaskIdBody, request: Request) -> dict[str, Any]:
    tasks = context(request).services.tasks
    record = await asyncio.to_thread(tasks.cancel, body.taskId, None)
    return ok({"taskId": record.id, "status": int(record.status), "cancelRequested": True})


@router.get("/supportedModelInfo", summary="Installed checkpoints and LoRAs, and the samplers")
async def supported_model_info(request: Request) -> dict[str, Any]:
    registry = context(request).services.registry

    def listing(kind: ModelKind) -> list[dict[str, str]]:
        return [{"name": m.name, "hash": m.sha256} for m in registry.list(kind)]

    return ok(
        {
            "Models": listing(ModelKind.CHECKPOINT),
            "LoRAs": listing(ModelKind.LORA),
            "Samplers": list(SAMPLERS),
        }
    )


@router.get("/statistics", summary="How many images were generated")
async def statistics(request: Request) -> dict[str, Any]:
    stats = await asyncio.to_thread(context(request).services.tasks.statistics)
    return ok(
        {
            "totalCount": stats.total,
            "countInLast24Hours": stats.last_day,
            "countInLastWeek": stats.last_week,
        }
    )
