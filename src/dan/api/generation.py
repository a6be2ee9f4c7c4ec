"""What the current and the v0 routers share: submit, wait, and turn a task into wire data."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from dan.api.schemas import (
    ControlNetBody,
    DetectBody,
    GenerationBody,
    Img2ImgBody,
    InterrogateBody,
    Txt2ImgBody,
    UpscaleBody,
)
from dan.domain import TaskRecord, TaskStatus
from dan.errors import NodeError, SyncTimeout, TaskCancelled
from dan.samplers import SamplerRefused, choose
from dan.services import Services
from dan.tasks.orders import (
    ControlNetOrder,
    DetectOrder,
    GenerationOrder,
    HiresOrder,
    Img2ImgOrder,
    InpaintOrder,
    InterrogateOrder,
    Txt2ImgOrder,
    UpscaleOrder,
)
from dan.tasks.service import TaskService
from dan.tasks.store import CANCELLED_MESSAGE
from dan.tasks.watcher import TaskWatcher


@dataclass
class ApiContext:
    services: Services
    watcher: TaskWatcher


def context(request: Request) -> ApiContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, ApiContext)
    return ctx


def generation_order(body: GenerationBody) -> GenerationOrder:
    return GenerationOrder(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=body.seed,
        sampler_name=body.sampler_name,
        scheduler=body.scheduler,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        width=body.width,
        height=body.height,
        model=body.model,
        loras=body.loras,
        control_net=controlnet_order(body.control_unit),
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        clip_skip=body.clip_skip,
        vae=body.vae,
    )


def controlnet_order(unit: ControlNetBody | None) -> ControlNetOrder | None:
    if unit is None:
        return None
    low, high = unit.thresholds
    return ControlNetOrder(
        image=unit.image,
        preprocess=unit.preprocess,
        model=unit.model,
        weight=unit.weight,
        resize_mode=unit.resize_mode,
        guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end,
        guess_mode=unit.guess,
        low_threshold=low,
        high_threshold=high,
    )


def txt2img_order(body: Txt2ImgBody) -> Txt2ImgOrder:
    hires = body.upscale
    return Txt2ImgOrder(
        generation=generation_order(body),
        hires=HiresOrder(hires.scale, hires.denoising_strength, hires.upscaler) if hires else None,
    )


def img2img_order(body: Img2ImgBody) -> Img2ImgOrder:
    inpaint = body.inpaint
    return Img2ImgOrder(
        generation=generation_order(body),
        init_image=body.init_image,
        resize_mode=body.resize_mode,
        denoising_strength=body.denoising_strength,
        inpaint=InpaintOrder(
            inpaint.mask, inpaint.mask_blur, inpaint.mask_mode, inpaint.inpaint_area
        )
        if inpaint
        else None,
    )


def upscale_order(body: UpscaleBody) -> UpscaleOrder:
    return UpscaleOrder(
        image=body.image,
        rate=body.upscalingRate,
        upscaler=body.upscaler,
        upscaler2=body.upscaler2,
        upscaler2_factor=body.upscaler2_factor,
    )


def detect_order(body: DetectBody) -> DetectOrder:
    low, high = int(body.preprocess_param1), int(body.preprocess_param2)
    return DetectOrder(body.image, body.preprocess, low, high)


def interrogate_order(body: InterrogateBody) -> InterrogateOrder:
    return InterrogateOrder(body.image, body.model)


# A submission, typed from the route to the queue: given the task service and the caller's
# account, it queues one kind of task with its order (see the ``*_submit`` functions).
Submit = Callable[[TaskService, str], TaskRecord]


def txt2img_submit(body: Txt2ImgBody) -> Submit:
    order, url = txt2img_order(body), body.callback_url
    return lambda tasks, account: tasks.submit_txt2img(account, order, callback_url=url)


def img2img_submit(body: Img2ImgBody) -> Submit:
    order, url = img2img_order(body), body.callback_url
    return lambda tasks, account: tasks.submit_img2img(account, order, callback_url=url)


def upscale_submit(body: UpscaleBody) -> Submit:
    order, url = upscale_order(body), body.callback_url
    return lambda tasks, account: tasks.submit_upscale(account, order, callback_url=url)


def detect_submit(body: DetectBody) -> Submit:
    order, url = detect_order(body), body.callback_url
    return lambda tasks, account: tasks.submit_detect(account, order, callback_url=url)


def interrogate_submit(body: InterrogateBody) -> Submit:
    order, url = interrogate_order(body), body.callback_url
    return lambda tasks, account: tasks.submit_interrogate(account, order, callback_url=url)


async def submit(ctx: ApiContext, account: str, queue: Submit) -> TaskRecord:
    """Queue a task (decoding its images and resolving its models off the event loop)."""
    return await asyncio.to_thread(queue, ctx.services.tasks, account)


async def wait_for_success(ctx: ApiContext, record: TaskRecord) -> dict[str, Any]:
    """Wait for the task and return its result data; raise if it failed or took too long."""
    record = await wait_for_record(ctx, record)
    return await asyncio.to_thread(result_data, ctx, record)


async def wait_for_record(
    ctx: ApiContext, record: TaskRecord, timeout_s: float | None = None
) -> TaskRecord:
    """Wait for the task (``timeout_s``, by default ``sync_timeout_s``) and return it once it
    succeeded; raise SyncTimeout, TaskCancelled or NodeError otherwise."""
    timeout = ctx.services.settings.sync_timeout_s if timeout_s is None else timeout_s
    finished = await ctx.watcher.wait(record.id, timeout)
    record = await asyncio.to_thread(ctx.services.tasks.get, record.id)
    if not finished or not record.status.finished:
        raise SyncTimeout(
            f"the task did not finish within {timeout:g} s; it keeps running: poll "
            "/api/sd/task/status with its taskId",
            taskId=record.id,
            status=record.status.wire,
            queuePosition=record.queue_position,
        )
    if record.status == TaskStatus.CANCELLED:
        raise TaskCancelled(f"the task was {CANCELLED_MESSAGE}", taskId=record.id)
    if record.status == TaskStatus.FAILURE:
        raise NodeError(record.error or "the task failed", taskId=record.id)
    return record


def result_data(ctx: ApiContext, record: TaskRecord) -> dict[str, Any]:
    """``images`` (base64 PNGs) and ``seeds`` of a successful task, or its ``caption``."""
    if record.result.caption is not None:
        return {"caption": record.result.caption}
    images = [base64.b64encode(png).decode("ascii") for png in ctx.services.tasks.images(record)]
    return {"images": images, "seeds": list(record.result.seeds)}


def history_entry(record: TaskRecord) -> dict[str, Any]:
    """A task as a person's history lists it: what was asked, and where it stands (the
    images come from the task's status)."""
    params = record.params
    generation = params.get("generation", params)  # img2img nests its generation
    model = generation.get("model")
    sampler, scheduler = _sampling(generation)
    return {
        "taskId": record.id,
        "kind": record.kind.value,
        "status": record.status.wire,
        "cancelled": record.status == TaskStatus.CANCELLED,
        "createdAt": record.created_at,
        "finishedAt": record.finished_at,
        "prompt": generation.get("prompt"),
        "negativePrompt": generation.get("negative_prompt"),
        "seed": generation.get("seed"),
        "width": generation.get("width"),
        "height": generation.get("height"),
        "steps": generation.get("steps"),
        "sampler": sampler,
        "scheduler": scheduler,
        "model": model.get("name") if isinstance(model, dict) else None,
        "batchSize": generation.get("batch_size", 1),
        "nIter": generation.get("n_iter", 1),
        "expired": record.expired,
    }


