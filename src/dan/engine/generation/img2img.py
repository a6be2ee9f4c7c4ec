"""img2img and inpainting on a loaded Stable Diffusion pipeline of any family, as A1111 does.

The engine owns loading, prompt encoding, the scheduler and the generator; this module turns an
:class:`~dan.domain.Img2ImgRequest` into images. Geometry (fitting, masks, crop boxes, pasting
back) lives in :mod:`dan.engine.generation.masks`.

Sizes of the result:

- img2img, and inpaint with WHOLE_PICTURE: ``width`` x ``height``; the init image (and the mask)
  are first fitted with ``resize_mode``.
- inpaint with ONLY_MASKED: the init image's own size, as in A1111. ``width`` x ``height`` is
  the resolution at which the crop around the mask is regenerated; ``resize_mode`` is not used.

Inpainting guarantee: where the prepared mask (thresholded, inverted for mask_mode 1, blurred)
is 0, result pixels are byte-identical to the (fitted) init image flattened to RGB.

ControlNet: given a :class:`~dan.engine.control.runs.ControlUnit`, every denoising call runs on
the family's ControlNet twin of its pipeline, with the control image fitted to that call's
picture: to ``width`` x ``height``, or for ONLY_MASKED to the init image's size and then cropped
and stretched with the same box as the init image. Everything else (sizes, fill, strength, the
inpainting guarantee) is the same with a unit as without one.

Batches: one generator per image, and every image input (init image, mask) is handed to the
pipeline once per image, so diffusers encodes image i with generator i exactly as it does for a
batch of one: each image is the one a single request with its seed gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from dan.domain import Img2ImgRequest, InpaintArea, InpaintSpec, MaskedContent, ResizeMode
from dan.engine.control.runs import ControlUnit, PlainTask
from dan.engine.families import family_of_pipeline
from dan.engine.generation.masks import (
    Box,
    crop_region,
    fill_masked,
    fit_image,
    paste_back,
    prepare_mask,
    to_rgb,
)
from dan.engine.generation.prompts import PromptEmbeds
from dan.errors import EngineError


@dataclass(frozen=True)
class _Run:
    """What every denoising call of one request shares."""

    base: Any  # the loaded pipeline (any family), only read
    scheduler: Any
    embeds: PromptEmbeds
    generators: list[torch.Generator]  # one per image of the batch
    callback_on_step_end: Any
    steps: int
    cfg_scale: float
    strength: float
    width: int
    height: int
    unit: ControlUnit | None  # the ControlNet conditioning every denoising call, if any

    def call_kwargs(self) -> dict[str, Any]:
        return {
            **self.embeds.call_kwargs(),
            "num_inference_steps": self.steps,
            "guidance_scale": self.cfg_scale,
            "generator": self.generators,
            "num_images_per_prompt": len(self.generators),
            "callback_on_step_end": self.callback_on_step_end,
        }

    def copies(self, image: Image.Image) -> list[Image.Image]:
        """``image`` once per image of the batch: diffusers' inpainting encodes only the
        images it is given, and each must be encoded with its own image's generator."""
        return [image] * len(self.generators)

    def size_kwargs(self) -> dict[str, int]:
        # Only txt2img and inpaint take a size; img2img takes its image's (and ignores extras).
        return {"width": self.width, "height": self.height}

    def control(self, size: tuple[int, int], box: Box | None = None) -> Image.Image | None:
        """The unit's control image for a picture of ``size``, or for the crop ``box`` of such
        a picture stretched to width x height; None without a unit."""
        if self.unit is None:
            return None
        fitted = self.unit.fitted(*size)
        if box is None:
            return fitted
        return fit_image(fitted.crop(box), self.width, self.height, ResizeMode.JUST_RESIZE)


