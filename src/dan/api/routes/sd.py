"""``/api/sd/...``: generation, task status and cancel, model listing, statistics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse

from dan.api.auth import account_of, caller, task_owner
from dan.api.events import last_event_id as last_event_id_of
from dan.api.events import task_events
from dan.api.generation import (
    Submit,
    context,
    detect_submit,
    history_entry,
    img2img_submit,
    interrogate_submit,
    submit,
    task_status,
    txt2img_submit,
    upscale_submit,
    wait_for_success,
)
from dan.api.schemas import (
    DetectBody,
    Img2ImgBody,
    InterrogateBody,
    TaskIdBody,
    Txt2ImgBody,
    UpscaleBody,
)
from dan.domain import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    ModelKind,
    TaskRecord,
    family_of,
)
from dan.errors import InvalidArgument
from dan.samplers import SAMPLER_TABLE, SAMPLERS, SCHEDULERS

router = APIRouter(prefix="/api/sd", tags=["generation"])
PING_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
MAX_HISTORY = 100


def ok(data: Any, message: str = "success") -> dict[str, Any]:
    """The success envelope of the reference."""
    return {"code": 200, "data": data, "message": message}


def success_message(record: TaskRecord, ignored_units: int = 0) -> str:
    notes = [record.warning] if record.warning else []
    if ignored_units:
        notes.append(f"only the first control_net unit is used, {ignored_units} more ignored")
    return "; ".join(["success", *notes])


async def run(request: Request, queue: Submit, ignored_units: int = 0) -> dict[str, Any]:
    """Submit and wait: ``{taskId, images, seeds}`` (``{taskId, caption}`` for interrogate)."""
    ctx = context(request)
    record = await submit(ctx, await asyncio.to_thread(account_of, request), queue)
    result = await wait_for_success(ctx, record)
    return ok({"taskId": record.id, **result}, success_message(record, ignored_units))


async def enqueue(request: Request, queue: Submit, ignored_units: int = 0) -> dict[str, Any]:
    """Submit and answer at once: ``{status: 0, taskId, queuePosition}``."""
    record = await submit(context(request), await asyncio.to_thread(account_of, request), queue)
    position = record.queue_position
    data = {"status": record.status.wire, "taskId": record.id, "queuePosition": position}
    return ok(data, success_message(record, ignored_units))


@router.post("/txt2img", summary="Generate images from text and wait for them")
async def txt2img(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    return await run(request, txt2img_submit(body), body.ignored_units)


@router.post("/txt2img/async", summary="Queue a txt2img task and return its taskId at once")
async def txt2img_async(body: Txt2ImgBody, request: Request) -> dict[str, Any]:
    return await enqueue(request, txt2img_submit(body), body.ignored_units)


@router.post("/img2img", summary="Redraw an image (or its masked part) and wait")
async def img2img(body: Img2ImgBody, request: Request) -> dict[str, Any]:
    return await run(request, img2img_submit(body), body.ignored_units)


@router.post("/img2img/async", summary="Queue an img2img or inpaint task")
async def img2img_async(body: Img2ImgBody, request: Request) -> dict[str, Any]:
    return await enqueue(request, img2img_submit(body), body.ignored_units)


@router.post("/upscale", summary="Enlarge an image with an upscaler and wait")
async def upscale(body: UpscaleBody, request: Request) -> dict[str, Any]:
    return await run(request, upscale_submit(body))


@router.post("/upscale/async", summary="Queue an upscale task")
async def upscale_async(body: UpscaleBody, request: Request) -> dict[str, Any]:
    return await enqueue(request, upscale_submit(body))


@router.post("/interrogate", summary="Describe an image (clip caption or deepdanbooru tags)")
async def interrogate(body: InterrogateBody, request: Request) -> dict[str, Any]:
    return await run(request, interrogate_submit(body))


@router.post("/interrogate/async", summary="Queue an interrogate task")
async def interrogate_async(body: InterrogateBody, request: Request) -> dict[str, Any]:
    return await enqueue(request, interrogate_submit(body))


@router.post(
    "/controlnet/detect", summary="The control image a ControlNet preprocessor makes of an image"
)
async def controlnet_detect(body: DetectBody, request: Request) -> dict[str, Any]:
    return await run(request, detect_submit(body))


@router.post("/controlnet/detect/async", summary="Queue a ControlNet preprocessor run")
async def controlnet_detect_async(body: DetectBody, request: Request) -> dict[str, Any]:
    return await enqueue(request, detect_submit(body))


@router.post("/task/status", summary="Status, progress and result of a task")
async def status(body: TaskIdBody, request: Request) -> dict[str, Any]:
    owner = task_owner(await asyncio.to_thread(caller, request))
    return ok(await task_status(context(request), body.taskId, owner))


@router.get(
    "/task/events",
    summary="Server-sent events of a task: its state as it changes, then its result",
    response_class=EventSourceResponse,
)
async def events(
    request: Request,
    taskId: Annotated[str, Query(min_length=1, max_length=64)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """``state`` events while it waits and runs, one ``done`` event at the end (see
    dan.api.events); resumes after ``Last-Event-ID``. Another account's task is a 404."""
    owner = task_owner(await asyncio.to_thread(caller, request))
    ctx = context(request)
    await asyncio.to_thread(ctx.services.tasks.get, taskId, owner)  # 404 before streaming
    stream = task_events(ctx, taskId, owner, last_event_id_of(last_event_id))
    return EventSourceResponse(stream, ping=PING_S)


