"""Generation under one ControlNet unit, for Stable Diffusion 1.x and SDXL.

:func:`controlled_txt2img` and :func:`controlled_img2img` (img2img and inpaint) mirror
:func:`dan.engine.generation.img2img.run_img2img` on the base's family's ControlNet pipelines
(SD1.x's or SDXL's, see :mod:`dan.engine.families`); the engine passes the batch's scheduler,
prompt embeddings, generators (one per image) and step callback, and a :class:`ControlUnit`
(a ControlNet loaded by :mod:`dan.engine.control.controlnet` and its control image). The
control image is given once; diffusers repeats it for every image of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dan.domain import (
    ControlNetSpec,
    GenerationRequest,
    Img2ImgRequest,
    InpaintArea,
    ResizeMode,
)
from dan.engine.families import PipelineTask, family_of_pipeline
from dan.engine.generation.img2img import is_inpainting_unet, through_vae, validate_img2img
from dan.engine.generation.masks import crop_region, fit_image, paste_back, prepare_mask, to_rgb
from dan.engine.generation.prompts import PromptEmbeds
from dan.errors import EngineError


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet and what it is conditioned on: ``image`` is the control image itself (the
    preprocessed canny/pose map), at any size; it is fitted to the output with ``resize_mode``.
    """

    model: Any  # ControlNetModel
    image: Image.Image
    weight: float = 1.0
    resize_mode: ResizeMode = ResizeMode.JUST_RESIZE
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False

    @classmethod
    def from_spec(cls, spec: ControlNetSpec, model: Any, image: Image.Image) -> ControlUnit:
        return cls(
            model,
            image,
            spec.weight,
            spec.resize_mode,
            spec.guidance_start,
            spec.guidance_end,
            spec.guess_mode,
        )

    def validate(self) -> None:
        """Raise EngineError unless weight is in [0, 2] and 0 <= start <= end <= 1."""
        if not 0.0 <= self.weight <= 2.0:
            raise EngineError(f"ControlNet weight must be between 0 and 2, got {self.weight}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise EngineError(
                "ControlNet guidance_start and guidance_end must satisfy 0 <= start <= end <= 1, "
                f"got {self.guidance_start} and {self.guidance_end}"
            )

    def fitted(self, width: int, height: int) -> Image.Image:
        return fit_image(to_rgb(self.image), width, height, self.resize_mode)

    def call_kwargs(self) -> dict[str, Any]:
        return {
            "controlnet_conditioning_scale": self.weight,
            "control_guidance_start": self.guidance_start,
            "control_guidance_end": self.guidance_end,
            "guess_mode": self.guess_mode,
        }


@dataclass(frozen=True)
class _Run:
    base: Any  # the cached pipeline (any family), only read
    unit: ControlUnit
    denoise: dict[str, Any]  # scheduler-independent pipeline arguments shared by every call
    scheduler: Any

    def copies(self, image: Image.Image) -> list[Image.Image]:
        """``image`` once per image of the batch (see dan.engine.generation.img2img: each image's
        input is encoded with its own generator)."""
        return [image] * int(self.denoise["num_images_per_prompt"])


def controlled_txt2img(
    base: Any,
    request: GenerationRequest,
    unit: ControlUnit,
    *,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    generator: list[torch.Generator],
    callback_on_step_end: Any,
) -> list[Image.Image]:
    """The images of one batch of a txt2img request conditioned on ``unit``, one per generator.

    With ``unit.weight == 0`` the result equals plain txt2img's for the same scheduler, seed and
    embeddings, pixel for pixel. ``base`` (any family; SDXL's takes the pooled embeddings too)
    is only read. Raises EngineError for an invalid unit,
    for a request with hires fix (hires_fix runs those, with the unit) and when diffusers rejects
    the inputs; TaskCancelled raised by the callback propagates.
    """
    unit.validate()
    if request.hires is not None:
        raise EngineError(
            "a request with hires fix runs through dan.engine.generation.hires.hires_fix"
        )
    embeds = PromptEmbeds(
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
    )
    run = _run(base, unit, scheduler, embeds, generator)
    run.denoise.update(num_inference_steps=request.steps, guidance_scale=request.cfg_scale)
    run.denoise["callback_on_step_end"] = callback_on_step_end
    with torch.inference_mode():
        return _txt2img(run, request.width, request.height)