def validate_img2img(
    request: Img2ImgRequest, init_image: Image.Image, mask: Image.Image | None
) -> None:
    """Raise EngineError, with a message that says what to change, for a request that cannot run.

    Checked: strength in [0, 1]; ``int(steps * strength) >= 1`` unless strength is 0 (diffusers
    runs that many steps); a mask exactly when the request has ``inpaint``; the mask's size equals
    the init image's (the API rejects others; A1111 would silently stretch it).
    """
    strength, steps = request.denoising_strength, request.generation.steps
    if not 0.0 <= strength <= 1.0:
        raise EngineError(f"denoising_strength must be between 0 and 1, got {strength}")
    if strength > 0 and int(steps * strength) < 1:
        raise EngineError(
            f"denoising_strength {strength} with {steps} steps runs int({steps} * {strength}) = 0 "
            f"denoising steps; use at least {_min_steps(strength)} steps or a higher strength"
        )
    if (mask is None) != (request.inpaint is None):
        raise EngineError("a mask is required exactly when the request has inpaint settings")
    if mask is not None and mask.size != init_image.size:
        raise EngineError(
            f"the mask is {mask.width}x{mask.height} but the init image is "
            f"{init_image.width}x{init_image.height}; they must have the same size"
        )


def _min_steps(strength: float) -> int:
    steps = max(1, int(1 / strength))
    while int(steps * strength) < 1:  # float rounding: 1 / 0.1 * 0.1 may fall short of 1
        steps += 1
    return steps


def run_img2img(
    base: Any,
    request: Img2ImgRequest,
    init_image: Image.Image,
    mask: Image.Image | None,
    *,
    scheduler: Any,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    generator: list[torch.Generator],
    callback_on_step_end: Any,
    unit: ControlUnit | None = None,
) -> list[Image.Image]:
    """The images of one batch of an img2img or inpaint request, made from ``init_image``: one
    per generator, image i with noise from generator i; with ``unit``, every denoising call is
    conditioned on its ControlNet (see the module docstring).

    ``base`` is the cached pipeline of any family (SDXL's takes the pooled embeddings too); it
    is only read (its components are shared, ``scheduler``
    is this request's own). 9-channel inpainting checkpoints are recognised from the UNet.
    Strength 0 returns the fitted input passed through the VAE (encode to the latent mean,
    decode) without running the UNet; strength 1 ignores the input entirely for img2img on a
    4-channel checkpoint (it is then txt2img). ``mask`` is the uploaded mask, required exactly
    when ``request.inpaint`` is set. Raises EngineError for invalid requests (see
    :func:`validate_img2img`, :func:`~dan.engine.generation.masks.prepare_mask`), for an invalid
    unit and when diffusers rejects the inputs; TaskCancelled raised by the callback propagates.
    """
    validate_img2img(request, init_image, mask)
    if unit is not None:
        unit.validate()
    generation = request.generation
    run = _Run(
        base=base,
        scheduler=scheduler,
        embeds=PromptEmbeds(
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ),
        generators=generator,
        callback_on_step_end=callback_on_step_end,
        steps=generation.steps,
        cfg_scale=generation.cfg_scale,
        strength=request.denoising_strength,
        width=generation.width,
        height=generation.height,
        unit=unit,
    )
    source = to_rgb(init_image)
    with torch.inference_mode():
        if request.inpaint is None or mask is None:
            fitted = fit_image(source, run.width, run.height, request.resize_mode)
            return _img2img(run, fitted, run.control(fitted.size))
        return _inpaint(run, source, mask, request.resize_mode, request.inpaint)


def _img2img(run: _Run, image: Image.Image, control: Image.Image | None) -> list[Image.Image]:
    if run.strength == 0:
        return run.copies(through_vae(run.base, image))
    if is_inpainting_unet(run.base):
        # A1111 runs an inpainting model's img2img as inpainting of the whole picture.
        return _denoise_masked(run, image, Image.new("L", image.size, 255), control)
    if run.strength == 1:
        # diffusers' img2img still adds the init latents to the first noise at strength 1;
        # "ignores the input" means starting from pure noise, which is txt2img.
        return _call("txt2img", run, control, **run.size_kwargs())
    image_input = run.copies(image)
    return _call("img2img", run, control, image=image_input, strength=run.strength)


