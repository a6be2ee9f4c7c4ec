"""DAN tasks as the request bodies of AUTOMATIC1111's API (``/sdapi/v1`` and the ControlNet
extension's), and the size of what each must answer.

Models are named as the instance names them (``names(kind, sha256)``): the checkpoint by its
title in ``override_settings``, LoRAs as ``<lora:name:weight>`` tags appended to the prompt
(after removing the tags the user wrote, which the server already resolved), model upscalers
and ControlNet models by the instance's names for those files. The checkpoint stays loaded
after the task (``override_settings_restore_afterwards`` off), so the next task on it does not
load it again: the node reports it as loaded and the server prefers to send it such tasks.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from PIL.Image import Image

from dan.domain import (
    ControlNetSpec,
    DetectRequest,
    GenerationRequest,
    Img2ImgRequest,
    InpaintArea,
    InterrogateRequest,
    ModelKind,
    UpscalerChoice,
    UpscaleRequest,
    hires_size,
    scaled_size,
)
from dan.imaging import regenerated_area
from dan.prompt_tags import extract_lora_tags
from dan.samplers import a1111_schedule

Names = Callable[[ModelKind, str], str]  # (kind, sha256) -> the instance's name for it

# The ControlNet extension's names of DAN's ResizeMode values and of guess mode.
_CONTROLNET_RESIZE = ("Just Resize", "Crop and Resize", "Resize and Fill")
_GUESS_MODE = "ControlNet is more important"
_BALANCED = "Balanced"


def b64_png(image: Image) -> str:
    """``image`` as the base64 PNG the API takes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def txt2img(
    request: GenerationRequest, names: Names, control_image: Image | None = None
) -> dict[str, Any]:
    """The ``POST /sdapi/v1/txt2img`` body of ``request``."""
    body = _generation(request, names)
    if request.hires is not None:
        body |= {
            "enable_hr": True,
            "hr_scale": request.hires.scale,
            "hr_upscaler": _upscaler(request.hires.upscaler, names),
            "denoising_strength": request.hires.denoising_strength,
            "hr_second_pass_steps": request.hires.steps,  # 0: as many as the first pass
        }
    return body | _controlnet(request.control_net, names, control_image)


def txt2img_size(request: GenerationRequest) -> tuple[int, int]:
    """The size of every image a txt2img answer must hold (with hires fix, DAN rounds each
    side to a multiple of 8; A1111 truncates instead, which the engine evens out)."""
    if request.hires is not None:
        return hires_size(request.width, request.height, request.hires.scale)
    return request.width, request.height


def img2img(
    request: Img2ImgRequest,
    init: Image,
    mask: Image | None,
    names: Names,
    control_image: Image | None = None,
) -> dict[str, Any]:
    """The ``POST /sdapi/v1/img2img`` body of ``request``."""
    body = _generation(request.generation, names) | {
        "init_images": [b64_png(init)],
        "resize_mode": int(request.resize_mode),
        "denoising_strength": request.denoising_strength,
    }
    if request.inpaint is not None and mask is not None:
        body |= {
            # Thresholded by DAN's rule (white or opaque = regenerate), so both sides agree.
            "mask": b64_png(regenerated_area(mask)),
            "mask_blur": request.inpaint.mask_blur,
            "inpainting_mask_invert": int(request.inpaint.mask_mode),
            "inpaint_full_res": request.inpaint.inpaint_area == InpaintArea.ONLY_MASKED,
            "inpaint_full_res_padding": request.inpaint.padding,
            "inpainting_fill": int(request.inpaint.fill),
        }
    return body | _controlnet(request.generation.control_net, names, control_image)


def img2img_size(request: Img2ImgRequest, init: Image) -> tuple[int, int]:
    """The size of every image of the task's result: the requested size, or, when only the
    masked part is redrawn, the picture's own (DAN pastes the redrawn crop back into the
    picture; A1111 first fits the picture to the requested size, which the engine undoes)."""
    if only_masked(request):
        return init.size
    return request.generation.width, request.generation.height


def only_masked(request: Img2ImgRequest) -> bool:
    return bool(request.inpaint and request.inpaint.inpaint_area == InpaintArea.ONLY_MASKED)


