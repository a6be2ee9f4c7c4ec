"""The facade's wire models: AUTOMATIC1111's field names and defaults, unknown fields ignored.

A1111 declares every field optional, ``null`` meaning "the default"; so do these. Types and
ranges are checked here (a body that does not validate answers 422, naming the field);
what DAN can or cannot do with valid values is decided in ``translate`` (400, naming the
field). Fields that only tune A1111's samplers or its UI (``eta``, ``s_churn``, ``s_noise``,
``image_cfg_scale``, ``do_not_save_samples`` ...) are accepted and have no effect.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dan.api.schemas import MAX_SIZE, MAX_STEPS, MIN_SIZE, Text, integer, real
from dan.domain import MAX_BATCH_SIZE, MAX_N_ITER, SEED_MAX

MAX_PADDING = 256  # A1111's "only masked padding" slider


class A1111Body(BaseModel):
    """A request body: unknown fields ignored, ``null`` values replaced by the defaults."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class GenerationRequest(A1111Body):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    prompt: Text = ""
    negative_prompt: Text = ""
    styles: list[str] = Field(default_factory=list)
    seed: integer(-1, SEED_MAX) = -1  # type: ignore[valid-type]
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's older name of sampler_name, and its default
    scheduler: str | None = None
    batch_size: integer(1, MAX_BATCH_SIZE) = 1  # type: ignore[valid-type]
    n_iter: integer(1, MAX_N_ITER) = 1  # type: ignore[valid-type]
    steps: integer(1, MAX_STEPS) = 50  # type: ignore[valid-type]
    cfg_scale: real(1.0, 30.0) = 7.0  # type: ignore[valid-type]
    width: integer(MIN_SIZE, MAX_SIZE, multiple_of=8) = 512  # type: ignore[valid-type]
    height: integer(MIN_SIZE, MAX_SIZE, multiple_of=8) = 512  # type: ignore[valid-type]
    restore_faces: bool = False
    tiling: bool = False
    disable_extra_networks: bool = False
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # False: the overridden checkpoint stays the caller's (its options), as A1111 keeps it.
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    """Body of ``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    denoising_strength: real(0.0, 1.0) = 0.75  # type: ignore[valid-type]
    hr_scale: real(1.0, 4.0) = 2.0  # type: ignore[valid-type]
    hr_upscaler: str | None = None
    hr_second_pass_steps: integer(0, MAX_STEPS) = 0  # type: ignore[valid-type]
    hr_resize_x: integer(0, 2 * MAX_SIZE) = 0  # type: ignore[valid-type]
    hr_resize_y: integer(0, 2 * MAX_SIZE) = 0  # type: ignore[valid-type]
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    """Body of ``POST /sdapi/v1/img2img`` (inpainting when ``mask`` is given)."""

    init_images: list[str] = Field(default_factory=list)
    resize_mode: integer(0, 3) = 0  # type: ignore[valid-type]
    denoising_strength: real(0.0, 1.0) = 0.75  # type: ignore[valid-type]
    mask: str | None = None
    mask_blur: integer(0, 64) | None = None  # type: ignore[valid-type]
    mask_blur_x: integer(0, 64) = 4  # type: ignore[valid-type]
    mask_blur_y: integer(0, 64) = 4  # type: ignore[valid-type]
    inpainting_fill: integer(0, 3) = 0  # type: ignore[valid-type]
    inpaint_full_res: bool = True
    inpaint_full_res_padding: integer(0, MAX_PADDING) = 0  # type: ignore[valid-type]
    inpainting_mask_invert: integer(0, 1) = 0  # type: ignore[valid-type]
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ExtrasSingleImageRequest(A1111Body):
    """Body of ``POST /sdapi/v1/extra-single-image``: DAN's upscale."""

    image: str = ""
    resize_mode: integer(0, 1) = 0  # type: ignore[valid-type]
    show_extras_results: bool = True
    gfpgan_visibility: real(0.0, 1.0) = 0.0  # type: ignore[valid-type]
    codeformer_visibility: real(0.0, 1.0) = 0.0  # type: ignore[valid-type]
    codeformer_weight: real(0.0, 1.0) = 0.0  # type: ignore[valid-type]
    upscaling_resize: real(1.0, 4.0) = 2.0  # type: ignore[valid-type]
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: real(0.0, 1.0) = 0.0  # type: ignore[valid-type]
    upscale_first: bool = False


class InterrogateRequest(A1111Body):
    """Body of ``POST /sdapi/v1/interrogate``."""

    image: str = ""
    model: str = "clip"


class PngInfoRequest(A1111Body):
    """Body of ``POST /sdapi/v1/png-info``."""

    image: str = ""


class DetectRequest(A1111Body):
    """Body of ``POST /controlnet/detect`` (``controlnet_images`` is the older name, which
    webuiapi sends, of ``controlnet_input_images``)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1

    @property
    def images(self) -> list[str]:
        return self.controlnet_input_images or self.controlnet_images


class ControlNetUnitArgs(A1111Body):
    """One unit of ``alwayson_scripts.ControlNet.args``, as the ControlNet extension (and
    webuiapi's ControlNetUnit) writes it; ``input_image`` is the older name of ``image``,
    which may also be ``{"image": ..., "mask": ...}``."""

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: real(0.0, 2.0) = 1.0  # type: ignore[valid-type]
    image: str | dict[str, Any] | None = None
    input_image: str | None = None
    mask: str | None = None
    resize_mode: str | int = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: real(0.0, 1.0) = 0.0  # type: ignore[valid-type]
    guidance_end: real(0.0, 1.0) = 1.0  # type: ignore[valid-type]
    control_mode: str | int = "Balanced"
    pixel_perfect: bool = False
    hr_option: str = "Both"

    @property
    def image_data(self) -> str | None:
        """The control image's base64 (a data URL is fine), or None when the unit has none."""
        image = self.image if self.image is not None else self.input_image
        if isinstance(image, dict):
            image = image.get("image")
        return image if isinstance(image, str) and image else None

    @property
    def mask_data(self) -> str | None:
        mask = self.image.get("mask") if isinstance(self.image, dict) else self.mask
        return mask if isinstance(mask, str) and mask else None
