"""A1111 request bodies -> DAN's typed orders (dan.tasks.orders).

Everything DAN can run is mapped onto the same orders DAN's own API submits; everything it
cannot is refused with InvalidArgument naming the A1111 field and what is valid, rather than
ignored. What DAN's RequestBuilder refuses later (a model that is not installed, a bad image)
names DAN's fields; :func:`a1111_field_names` renames them.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from dan.accounts.options import ChosenOptions
from dan.api.a1111.controlnet import CONTROLNET_ARGS, TITLE, control_unit
from dan.api.a1111.errors import invalid
from dan.api.a1111.schemas import (
    ExtrasSingleImageRequest,
    GenerationRequest,
    Img2ImgRequest,
    InterrogateRequest,
    Txt2ImgRequest,
)
from dan.domain import MAX_CLIP_SKIP
from dan.errors import DanError
from dan.samplers import AUTOMATIC, SAMPLER_INFO, UNIFORM, choose
from dan.tasks.orders import (
    ControlNetOrder,
    GenerationOrder,
    HiresOrder,
    Img2ImgOrder,
    InpaintOrder,
    InterrogateOrder,
    Txt2ImgOrder,
    UpscaleOrder,
)

MAX_HIRES_SCALE = 2.0
INPAINT_FILLS = (0, 1)  # inpainting_fill: fill (the colours around the mask), original
SAME = ("", "use same checkpoint", "use same sampler", "use same scheduler")
# The options DAN acts on, in override_settings and POST /options.
CHECKPOINT, CLIP_SKIP, VAE = "sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"


# -- what every generation shares -----------------------------------------------------------


def checkpoint_reference(title: str) -> str:
    """What DAN resolves for an A1111 checkpoint title (``name.safetensors [hash10]``), model
    name, file name or hash: the sha256 prefix of a title when it has 10+ hex digits (A1111's
    short hash), else the name."""
    match = TITLE.match(title.strip())
    if match is None:
        return title.strip()
    digest = match["hash"]
    return digest if len(digest) >= 10 else match["name"]


def sampler(name: str, scheduler: str | None, field: str = "sampler_name") -> tuple[str, str]:
    """DAN's sampler and schedule type for A1111's sampler ``name`` and ``scheduler``, read as
    A1111 1.9+ reads them: Automatic (or none) is the sampler's default schedule (Karras for
    DPM++ 2M, Exponential for DPM++ 2M SDE, ...), "Uniform" is DAN's Automatic, and a name may
    carry its schedule ("DPM++ SDE Karras")."""
    uniform = isinstance(scheduler, str) and scheduler.strip().casefold() == UNIFORM.casefold()
    chosen, schedule = choose(name, AUTOMATIC if uniform else scheduler, field=field)
    if schedule == AUTOMATIC and not uniform:
        schedule = SAMPLER_INFO[chosen].a1111_default
    return chosen, schedule


def check_override_settings(settings: dict[str, Any]) -> None:
    clip_skip = settings.get(CLIP_SKIP, 1)
    if clip_skip is not None and (
        isinstance(clip_skip, bool)
        or not isinstance(clip_skip, int | float)
        or not 1 <= clip_skip <= MAX_CLIP_SKIP  # before int(): NaN and Infinity fail here
        or clip_skip != int(clip_skip)
    ):
        raise invalid(
            "override_settings.CLIP_stop_at_last_layers",
            f"must be an integer between 1 and {MAX_CLIP_SKIP}; got {clip_skip!r}",
        )
    vae = settings.get(VAE)
    if vae is not None and not isinstance(vae, str):
        raise invalid(
            "override_settings.sd_vae",
            f"must be a VAE file's name (see /sdapi/v1/sd-vae), Automatic or None; got {vae!r}",
        )
    checkpoint = settings.get(CHECKPOINT)
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise invalid(
            "override_settings.sd_model_checkpoint",
            f"must be a checkpoint's title, name or hash (see /sdapi/v1/sd-models); got "
            f"{checkpoint!r}",
        )


def checkpoint_of(body: GenerationRequest, chosen: str | None) -> str | None:
    """The checkpoint a request names (``override_settings.sd_model_checkpoint``), else the
    caller's choice from ``POST /options`` (``chosen``, a sha256), else None (the default)."""
    title = body.override_settings.get(CHECKPOINT)
    return checkpoint_reference(title) if title else chosen


def clip_skip_of(body: GenerationRequest, chosen: int | None) -> int:
    """The request's ``override_settings`` clip skip, else the caller's choice, else 1."""
    clip_skip = body.override_settings.get(CLIP_SKIP)
    return int(clip_skip if clip_skip is not None else chosen or 1)


def vae_of(body: GenerationRequest, chosen: str | None) -> str | None:
    """The request's ``override_settings`` VAE, else the caller's choice (a sha256, Automatic
    or None), else None: the checkpoint's own."""
    vae = body.override_settings.get(VAE)
    return vae if vae is not None else chosen