def controlled_img2img(
    base: Any,
    request: Img2ImgRequest,
    init_image: Image.Image,
    mask: Image.Image | None,
    unit: ControlUnit,
    *,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    generator: list[torch.Generator],
    callback_on_step_end: Any,
) -> list[Image.Image]:
    """:func:`~dan.engine.generation.img2img.run_img2img` with ``unit`` conditioning every
    denoising call.

    Same sizes, strength semantics and inpainting guarantee (pixels where the prepared mask is 0
    are the fitted init image's, byte for byte). For ONLY_MASKED inpainting the control image is
    fitted to the init image's size and cropped with the same box as the init image. Raises
    EngineError as run_img2img does and for an invalid unit.
    """
    validate_img2img(request, init_image, mask)
    unit.validate()
    generation = request.generation
    embeds = PromptEmbeds(
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
    )
    run = _run(base, unit, scheduler, embeds, generator)
    run.denoise.update(num_inference_steps=generation.steps, guidance_scale=generation.cfg_scale)
    run.denoise.update(
        callback_on_step_end=callback_on_step_end, strength=request.denoising_strength
    )
    width, height, source = generation.width, generation.height, to_rgb(init_image)
    with torch.inference_mode():
        if request.inpaint is None or mask is None:
            image = fit_image(source, width, height, request.resize_mode)
            return _img2img(run, image, unit.fitted(width, height))
        if request.inpaint.inpaint_area == InpaintArea.WHOLE_PICTURE:
            original = fit_image(source, width, height, request.resize_mode)
            spec = request.inpaint
            prepared = prepare_mask(
                mask, width, height, request.resize_mode, spec.mask_blur, spec.mask_mode
            )
            regenerated = _masked(run, original, prepared, unit.fitted(width, height))
            return [paste_back(original, image, prepared) for image in regenerated]
        return _only_masked(run, source, mask, request, width, height)


def _run(
    base: Any,
    unit: ControlUnit,
    scheduler: Any,
    embeds: PromptEmbeds,
    generators: list[torch.Generator],
) -> _Run:
    denoise = {
        **embeds.call_kwargs(),
        "generator": generators,
        "num_images_per_prompt": len(generators),
        **unit.call_kwargs(),
    }
    return _Run(base, unit, denoise, scheduler)


def _txt2img(run: _Run, width: int, height: int) -> list[Image.Image]:
    inputs = {k: v for k, v in run.denoise.items() if k != "strength"}
    image = run.unit.fitted(width, height)
    return _call("controlnet_txt2img", run, inputs, image=image, width=width, height=height)


def _img2img(run: _Run, image: Image.Image, control: Image.Image) -> list[Image.Image]:
    strength = run.denoise["strength"]
    if strength == 0:
        return run.copies(through_vae(run.base, image))
    if is_inpainting_unet(run.base):
        # As run_img2img: an inpainting model's img2img is inpainting of the whole picture.
        return _masked(run, image, Image.new("L", image.size, 255), control)
    if strength == 1:  # as run_img2img: starting from pure noise is txt2img
        return _txt2img(run, *image.size)
    size = {"width": image.width, "height": image.height}
    init = run.copies(image)
    return _call("controlnet_img2img", run, run.denoise, image=init, control_image=control, **size)


def _masked(
    run: _Run, image: Image.Image, mask: Image.Image, control: Image.Image
) -> list[Image.Image]:
    if run.denoise["strength"] == 0:
        return run.copies(through_vae(run.base, image))
    size = {"width": image.width, "height": image.height}
    inputs = {"image": run.copies(image), "mask_image": run.copies(mask)}
    return _call("controlnet_inpaint", run, run.denoise, **inputs, control_image=control, **size)


def _only_masked(
    run: _Run,
    source: Image.Image,
    mask_image: Image.Image,
    request: Img2ImgRequest,
    width: int,
    height: int,
) -> list[Image.Image]:
    """Regenerate the crop around the mask at width x height and paste it back (A1111's way)."""
    spec, just = request.inpaint, ResizeMode.JUST_RESIZE
    assert spec is not None
    mask = prepare_mask(mask_image, *source.size, just, spec.mask_blur, spec.mask_mode)
    box = crop_region(mask, spec.padding, width, height)
    crop = fit_image(source.crop(box), width, height, just)
    crop_mask = fit_image(mask.crop(box), width, height, just)
    control = fit_image(run.unit.fitted(*source.size).crop(box), width, height, just)
    regenerated = _masked(run, crop, crop_mask, control)
    return [paste_back(source, image, mask, box) for image in regenerated]


def _call(
    task: PipelineTask, run: _Run, inputs: dict[str, Any], **images: Any
) -> list[Image.Image]:
    """The batch's images from the base's family's ``task`` pipeline sharing the base's
    weights, with the run's scheduler and the unit's ControlNet."""
    family = family_of_pipeline(run.base)
    pipeline = family.pipeline(task, run.base, run.scheduler, controlnet=run.unit.model)
    try:
        output = pipeline(**inputs, **images)
    except ValueError as exc:  # diffusers' check_inputs and shape checks
        raise EngineError(f"ControlNet generation failed: {exc}") from exc
    return list(output.images)
