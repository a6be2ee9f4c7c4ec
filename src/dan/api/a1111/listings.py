"""The facade's listings: what is installed (here or on online nodes) as A1111 lists it, the
ControlNet extension's version and lists, and harmless answers for what DAN does not have
(VAEs, hypernetworks, face restorers, styles, embeddings, scripts)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from dan import __version__
from dan.api.a1111 import CONTROLNET_PREFIX, SDAPI_PREFIX, answers
from dan.api.a1111.controlnet import CONTROLNET_MODULES, CONTROLNET_SCRIPT
from dan.api.auth import caller
from dan.api.generation import context
from dan.domain import InstalledModel, ModelKind

router = APIRouter(prefix=SDAPI_PREFIX, tags=["AUTOMATIC1111 facade"])
controlnet_router = APIRouter(prefix=CONTROLNET_PREFIX, tags=["AUTOMATIC1111 facade"])
CONTROLNET_API_VERSION = 2  # the extension's API version its clients check


async def installed(request: Request, kind: ModelKind) -> list[InstalledModel]:
    """The models of ``kind`` of this server and of the online nodes, for a known caller."""
    await asyncio.to_thread(caller, request)
    return await asyncio.to_thread(context(request).services.models.list, kind)


async def known_caller(request: Request) -> None:
    await asyncio.to_thread(caller, request)


@router.get("/sd-models", summary="Checkpoints: title is 'file.safetensors [short hash]'")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return [answers.sd_model(m) for m in await installed(request, ModelKind.CHECKPOINT)]


@router.get("/loras", summary="LoRAs, for <lora:name:weight> tags in prompts")
async def loras(request: Request) -> list[dict[str, Any]]:
    return [answers.lora(m) for m in await installed(request, ModelKind.LORA)]


@router.get("/upscalers", summary="Upscalers for extra-single-image and hires fix")
async def upscalers(request: Request) -> list[dict[str, Any]]:
    return answers.upscalers(await installed(request, ModelKind.UPSCALER))


@router.get("/latent-upscale-modes", summary="The latent upscalers of hires fix")
async def latent_upscale_modes(request: Request) -> list[dict[str, str]]:
    await known_caller(request)
    return answers.latent_upscale_modes()


@router.get("/samplers", summary="DAN's samplers, by A1111's names")
async def samplers(request: Request) -> list[dict[str, Any]]:
    await known_caller(request)
    return answers.samplers()


@router.get(
    "/schedulers",
    summary="The schedule types: Automatic, Uniform, Karras, Exponential, SGM Uniform",
)
async def schedulers(request: Request) -> list[dict[str, Any]]:
    await known_caller(request)
    return answers.schedulers()


@router.post("/refresh-checkpoints", summary="Rescan the models folder")
async def refresh_checkpoints(request: Request) -> None:
    await known_caller(request)
    await asyncio.to_thread(context(request).services.registry.scan)


@router.post("/refresh-loras", summary="Rescan the models folder")
async def refresh_loras(request: Request) -> None:
    await refresh_checkpoints(request)


# Harmless answers for what DAN does not have, so that clients that ask find nothing.
EMPTY_LISTS = (
    "hypernetworks",
    "face-restorers",
    "prompt-styles",
    "realesrgan-models",
    "script-info",
    "extensions",
)


async def _empty(request: Request) -> list[Any]:
    await known_caller(request)
    return []


for _name in EMPTY_LISTS:
    router.add_api_route(f"/{_name}", _empty, methods=["GET"], summary="None in DAN")


@router.get("/sd-vae", summary="VAE files a request may choose (override_settings.sd_vae)")
async def sd_vae(request: Request) -> list[dict[str, Any]]:
    return [answers.vae(m) for m in await installed(request, ModelKind.VAE)]


@router.get("/embeddings", summary="Textual-inversion embeddings, used by name in prompts")
async def embeddings(request: Request) -> dict[str, Any]:
    """Every installed embedding is ``loaded``: DAN loads the ones a prompt names, of the
    checkpoint's family, for that request only."""
    models = await installed(request, ModelKind.EMBEDDING)
    return {"loaded": {m.name: answers.embedding(m) for m in models}, "skipped": {}}


@router.get("/scripts", summary="The always-on scripts DAN understands: ControlNet")
async def scripts(request: Request) -> dict[str, list[str]]:
    await known_caller(request)
    return {"txt2img": [CONTROLNET_SCRIPT], "img2img": [CONTROLNET_SCRIPT]}


@router.get("/cmd-flags", summary="What an A1111 started with --api --nowebui would say")
async def cmd_flags(request: Request) -> dict[str, Any]:
    await known_caller(request)
    return {"api": True, "nowebui": True, "listen": True, "dan_version": __version__}


@router.post("/refresh-vae", summary="Nothing to refresh in DAN")
@router.post("/refresh-embeddings", summary="Nothing to refresh in DAN")
async def refresh_nothing(request: Request) -> None:
    await known_caller(request)


# -- the ControlNet extension's endpoints ---------------------------------------------------


@controlnet_router.get("/version", summary="The ControlNet extension's API version")
async def controlnet_version(request: Request) -> dict[str, int]:
    await known_caller(request)
    return {"version": CONTROLNET_API_VERSION}


@controlnet_router.get("/model_list", summary="ControlNet files: 'name [hash8]'")
async def controlnet_models(request: Request) -> dict[str, Any]:
    """``model_list`` as the extension answers, and ``sha256`` of each entry (DAN's own key)."""
    models = await installed(request, ModelKind.CONTROLNET)
    titles = {answers.controlnet_title(m): m.sha256 for m in models}
    return {"model_list": list(titles), "sha256": titles}


@controlnet_router.get("/module_list", summary="The preprocessors DAN runs")
async def controlnet_modules(request: Request) -> dict[str, Any]:
    await known_caller(request)
    return {"module_list": list(CONTROLNET_MODULES), "module_detail": answers.module_detail()}