@router.get("/tasks", summary="The caller's tasks, newest first, a page at a time")
async def history(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY)] = 20,
    before: Annotated[str | None, Query(max_length=20)] = None,
) -> dict[str, Any]:
    """``{tasks: [...], next}``: ``next`` is the ``before`` of the following page (null at
    the end)."""
    account = await asyncio.to_thread(caller, request)
    cursor = _cursor(before)
    tasks = context(request).services.tasks
    page = await asyncio.to_thread(tasks.history, account.id, limit=limit, before=cursor)
    more = str(page[-1].seq) if len(page) == limit else None
    return ok({"tasks": [history_entry(record) for record in page], "next": more})


def _cursor(before: str | None) -> int | None:
    if before is None or before == "":
        return None
    if not before.isdigit():
        raise InvalidArgument(
            f"Invalid before: must be the next value of a previous page, got {before!r}"
        )
    return int(before)


@router.post("/task/cancel", summary="Cancel a task (a running one stops within one step)")
async def cancel(body: TaskIdBody, request: Request) -> dict[str, Any]:
    owner = task_owner(await asyncio.to_thread(caller, request))
    tasks = context(request).services.tasks
    record = await asyncio.to_thread(tasks.cancel, body.taskId, owner)
    return ok({"taskId": record.id, "status": record.status.wire, "cancelRequested": True})


@router.get(
    "/supportedModelInfo",
    summary="Installed checkpoints and LoRAs, the samplers and schedule types",
)
async def supported_model_info(request: Request) -> dict[str, Any]:
    """The models of this server and of the online nodes (read from the database)."""
    models = context(request).services.models
    kinds = (ModelKind.CHECKPOINT, ModelKind.LORA, ModelKind.UPSCALER)
    listed = await asyncio.to_thread(lambda: {kind: models.list(kind) for kind in kinds})

    def listing(kind: ModelKind) -> list[dict[str, str]]:
        # family: which checkpoints a LoRA works with (sd15 where a file does not show it).
        return [
            {"name": m.name, "hash": m.sha256, "family": family_of(m).value} for m in listed[kind]
        ]

    upscalers = [m.name for m in listed[ModelKind.UPSCALER]]
    return ok(
        {
            "Models": listing(ModelKind.CHECKPOINT),
            "LoRAs": listing(ModelKind.LORA),
            "Samplers": list(SAMPLERS),
            # A1111 1.9+'s schedule types, and those each sampler runs with.
            "Schedulers": list(SCHEDULERS),
            "SamplerSchedulers": {s.name: list(s.schedulers) for s in SAMPLER_TABLE},
            "Upscalers": [*IMAGE_UPSCALERS, *upscalers],
            "HiresUpscalers": [*LATENT_UPSCALERS, *IMAGE_UPSCALERS, *upscalers],
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
