"""DAN's records and models as AUTOMATIC1111 answers them: the ``info`` of a generation, the
model listings, the options, and the progress of the caller's tasks."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from dan import __version__
from dan.api.events import eta_s
from dan.domain import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    InstalledModel,
    TaskRecord,
    TaskStatus,
    family_of,
)
from dan.imaging import read_parameters
from dan.samplers import (
    AUTOMATIC,
    EXPONENTIAL,
    KARRAS,
    SAMPLER_TABLE,
    SGM_UNIFORM,
    UNIFORM,
    Sampler,
    a1111_schedule,
    choose,
)


def b64(data: bytes) -> str:
    """Base64 without a ``data:`` prefix, as A1111 answers images."""
    return base64.b64encode(data).decode("ascii")


def timestamp(seconds: float) -> str:
    """A1111's ``job_timestamp``: local time as YYYYmmddHHMMSS."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))


# -- generations ----------------------------------------------------------------------------


def generation_answer(
    record: TaskRecord, pngs: list[bytes], parameters: dict[str, Any], send_images: bool
) -> dict[str, Any]:
    """``{images, parameters, info}`` of a finished txt2img or img2img task."""
    return {
        "images": [b64(png) for png in pngs] if send_images else [],
        "parameters": parameters,
        "info": json.dumps(generation_info(record, pngs)),
    }


def generation_info(record: TaskRecord, pngs: list[bytes]) -> dict[str, Any]:
    """What A1111's ``Processed.js()`` reports, from the task as it ran: resolved seeds, the
    model's name and short hash, each image's infotext (its PNG ``parameters`` chunk)."""
    params = record.params
    generation = params.get("generation", params)  # img2img nests its generation
    seeds = list(record.result.seeds) or [generation["seed"]]
    count = max(len(pngs), len(seeds))
    model = generation["model"]
    hires = generation.get("hires")
    strength = params.get("denoising_strength", hires["denoising_strength"] if hires else None)
    sampler, schedule = choose(generation["sampler_name"], generation.get("scheduler"))
    vae = generation.get("vae")
    return {
        "prompt": generation["prompt"],
        "all_prompts": [generation["prompt"]] * count,
        "negative_prompt": generation["negative_prompt"],
        "all_negative_prompts": [generation["negative_prompt"]] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": generation["width"],
        "height": generation["height"],
        "sampler_name": sampler,
        "cfg_scale": generation["cfg_scale"],
        "steps": generation["steps"],
        "batch_size": generation.get("batch_size", 1),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model["name"],
        "sd_model_hash": model["sha256"][:10],
        # As the PNG's parameters name it (dan.imaging); None: the checkpoint's own.
        "sd_vae_name": f"{vae['name']}.safetensors" if vae else None,
        "sd_vae_hash": vae["sha256"][:10] if vae else None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": {"Schedule type": a1111_schedule(sampler, schedule)},
        "index_of_first_image": 0,
        "infotexts": [read_parameters(png) or "" for png in pngs],
        "styles": [],
        "job_timestamp": timestamp(record.started_at or record.created_at),
        "clip_skip": generation.get("clip_skip", 1),
        "is_using_inpainting_conditioning": False,
        "version": f"DAN {__version__}",
    }


# -- models ---------------------------------------------------------------------------------


def checkpoint_title(model: InstalledModel) -> str:
    """A1111's title of a checkpoint: its file name and short hash."""
    return f"{model.path.name} [{model.sha256[:10]}]"


def sd_model(model: InstalledModel) -> dict[str, Any]:
    return {
        "title": checkpoint_title(model),
        "model_name": model.name,
        "hash": model.sha256[:10],
        "sha256": model.sha256,
        "filename": model.path.name,
        "config": None,
        "family": family_of(model).value,  # DAN's own key: sd15 or sdxl
    }


# Listings carry each file's sha256 beside A1111's own keys (its clients ignore keys they do not
# know): a DAN node whose backend is this server identifies its models by them.
def lora(model: InstalledModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "alias": model.name,
        "path": model.path.name,
        "metadata": {},
        "sha256": model.sha256,
        "family": family_of(model).value,
    }


def vae(model: InstalledModel) -> dict[str, Any]:
    return {"model_name": model.path.name, "filename": model.path.name, "sha256": model.sha256}


def embedding(model: InstalledModel) -> dict[str, Any]:
    """A1111's embedding item; DAN does not read the training step or vector count."""
    return {
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": None,
        "vectors": None,
        "sha256": model.sha256,
        "family": family_of(model).value,
    }


def controlnet_title(model: InstalledModel) -> str:
    """The ControlNet extension's title of a ControlNet file: its name and 8 hex digits."""
    return f"{model.name} [{model.sha256[:8]}]"


