"""Generation under one ControlNet unit, for Stable Diffusion 1.x and SDXL.

A :class:`ControlUnit` is a ControlNet loaded by :mod:`dan.engine.control.controlnet` and its
control image; it builds the ControlNet twin of a base's family's pipelines (SD1.x's or SDXL's,
see :mod:`dan.engine.families`) and their conditioning arguments. :func:`controlled_txt2img`
runs txt2img under a unit; img2img and inpaint under a unit are
:func:`dan.engine.generation.img2img.run_img2img` given ``unit=``, so both share one
preparation (fitting, masks, fill, crop boxes). The control image is given once; diffusers
repeats it for every image of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from dan.domain import ControlNetSpec, GenerationRequest, ResizeMode
from dan.engine.families import PipelineTask, family_of_pipeline
from dan.engine.generation.masks import fit_image, to_rgb
from dan.engine.generation.prompts import PromptEmbeds
from dan.errors import EngineError

# The plain pipelines a unit has ControlNet twins of, and those twins.
PlainTask = Literal["txt2img", "img2img", "inpaint"]
_CONTROLLED: dict[PlainTask, PipelineTask] = {
    "txt2img": "controlnet_txt2img",
    "img2img": "controlnet_img2img",
    "inpaint": "controlnet_inpaint",
}


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

    def pipeline(self, task: PlainTask, base: Any, scheduler: Any) -> Any:
        """The ControlNet twin of ``base``'s family's ``task`` pipeline, sharing ``base``'s
        weights, with its own ``scheduler`` and this unit's ControlNet."""
        family = family_of_pipeline(base)
        return family.pipeline(_CONTROLLED[task], base, scheduler, controlnet=self.model)

    def conditioning(self, task: PlainTask, control_image: Image.Image) -> dict[str, Any]:
        """The arguments that condition a :meth:`pipeline` call on ``control_image`` (already
        fitted to the call's size): its weight, window and guess mode."""
        # diffusers' ControlNet txt2img takes the control image as ``image``; the others take
        # ``image`` for the init image and ``control_image`` for it.
        key = "image" if task == "txt2img" else "control_image"
        return {key: control_image, **self.call_kwargs()}


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
    size = {"width": request.width, "height": request.height}
    pipeline = unit.pipeline("txt2img", base, scheduler)
    try:
        with torch.inference_mode():
            output = pipeline(
                **embeds.call_kwargs(),
                **unit.conditioning("txt2img", unit.fitted(request.width, request.height)),
                **size,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                generator=generator,
                num_images_per_prompt=len(generator),
                callback_on_step_end=callback_on_step_end,
            )
    except ValueError as exc:  # diffusers' check_inputs and shape checks
        raise EngineError(f"ControlNet generation failed: {exc}") from exc
    return list(output.images)