def refuse_unsupported(body: GenerationRequest) -> None:
    """InvalidArgument for the first A1111 feature the request turns on that DAN lacks."""
    refusals = (
        (body.restore_faces, "restore_faces", "DAN has no face restorers"),
        (body.tiling, "tiling", "DAN cannot make tileable images"),
        (body.subseed_strength != 0, "subseed_strength", "DAN has no variation seeds; use 0"),
        (
            body.seed_resize_from_w > 0 or body.seed_resize_from_h > 0,
            "seed_resize_from_w",
            "DAN cannot resize seeds; use -1",
        ),
        (bool(body.script_name), "script_name", "DAN runs no scripts; use none"),
        (bool(body.refiner_checkpoint), "refiner_checkpoint", "DAN has no refiner pass"),
        (bool(body.infotext), "infotext", "send the parameters as fields instead"),
        (
            body.disable_extra_networks,
            "disable_extra_networks",
            "DAN always applies <lora:...> tags of the prompt",
        ),
    )
    for refused, field, why in refusals:
        if refused:
            raise invalid(field, f"not supported: {why}")


def generation_order(
    body: GenerationRequest, chosen: ChosenOptions, control: ControlNetOrder | None
) -> GenerationOrder:
    """The generation ``body`` asks for; what its ``override_settings`` leave out comes from
    ``chosen``, the caller's options (``POST /options``)."""
    refuse_unsupported(body)
    check_override_settings(body.override_settings)
    field = "sampler_name" if body.sampler_name else "sampler_index"
    name, schedule = sampler(body.sampler_name or body.sampler_index, body.scheduler, field)
    return GenerationOrder(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=body.seed,
        sampler_name=name,
        scheduler=schedule,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        width=body.width,
        height=body.height,
        model=checkpoint_of(body, chosen.checkpoint),
        control_net=control,
        batch_size=body.batch_size,
        n_iter=body.n_iter,
        clip_skip=clip_skip_of(body, chosen.clip_skip),
        vae=vae_of(body, chosen.vae),
    )


# -- txt2img --------------------------------------------------------------------------------


def txt2img_order(body: Txt2ImgRequest, chosen: ChosenOptions) -> Txt2ImgOrder:
    """The order of an A1111 txt2img body; ``chosen`` are the caller's options from
    ``POST /options``, used where ``override_settings`` names none."""
    control = control_unit(body.alwayson_scripts, None)
    generation = generation_order(body, chosen, control)
    return Txt2ImgOrder(generation, hires_order(body) if body.enable_hr else None)


def hires_order(body: Txt2ImgRequest) -> HiresOrder:
    scale = hires_scale(body)
    if not 1.0 < scale <= MAX_HIRES_SCALE:
        raise invalid(
            "hr_scale",
            f"DAN's hires fix enlarges by more than 1 and at most {MAX_HIRES_SCALE:g}, "
            f"got {scale:g}",
        )
    check_same_hires_pass(body)
    upscaler = body.hr_upscaler or "Latent"
    return HiresOrder(scale, body.denoising_strength, upscaler, body.hr_second_pass_steps)


def hires_scale(body: Txt2ImgRequest) -> float:
    """``hr_scale``, or the scale ``hr_resize_x``/``hr_resize_y`` ask for (A1111 resizes to
    them when set; DAN keeps the aspect ratio, so both must scale alike)."""
    scales = {
        field: target / side
        for field, target, side in (
            ("hr_resize_x", body.hr_resize_x, body.width),
            ("hr_resize_y", body.hr_resize_y, body.height),
        )
        if target
    }
    if not scales:
        return float(body.hr_scale)
    if len(set(round(s, 2) for s in scales.values())) > 1:
        raise invalid(
            "hr_resize_x",
            f"{body.hr_resize_x}x{body.hr_resize_y} changes the aspect ratio of "
            f"{body.width}x{body.height}; DAN keeps it: use hr_scale",
        )
    return float(next(iter(scales.values())))


def check_same_hires_pass(body: Txt2ImgRequest) -> None:
    """The second pass runs with the first pass's checkpoint, sampler and prompts."""
    different = (
        ("hr_checkpoint_name", body.hr_checkpoint_name, None, "checkpoint"),
        ("hr_sampler_name", body.hr_sampler_name, body.sampler_name, "sampler"),
        ("hr_scheduler", body.hr_scheduler, body.scheduler, "scheduler"),
        ("hr_prompt", body.hr_prompt, body.prompt, "prompt"),
        ("hr_negative_prompt", body.hr_negative_prompt, body.negative_prompt, "negative prompt"),
    )
    for field, value, same, what in different:
        if value is not None and value.strip().casefold() not in SAME and value != same:
            raise invalid(field, f"DAN's second pass uses the first pass's {what}; leave it empty")


# -- img2img --------------------------------------------------------------------------------