def upscalers(models: list[InstalledModel]) -> list[dict[str, Any]]:
    builtin = [_upscaler(name, None) for name in IMAGE_UPSCALERS]
    return builtin + [_upscaler(m.name, m) for m in models]


def _upscaler(name: str, model: InstalledModel | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "name": name,
        "model_name": name if model else None,
        "model_path": model.path.name if model else None,
        "model_url": None,
        "scale": 4,
    }
    if model is not None:
        answer["sha256"] = model.sha256
    return answer


def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": name} for name in LATENT_UPSCALERS]


def samplers() -> list[dict[str, Any]]:
    """A1111 1.9+'s listing: each sampler once, its default schedule type in ``options``."""
    return [
        {
            "name": sampler.name,
            "aliases": list(sampler.aliases),
            "options": _sampler_options(sampler),
        }
        for sampler in SAMPLER_TABLE
    ]


def _sampler_options(sampler: Sampler) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if sampler.a1111_default != AUTOMATIC:
        options["scheduler"] = _SCHEDULER_NAMES[sampler.a1111_default]
    if sampler.unet_calls == 2:
        options["second_order"] = True
    return options


# A1111's names of the schedule types the facade takes ("Uniform" is DAN's Automatic).
_SCHEDULER_NAMES = {
    AUTOMATIC: "automatic",
    UNIFORM: "uniform",
    KARRAS: "karras",
    EXPONENTIAL: "exponential",
    SGM_UNIFORM: "sgm_uniform",
}


def schedulers() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "label": label,
            "aliases": ["SGMUniform"] if label == SGM_UNIFORM else None,
            "default_rho": 7.0 if label == KARRAS else -1.0,
            "need_inner_model": label in (UNIFORM, SGM_UNIFORM),
        }
        for label, name in _SCHEDULER_NAMES.items()
    ]


def options(checkpoint: InstalledModel | None, clip_skip: int, vae: str) -> dict[str, Any]:
    """A1111's common options, with the caller's checkpoint (None when none is installed),
    clip skip and VAE (a file name, Automatic or None)."""
    return {
        "sd_model_checkpoint": checkpoint_title(checkpoint) if checkpoint else None,
        "sd_checkpoint_hash": checkpoint.sha256 if checkpoint else None,
        "CLIP_stop_at_last_layers": clip_skip,
        "sd_vae": vae,
        "samples_format": "png",
        "eta_noise_seed_delta": 0,
        "live_previews_enable": True,
        "show_progress_every_n_steps": 1,
        "upscaler_for_img2img": None,
        "face_restoration": False,
        "face_restoration_model": None,
    }


# -- progress -------------------------------------------------------------------------------


def progress(active: list[TaskRecord], *, skip_current_image: bool = False) -> dict[str, Any]:
    """A1111's progress of the caller's current task: its first running task, else the first
    of its pending ones; ``state.job_count`` counts all its running and pending tasks."""
    if not active:
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": _state(None, 0),
            "current_image": None,
            "textinfo": None,
        }
    current = active[0]
    preview = current.preview if current.preview and not skip_current_image else None
    waiting = current.status == TaskStatus.PENDING
    return {
        "progress": round(current.progress, 4),
        "eta_relative": eta_s(current) or 0.0,
        "state": _state(current, len(active)),
        "current_image": b64(preview) if preview else None,
        "textinfo": f"Waiting in queue: position {current.queue_position}" if waiting else None,
    }


def _state(current: TaskRecord | None, jobs: int) -> dict[str, Any]:
    steps = _steps(current) if current else 0
    return {
        "skipped": False,
        "interrupted": bool(current and current.cancel_requested),
        "stopping_generation": False,
        "job": current.kind.value if current else "",
        "job_count": jobs,
        "job_timestamp": timestamp(current.created_at) if current else "0",
        "job_no": 0,
        "sampling_step": round(current.progress * steps) if current else 0,
        "sampling_steps": steps,
    }


def _steps(record: TaskRecord) -> int:
    generation = record.params.get("generation", record.params)
    steps = generation.get("steps")
    return steps if isinstance(steps, int) else 0


def module_detail() -> dict[str, Any]:
    """The ControlNet extension's ``module_detail``: each preprocessor's sliders."""

    def slider(name: str, value: int) -> dict[str, Any]:
        return {"name": name, "value": value, "min": 0, "max": 255, "step": 1}

    return {
        "none": {"model_free": False, "sliders": []},
        "canny": {
            "model_free": False,
            "sliders": [slider("Canny Low Threshold", 100), slider("Canny High Threshold", 200)],
        },
        "openpose": {"model_free": False, "sliders": []},
    }
