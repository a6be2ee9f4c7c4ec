"""Hires fix (txt2img's ``upscale``): generate, upscale, denoise again at the larger size.

As in AUTOMATIC1111:

1. the first pass is an ordinary txt2img at the requested ``width`` x ``height``;
2. the target is ``scale`` times that size, each side rounded to a multiple of 8;
3. a latent upscaler interpolates the first pass's latents, which img2img takes as ``image``
   (4-channel input skips the VAE encode); an image upscaler (Lanczos, Nearest, a model)
   enlarges the decoded image, which img2img encodes;
4. the second pass denoises over the last ``denoising_strength`` of a stretched schedule, so it
   runs ``hires.steps`` steps (A1111's "hires steps"), by default (0) as many as the first, with
   noise from the same seed.

A batch goes through both passes together, each image with noise from its own seed (one
generator per image), so it is the image a batch of one with that seed gives.
``denoising_strength`` 0 returns the upscaled first pass without a second pass. With a
ControlNet unit, both passes are conditioned on its control image, fitted to each pass's size
(as A1111's ControlNet extension does by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL.Image import Image

from dan.domain import GenerationRequest, HiresFix, ModelFiles, ProgressCallback, hires_size
from dan.engine.control.runs import ControlUnit, PlainTask
from dan.engine.families import family_of_pipeline
from dan.engine.generation.preview import LatentsSink, step_callback
from dan.engine.generation.prompts import PromptEmbeds
from dan.engine.upscaling.upscale import (
    is_latent_upscaler,
    model_file_of,
    resize_image,
    upscale_latents,
)
from dan.engine.upscaling.upscale_models import UpscalerModels
from dan.errors import EngineError

# A fresh scheduler (its own state) and freshly seeded generators (one per image of the
# batch), for each pass.
SchedulerFactory = Callable[[], Any]
GeneratorFactory = Callable[[], list[torch.Generator]]


@dataclass(frozen=True)
class ProgressPlan:
    """Denoising calls of each pass; progress reports ``(done, first + second)``."""

    first: int
    second: int

    @property
    def total(self) -> int:
        return self.first + self.second


def second_pass_steps(steps: int, denoising_strength: float, *, limit: int = 999) -> int:
    """``num_inference_steps`` for img2img so that it runs ``steps`` steps at this strength.

    img2img runs ``int(num_inference_steps * strength)`` steps; the smallest count that gives
    ``steps`` is returned, capped at ``limit`` (below the scheduler's training timesteps), so a
    tiny strength runs fewer steps. 0 means no second pass (strength 0, or too small to run one).
    """
    if denoising_strength <= 0:
        return 0
    # Start just below the exact count: steps / strength is off by float rounding either way.
    count = min(max(int(steps / denoising_strength) - 1, 1), limit)
    while int(count * denoising_strength) < steps and count < limit:
        count += 1
    return count if int(count * denoising_strength) >= 1 else 0


def denoising_calls(scheduler: Any, num_inference_steps: int, strength: float = 1.0) -> int:
    """How many times a pipeline calls ``callback_on_step_end`` with ``scheduler``.

    Mirrors diffusers' txt2img (all timesteps) and img2img (the last ``strength`` of them);
    second-order schedulers have more timesteps than steps. ``scheduler`` is set up here, so pass
    a spare instance, not the one a pipeline will use.
    """
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = (num_inference_steps - kept) * scheduler.order
    return len(scheduler.timesteps[start:])


def hires_fix(
    base: Any,
    request: GenerationRequest,
    embeds: PromptEmbeds,
    *,
    new_scheduler: SchedulerFactory,
    new_generators: GeneratorFactory,
    files: ModelFiles,
    upscalers: UpscalerModels,
    progress: ProgressCallback,
    unit: ControlUnit | None = None,
    on_latents: LatentsSink | None = None,
) -> list[Image]:
    """The hires-fixed images of one batch of ``request`` (which must have ``hires``), of
    :func:`hires_size`, conditioned on ``unit`` in both passes when given.

    ``base`` (a loaded pipeline of any family) lends its components (never its scheduler); each
    pass gets ``new_scheduler()`` and ``new_generators()``, one generator per image: the batch
    has as many images as generators, and each pass draws image i's noise from generator i.
    ``progress(done, total)`` counts the denoising calls of both passes (the total is fixed from
    the start), is also called between the passes and after every upscaler tile (to let
    cancellation in), and ends at ``(total, total)``. Raises EngineError for an upscaler that
    cannot run or an invalid unit;
    TaskCancelled from ``progress`` propagates.
    """
    hires = _hires_of(request)
    if unit is not None:
        unit.validate()
    # 1. Sizes, step counts and the progress total, all fixed before anything runs.
    target = hires_size(request.width, request.height, hires.scale)
    limit = int(base.scheduler.config.num_train_timesteps) - 1
    steps = hires.second_pass_steps(request.steps)
    second_steps = second_pass_steps(steps, hires.denoising_strength, limit=limit)
    plan = plan_progress(new_scheduler, request.steps, second_steps, hires.denoising_strength)
    latent = is_latent_upscaler(hires.upscaler.name)
    with torch.inference_mode():
        # 2. First pass at the requested size: latents for latent modes, else the image.
        pipeline = _pipeline("txt2img", base, new_scheduler(), unit)
        first = pipeline(
            **_common_arguments(request, embeds, new_generators()),
            **_conditioning(unit, "txt2img", (request.width, request.height)),
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            output_type="latent" if latent else "pil",
            callback_on_step_end=step_callback(progress, total=plan.total, on_latents=on_latents),
        ).images
        # 3. Upscale to the target size.
        hold = _holding(progress, plan.first, plan.total)
        init = _upscale_first_pass(first, target, hires, files, upscalers, hold)
        progress(plan.first, plan.total)
        if not second_steps:
            return decode_latents(pipeline, init) if isinstance(init, torch.Tensor) else init
        # 4. Second pass: img2img of the upscaled latents or image, noise from the same seed.
        images = _pipeline("img2img", base, new_scheduler(), unit)(
            **_common_arguments(request, embeds, new_generators()),
            **_conditioning(unit, "img2img", target),
            image=init,
            strength=hires.denoising_strength,
            num_inference_steps=second_steps,
            callback_on_step_end=step_callback(
                progress, offset=plan.first, total=plan.total, on_latents=on_latents
            ),
        ).images
    progress(plan.total, plan.total)
    return list(images)


def plan_progress(
    new_scheduler: SchedulerFactory, steps: int, second_steps: int, denoising_strength: float
) -> ProgressPlan:
    """Denoising calls of both passes (``second_steps`` 0: none), counted on spare schedulers."""
    first = denoising_calls(new_scheduler(), steps)
    if not second_steps:
        return ProgressPlan(first, 0)
    return ProgressPlan(first, denoising_calls(new_scheduler(), second_steps, denoising_strength))


def _upscale_first_pass(
    first: Any,
    target: tuple[int, int],
    hires: HiresFix,
    files: ModelFiles,
    upscalers: UpscalerModels,
    hold: ProgressCallback,
) -> torch.Tensor | list[Image]:
    """The first pass's latents or images (``first``: the pipeline's ``images``) at
    ``target``."""
    if is_latent_upscaler(hires.upscaler.name):
        latents: torch.Tensor = first
        return upscale_latents(latents, *target, hires.upscaler.name)
    # A model upscaler's tiles may take minutes on a CPU: ``hold`` lets cancellation in.
    model_file = model_file_of(hires.upscaler, files)
    return [
        resize_image(image, target, hires.upscaler, model_file, models=upscalers, progress=hold)
        for image in first
    ]


def _hires_of(request: GenerationRequest) -> HiresFix:
    if request.hires is None:
        raise EngineError("hires_fix needs a request with hires settings")
    return request.hires


def _pipeline(task: PlainTask, base: Any, scheduler: Any, unit: ControlUnit | None) -> Any:
    """A ``task`` pipeline of ``base``'s family sharing its weights, with its own
    ``scheduler``: the unit's ControlNet twin of it when there is a ``unit``."""
    if unit is not None:
        return unit.pipeline(task, base, scheduler)
    return family_of_pipeline(base).pipeline(task, base, scheduler)


def _conditioning(
    unit: ControlUnit | None, task: PlainTask, size: tuple[int, int]
) -> dict[str, Any]:
    """The ControlNet arguments of one pass: the control image fitted to ``size``, and the
    unit's weight, window and guess mode (none without a ``unit``)."""
    return {} if unit is None else unit.conditioning(task, unit.fitted(*size))


def _common_arguments(
    request: GenerationRequest, embeds: PromptEmbeds, generators: list[torch.Generator]
) -> dict[str, Any]:
    return {
        **embeds.call_kwargs(),
        "guidance_scale": request.cfg_scale,
        "generator": generators,
        "num_images_per_prompt": len(generators),
    }


def decode_latents(pipeline: Any, latents: torch.Tensor) -> list[Image]:
    """The images of SD ``latents`` (n, 4, h, w), decoded by ``pipeline``'s VAE."""
    vae = pipeline.vae
    with torch.inference_mode():
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)
        images: list[Image] = pipeline.image_processor.postprocess(decoded[0], output_type="pil")
    return images


def _holding(progress: ProgressCallback, done: int, total: int) -> ProgressCallback:
    """A progress callback that reports ``(done, total)`` whatever it is told."""

    def report(_done: int, _total: int) -> None:
        progress(done, total)

    return report