def img2img_order(body: Img2ImgRequest, chosen: ChosenOptions) -> Img2ImgOrder:
    """The order of an A1111 img2img (or inpaint) body; see :func:`txt2img_order`."""
    init_image = only_init_image(body)
    control = control_unit(body.alwayson_scripts, init_image)
    if body.resize_mode == 3:
        raise invalid(
            "resize_mode", "3 (just resize, latent upscale) is not supported; use 0, 1 or 2"
        )
    return Img2ImgOrder(
        generation=generation_order(body, chosen, control),
        init_image=init_image,
        resize_mode=body.resize_mode,
        denoising_strength=body.denoising_strength,
        inpaint=inpaint_order(body) if body.mask else None,
    )


def only_init_image(body: Img2ImgRequest) -> str:
    if not body.init_images:
        raise invalid("init_images", "send one base64 image to start from")
    if len(body.init_images) > 1:
        raise invalid(
            "init_images",
            f"DAN starts from one image per request, got {len(body.init_images)}; use "
            "batch_size for several results",
        )
    return body.init_images[0]


def inpaint_order(body: Img2ImgRequest) -> InpaintOrder:
    assert body.mask is not None
    if body.inpainting_fill not in INPAINT_FILLS:
        raise invalid(
            "inpainting_fill",
            "DAN starts the masked part from the colours around it (0, fill) or from the "
            "original picture (1, original); 2 (latent noise) and 3 (latent nothing) are not "
            f"supported, got {body.inpainting_fill}",
        )
    if body.initial_noise_multiplier not in (None, 1.0):
        raise invalid("initial_noise_multiplier", "DAN does not scale the noise; use 1")
    if body.latent_mask:
        raise invalid("latent_mask", "not supported; the mask is used for the latents too")
    return InpaintOrder(
        mask=body.mask,
        mask_blur=mask_blur(body),
        mask_mode=body.inpainting_mask_invert,
        inpaint_area=1 if body.inpaint_full_res else 0,
        padding=body.inpaint_full_res_padding,
        fill=body.inpainting_fill,
    )


def mask_blur(body: Img2ImgRequest) -> int:
    if body.mask_blur is not None:
        return int(body.mask_blur)
    if body.mask_blur_x != body.mask_blur_y:
        raise invalid(
            "mask_blur_x",
            f"DAN blurs the mask alike both ways; mask_blur_x ({body.mask_blur_x}) and "
            f"mask_blur_y ({body.mask_blur_y}) differ: send mask_blur",
        )
    return int(body.mask_blur_x)


# -- upscale, interrogate, detect -----------------------------------------------------------


def upscale_order(body: ExtrasSingleImageRequest) -> UpscaleOrder:
    if body.gfpgan_visibility or body.codeformer_visibility:
        raise invalid("gfpgan_visibility", "DAN has no face restorers; use 0")
    if body.resize_mode != 0:
        raise invalid("resize_mode", "DAN upscales by a factor: use 0 and upscaling_resize")
    if body.upscaler_1.strip().casefold() in ("", "none"):
        raise invalid("upscaler_1", "name an upscaler of /sdapi/v1/upscalers")
    return UpscaleOrder(
        image=body.image,
        rate=body.upscaling_resize,
        upscaler=body.upscaler_1,
        upscaler2=body.upscaler_2,
        upscaler2_factor=body.extras_upscaler_2_visibility,
    )


def interrogate_order(body: InterrogateRequest) -> InterrogateOrder:
    return InterrogateOrder(body.image, body.model.strip().casefold())


# -- DAN's field names in A1111's words ------------------------------------------------------

DAN_FIELDS = {
    "model": "override_settings.sd_model_checkpoint",
    "vae": "override_settings.sd_vae",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "init_image": "init_images.0",
    "inpaint.mask": "mask",
    "upscale.upscaler": "hr_upscaler",
    "upscale.steps": "hr_second_pass_steps",
    "upscaler": "upscaler_1",
    "upscaler2": "upscaler_2",
    "upscalingRate": "upscaling_resize",
}
INVALID_FIELD = re.compile(r"^Invalid (?P<field>[\w.]+):")


def a1111_field_names(exc: DanError, overridden: Collection[str] | None = None) -> DanError:
    """``exc`` with DAN's field name in its message replaced by A1111's; ``exc`` itself when
    there is nothing to rename. ``overridden``: the request's ``override_settings`` keys
    (None: it has none to name); a setting it did not override came from the caller's
    options (``POST /options``), and is named as that option."""
    match = INVALID_FIELD.match(exc.message)
    if match is None:
        return exc
    field = match["field"]
    renamed = DAN_FIELDS.get(field) or re.sub(r"^control_net\.0", CONTROLNET_ARGS, field)
    if renamed == field:
        return exc
    rest = exc.message[match.end() :]
    option = renamed.removeprefix("override_settings.")
    if overridden is not None and option != renamed and option not in overridden:
        renamed, rest = option, f"{rest} (the option chosen with POST /sdapi/v1/options)"
    return type(exc)(f"Invalid {renamed}:{rest}", **exc.data)