def _inpaint(
    run: _Run,
    source: Image.Image,
    mask_image: Image.Image,
    resize_mode: ResizeMode,
    spec: InpaintSpec,
) -> list[Image.Image]:
    """Regenerate the masked part and paste it back over the untouched original."""
    if spec.inpaint_area == InpaintArea.ONLY_MASKED:
        # Mask at the original's size; only the crop around it is brought to width x height.
        mask = prepare_mask(
            mask_image, *source.size, ResizeMode.JUST_RESIZE, spec.mask_blur, spec.mask_mode
        )
        box = crop_region(mask, spec.padding, run.width, run.height)
        # The box has (nearly) the target's aspect ratio; stretching both ways keeps the
        # round trip crop -> generate -> paste aligned even where clipping bent the ratio.
        crop = fit_image(source.crop(box), run.width, run.height, ResizeMode.JUST_RESIZE)
        crop_mask = fit_image(mask.crop(box), run.width, run.height, ResizeMode.JUST_RESIZE)
        control = run.control(source.size, box)
        regenerated = _regenerate(run, crop, crop_mask, spec.fill, control)
        return [paste_back(source, image, mask, box) for image in regenerated]
    original = fit_image(source, run.width, run.height, resize_mode)
    mask = prepare_mask(
        mask_image, run.width, run.height, resize_mode, spec.mask_blur, spec.mask_mode
    )
    regenerated = _regenerate(run, original, mask, spec.fill, run.control(original.size))
    return [paste_back(original, image, mask) for image in regenerated]


def _regenerate(
    run: _Run,
    image: Image.Image,
    mask: Image.Image,
    fill: MaskedContent,
    control: Image.Image | None,
) -> list[Image.Image]:
    if fill == MaskedContent.FILL:
        image = fill_masked(image, mask)
    if run.strength == 0:
        return run.copies(through_vae(run.base, image))
    return _denoise_masked(run, image, mask, control)


def _denoise_masked(
    run: _Run, image: Image.Image, mask: Image.Image, control: Image.Image | None
) -> list[Image.Image]:
    # diffusers binarises the mask at 0.5 for the latents, as A1111 rounds its latent mask; the
    # blur only shapes the final paste-back. On a 4-channel UNet the pipeline re-imposes the
    # noised original latents outside the mask after every step (A1111's approach).
    return _call(
        "inpaint",
        run,
        control,
        image=run.copies(image),
        mask_image=run.copies(mask),
        strength=run.strength,
        **run.size_kwargs(),
    )


def _call(
    task: PlainTask, run: _Run, control: Image.Image | None, **inputs: Any
) -> list[Image.Image]:
    """The batch's images from the base's family's ``task`` pipeline sharing the base's
    weights, with the run's scheduler; with a unit, its ControlNet twin conditioned on
    ``control``."""
    if run.unit is None:
        pipeline = family_of_pipeline(run.base).pipeline(task, run.base, run.scheduler)
    else:
        assert control is not None  # _Run.control gives one whenever there is a unit
        pipeline = run.unit.pipeline(task, run.base, run.scheduler)
        inputs.update(run.unit.conditioning(task, control))
    try:
        output = pipeline(**run.call_kwargs(), **inputs)
    except ValueError as exc:  # diffusers' check_inputs and shape checks
        raise EngineError(f"img2img failed: {exc}") from exc
    return list(output.images)


def is_inpainting_unet(pipeline: Any) -> bool:
    """True for a 9-channel UNet (latents + mask + masked-image latents)."""
    return int(pipeline.unet.config.in_channels) == 9


def through_vae(pipeline: Any, image: Image.Image) -> Image.Image:
    """``image`` encoded by the pipeline's VAE (the latent mean, no sampling) and decoded.

    This is what img2img at strength 0 returns: no noise, no UNet. Deterministic.
    """
    vae, processor = pipeline.vae, pipeline.image_processor
    with torch.inference_mode():
        pixels = processor.preprocess(image).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents, return_dict=False)[0]
    images: list[Image.Image] = processor.postprocess(decoded, output_type="pil")
    return images[0]
