"""The facade's routes that run tasks or act for the caller: ``/sdapi/v1/txt2img``, ``img2img``,
``extra-single-image``, ``interrogate``, ``png-info``, ``progress``, ``interrupt``, ``skip``,
``options``, and ``/controlnet/detect``.

Thin: parse the A1111 body, translate it into DAN's order (dan.api.a1111.translate), submit it
under the caller's account like any DAN request, wait (``a1111_timeout_s``: A1111 clients set
no timeout of their own), and answer in A1111's shape (dan.api.a1111.answers).
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request

from dan.accounts.options import ChosenOptions, options_owner
from dan.api.a1111 import CONTROLNET_PREFIX, SDAPI_PREFIX, answers
from dan.api.a1111.controlnet import detect_orders
from dan.api.a1111.options import chosen_options, current_options, kept_overrides
from dan.api.a1111.pnginfo import png_info
from dan.api.a1111.schemas import (
    DetectRequest,
    ExtrasSingleImageRequest,
    GenerationRequest,
    Img2ImgRequest,
    InterrogateRequest,
    PngInfoRequest,
    Txt2ImgRequest,
)
from dan.api.a1111.translate import (
    a1111_field_names,
    img2img_order,
    interrogate_order,
    txt2img_order,
    upscale_order,
)
from dan.api.auth import api_key, caller
from dan.api.generation import ApiContext, context, wait_for_record
from dan.domain import Account, TaskRecord
from dan.errors import DanError
from dan.tasks.orders import DetectOrder
from dan.tasks.service import TaskService

router = APIRouter(prefix=SDAPI_PREFIX, tags=["AUTOMATIC1111 facade"])
controlnet_router = APIRouter(prefix=CONTROLNET_PREFIX, tags=["AUTOMATIC1111 facade"])

Queue = Callable[[TaskService, str], TaskRecord]


@dataclass(frozen=True)
class Client:
    """An A1111 client: the caller's account, and the options it set."""

    account: Account
    owner: str  # whose client options (see dan.accounts.options)
    chosen: ChosenOptions  # what it chose with POST /options


def identify(request: Request) -> Client:
    """The caller, its options' owner and its options (blocking: run it in a thread)."""
    account = caller(request)
    services = context(request).services
    owner = options_owner(account.id, services.accounts.key_id(api_key(request)))
    return Client(account, owner, services.client_options.chosen(owner))


async def run(ctx: ApiContext, account: Account, queue: Queue) -> TaskRecord:
    """Submit and wait for the task to succeed."""
    return await finish(ctx, await submit(ctx, account, queue))


async def submit(
    ctx: ApiContext, account: Account, queue: Queue, overridden: Collection[str] | None = None
) -> TaskRecord:
    """Queue the task; refusals name A1111's fields (``overridden``: the request's
    ``override_settings`` keys, see a1111_field_names)."""
    try:
        return await asyncio.to_thread(queue, ctx.services.tasks, account.id)
    except DanError as exc:
        renamed = a1111_field_names(exc, overridden)
        if renamed is exc:
            raise
        raise renamed from exc


async def finish(ctx: ApiContext, record: TaskRecord) -> TaskRecord:
    """The task once it succeeded (A1111 clients wait as long as it takes, up to
    ``a1111_timeout_s``)."""
    return await wait_for_record(ctx, record, ctx.services.settings.a1111_timeout_s)


async def keep_override(
    ctx: ApiContext, who: Client, body: GenerationRequest, record: TaskRecord
) -> None:
    """With ``override_settings_restore_afterwards`` false, the options the request overrode
    become the caller's for later requests (A1111 keeps them for everyone)."""
    kept = kept_overrides(body, record)
    if kept is not None:
        await asyncio.to_thread(ctx.services.client_options.choose, who.owner, kept)


async def generated(ctx: ApiContext, record: TaskRecord) -> list[bytes]:
    return await asyncio.to_thread(ctx.services.tasks.images, record)


# -- generation -----------------------------------------------------------------------------


@router.post("/txt2img", summary="A1111 txt2img: generate and wait")
async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
    ctx, who = context(request), await asyncio.to_thread(identify, request)
    order = txt2img_order(body, who.chosen)
    record = await submit(
        ctx, who.account, lambda tasks, a: tasks.submit_txt2img(a, order), body.override_settings
    )
    await keep_override(ctx, who, body, record)
    record = await finish(ctx, record)
    pngs = await generated(ctx, record)
    return answers.generation_answer(record, pngs, body.model_dump(), body.send_images)