def _sampling(generation: dict[str, Any]) -> tuple[str | None, str | None]:
    """The sampler and schedule type of a generation's params in today's names (a task stored
    before the scheduler field may name "DPM++ SDE Karras"); None for other tasks."""
    name = generation.get("sampler_name")
    if name is None:
        return None, None
    try:
        return choose(name, generation.get("scheduler"))
    except SamplerRefused:
        return name, generation.get("scheduler")


async def task_status(ctx: ApiContext, task_id: str, account: str | None) -> dict[str, Any]:
    """The task-status data of the reference, plus ``progress``, a failure ``message``, and
    where its webhook stands (``callback``) if it has one."""
    record = await asyncio.to_thread(ctx.services.tasks.get, task_id, account)
    return await asyncio.to_thread(status_and_callback, ctx, record)


def status_and_callback(ctx: ApiContext, record: TaskRecord) -> dict[str, Any]:
    data = status_data(ctx, record)
    webhook = ctx.services.webhooks.state(record.id)
    if webhook is not None:
        data["callback"] = {
            "state": webhook.state,
            "attempts": webhook.attempts,
            "lastError": webhook.last_error,
        }
    return data


def status_data(ctx: ApiContext, record: TaskRecord) -> dict[str, Any]:
    """The task-status data of ``record`` (without its webhook's state)."""
    data: dict[str, Any] = {
        "taskId": record.id,
        "status": record.status.wire,
        "queuePosition": record.queue_position,
        "progress": round(record.progress, 4),
    }
    if record.status == TaskStatus.SUCCESS:
        data.update(result_data(ctx, record))
        if record.expired:
            data["message"] = "the results of this task have expired and were deleted"
    elif record.status in (TaskStatus.FAILURE, TaskStatus.CANCELLED):
        data["message"] = record.error or "the task failed"
    return data


def webhook_body(ctx: ApiContext, task_id: str) -> bytes:
    """What a task's webhook POSTs: the very body ``/api/sd/task/status`` answers for it
    (base64 images included), as JSON."""
    data = status_data(ctx, ctx.services.tasks.get(task_id))
    return json.dumps({"code": 200, "data": data, "message": "success"}).encode()