def upscale(request: UpscaleRequest, image: Image, names: Names) -> dict[str, Any]:
    """The ``POST /sdapi/v1/extra-single-image`` body of ``request`` (by a factor)."""
    second = request.upscaler2
    return {
        "image": b64_png(image),
        "resize_mode": 0,
        "upscaling_resize": request.rate,
        "upscaler_1": _upscaler(request.upscaler, names),
        "upscaler_2": _upscaler(second, names) if second is not None else "None",
        "extras_upscaler_2_visibility": request.upscaler2_factor if second is not None else 0,
    }


def upscale_size(request: UpscaleRequest, image: Image) -> tuple[int, int]:
    """The size of the upscaled image (A1111's upscalers round down to a multiple of 8 instead,
    which the engine evens out)."""
    return scaled_size(image.size, request.rate)


def detect(request: DetectRequest, image: Image) -> dict[str, Any]:
    """The ``POST /controlnet/detect`` body: at the picture's resolution (the preprocessor
    scales the short side to ``controlnet_processor_res``)."""
    return {
        "controlnet_module": request.preprocess,
        "controlnet_input_images": [b64_png(image)],
        "controlnet_processor_res": min(image.size),
        "controlnet_threshold_a": request.low_threshold,
        "controlnet_threshold_b": request.high_threshold,
    }


def interrogate(request: InterrogateRequest, image: Image) -> dict[str, Any]:
    """The ``POST /sdapi/v1/interrogate`` body (``clip`` or ``deepdanbooru``, as A1111's)."""
    return {"image": b64_png(image), "model": request.model}


def _generation(request: GenerationRequest, names: Names) -> dict[str, Any]:
    sampler, schedule = request.sampling
    return {
        "prompt": _prompt(request, names),
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "subseed": -1,
        "subseed_strength": 0,
        # Apart, as A1111 1.9+ takes them; DAN's Automatic is "Uniform" where A1111's is not.
        "sampler_name": sampler,
        "scheduler": a1111_schedule(sampler, schedule),
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
        "width": request.width,
        "height": request.height,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "override_settings": {
            "sd_model_checkpoint": names(ModelKind.CHECKPOINT, request.model.sha256),
            "CLIP_stop_at_last_layers": request.clip_skip,
            # A1111 finds embeddings by name in the prompt itself; "None": the checkpoint's VAE.
            "sd_vae": names(ModelKind.VAE, request.vae.sha256) if request.vae else "None",
        },
        "override_settings_restore_afterwards": False,
        "send_images": True,
        "save_images": False,
    }


def _prompt(request: GenerationRequest, names: Names) -> str:
    """The prompt without the user's LoRA tags, with one tag per resolved LoRA appended, in
    the instance's names."""
    prompt, _ = extract_lora_tags(request.prompt)
    tags = [
        f"<lora:{names(ModelKind.LORA, lora.model.sha256)}:{lora.weight:g}>"
        for lora in request.loras
    ]
    return " ".join([prompt.strip(), *tags]).strip()


def _upscaler(choice: UpscalerChoice, names: Names) -> str:
    """An upscaler's name: DAN's built-in names are A1111's; a model upscaler is named as
    the instance names its file."""
    if choice.model is None:
        return choice.name
    return names(ModelKind.UPSCALER, choice.model.sha256)


def _controlnet(
    spec: ControlNetSpec | None, names: Names, control_image: Image | None
) -> dict[str, Any]:
    """The ControlNet extension's unit for ``spec``, in ``alwayson_scripts``."""
    if spec is None or control_image is None:
        return {}
    unit = {
        "enabled": True,
        "image": b64_png(control_image),
        "module": spec.preprocess,
        "model": names(ModelKind.CONTROLNET, spec.model.sha256),
        "weight": spec.weight,
        "resize_mode": _CONTROLNET_RESIZE[int(spec.resize_mode)],
        "guidance_start": spec.guidance_start,
        "guidance_end": spec.guidance_end,
        "threshold_a": spec.low_threshold,
        "threshold_b": spec.high_threshold,
        "control_mode": _GUESS_MODE if spec.guess_mode else _BALANCED,
        "pixel_perfect": True,  # the preprocessor works at the size generated (as DAN's does)
        "save_detected_map": False,  # the answer then holds only the generated images
    }
    return {"alwayson_scripts": {"controlnet": {"args": [unit]}}}