@router.post("/img2img", summary="A1111 img2img (inpainting with a mask): generate and wait")
async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
    ctx, who = context(request), await asyncio.to_thread(identify, request)
    order = img2img_order(body, who.chosen)
    record = await submit(
        ctx, who.account, lambda tasks, a: tasks.submit_img2img(a, order), body.override_settings
    )
    await keep_override(ctx, who, body, record)
    record = await finish(ctx, record)
    pngs = await generated(ctx, record)
    parameters = body.model_dump()
    if not body.include_init_images:  # as A1111: the input images are not sent back
        parameters.update(init_images=None, mask=None)
    return answers.generation_answer(record, pngs, parameters, body.send_images)


@router.post("/extra-single-image", summary="A1111 extras: DAN's upscale of one image")
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request) -> dict[str, Any]:
    ctx, account = context(request), await asyncio.to_thread(caller, request)
    order = upscale_order(body)
    record = await run(ctx, account, lambda tasks, a: tasks.submit_upscale(a, order))
    [png] = await generated(ctx, record)
    second = f", {order.upscaler2} ({order.upscaler2_factor:g})" if order.upscaler2_factor else ""
    info = html.escape(f"Upscale: {order.rate:g}, upscaler: {order.upscaler}{second}")
    image = answers.b64(png) if body.show_extras_results else None
    return {"html_info": f"<p>{info}</p>", "image": image}


@router.post("/interrogate", summary="A1111 interrogate: a caption (clip) or tags (deepdanbooru)")
async def interrogate(body: InterrogateRequest, request: Request) -> dict[str, Any]:
    ctx, account = context(request), await asyncio.to_thread(caller, request)
    order = interrogate_order(body)
    record = await run(ctx, account, lambda tasks, a: tasks.submit_interrogate(a, order))
    return {"caption": record.result.caption}


@router.post("/png-info", summary="The generation parameters a PNG carries")
async def pnginfo(body: PngInfoRequest, request: Request) -> dict[str, Any]:
    await asyncio.to_thread(caller, request)
    return await asyncio.to_thread(png_info, body.image)


@controlnet_router.post("/detect", summary="ControlNet extension: the preprocessor's output")
async def detect(body: DetectRequest, request: Request) -> dict[str, Any]:
    ctx, account = context(request), await asyncio.to_thread(caller, request)
    queued = [await submit(ctx, account, detect_queue(o)) for o in detect_orders(body)]
    done = await asyncio.gather(*(finish(ctx, record) for record in queued))
    images = [answers.b64(png) for record in done for png in await generated(ctx, record)]
    return {"images": images, "info": "Success"}


def detect_queue(order: DetectOrder) -> Queue:
    return lambda tasks, account: tasks.submit_detect(account, order)


# -- the caller's tasks ---------------------------------------------------------------------


@router.get("/progress", summary="Progress of the caller's current task (others' are not shown)")
async def progress(
    request: Request, skip_current_image: Annotated[bool, Query()] = False
) -> dict[str, Any]:
    account = await asyncio.to_thread(caller, request)
    active = await asyncio.to_thread(context(request).services.tasks.active, account.id)
    return answers.progress(active, skip_current_image=skip_current_image)


@router.post("/interrupt", summary="Stop the caller's current task (it ends cancelled)")
async def interrupt(request: Request) -> dict[str, Any]:
    await asyncio.to_thread(stop_current, request)
    return {}


@router.post("/skip", summary="As interrupt: DAN cannot skip one image of a task")
async def skip(request: Request) -> None:
    await asyncio.to_thread(stop_current, request)


def stop_current(request: Request) -> None:
    """Cancel the caller's running tasks, or, when none runs yet, the one that runs next."""
    context(request).services.tasks.interrupt(caller(request).id)


# -- options --------------------------------------------------------------------------------


@router.get("/options", summary="A1111's common options, with the caller's own")
async def get_options(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(read_options, request)


@router.post(
    "/options",
    summary="Set sd_model_checkpoint, CLIP_stop_at_last_layers and sd_vae for this key only",
)
async def set_options(body: Annotated[dict[str, Any], Body()], request: Request) -> None:
    """Other keys are accepted and have no effect (DAN has no global options)."""
    await asyncio.to_thread(choose_options, request, body)


def read_options(request: Request) -> dict[str, Any]:
    who, services = identify(request), context(request).services
    return current_options(services.models, who.chosen, services.settings.default_model)


def choose_options(request: Request, body: dict[str, Any]) -> None:
    who, services = identify(request), context(request).services
    services.client_options.choose(who.owner, chosen_options(body, services.models))
