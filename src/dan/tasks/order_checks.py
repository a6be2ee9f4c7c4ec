"""The checks an order must pass before it becomes a request, each refusing with a 400 that
names the field and what is valid (see dan.tasks.orders): sizes and batches, seeds, masks, and
whether the files it names fit its checkpoint's family."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from PIL.Image import Image

from dan.domain import (
    MAX_BATCH_PIXELS,
    MAX_BATCH_SIZE,
    MAX_CLIP_SKIP,
    MAX_IMAGES,
    MAX_N_ITER,
    SEED_MAX,
    InstalledModel,
    MaskMode,
    family_of,
)
from dan.errors import InvalidArgument
from dan.imaging import decode_image, regenerated_area
from dan.models.families import LORA_VARIANTS, tensor_names, unsupported_lora_variant

if TYPE_CHECKING:
    from dan.tasks.orders import GenerationOrder


def mask_image(data: str, init: Image, mode: MaskMode) -> Image:
    mask = decode_image(data, "inpaint.mask")
    if mask.size != init.size:
        raise InvalidArgument(
            f"Invalid inpaint.mask: must be the same size as init_image "
            f"({init.width}x{init.height}), got {mask.width}x{mask.height}"
        )
    area = regenerated_area(mask)
    if mode == MaskMode.REGENERATE_MASKED and area.getbbox() is None:
        raise InvalidArgument(
            "Invalid inpaint.mask: it has no white (or opaque) pixel, so with mask_mode 0 "
            "(regenerate the masked part) nothing would change; paint the part to redraw white"
        )
    if mode == MaskMode.REGENERATE_UNMASKED and area.getextrema() == (255, 255):
        raise InvalidArgument(
            "Invalid inpaint.mask: it is white (or opaque) everywhere, so with mask_mode 1 "
            "(regenerate the unmasked part) nothing would change"
        )
    # Keep the alpha channel if there is one: the engine reads an alpha mask from it.
    return mask if mask.mode in ("L", "LA", "RGBA", "RGB") else mask.convert("RGBA")


Lora = tuple[InstalledModel, float]  # a LoRA file and its weight


def check_families(checkpoint: InstalledModel, loras: tuple[Lora, ...]) -> None:
    """Refuse LoRAs made for another family than the checkpoint's, and LoRA variants the
    engine cannot apply."""
    family = family_of(checkpoint)
    for lora, _ in loras:
        other = family_of(lora)
        if other != family:
            raise InvalidArgument(
                f"Invalid loras: {lora.name} is an {other.value} LoRA and {checkpoint.name} an "
                f"{family.value} checkpoint; a LoRA only works with checkpoints of its family"
            )
        check_lora_variant(lora)


def check_controlnet_family(
    controlnet: InstalledModel, checkpoint: InstalledModel, wanted: str
) -> None:
    """Refuse a ControlNet file of another family than the checkpoint's, naming both files."""
    ours, theirs = family_of(controlnet), family_of(checkpoint)
    if ours != theirs:
        raise InvalidArgument(
            f"Invalid control_net.0.model: {controlnet.path.name} is an {ours.value} ControlNet "
            f"and {checkpoint.path.name} an {theirs.value} checkpoint; a ControlNet only works "
            f"with checkpoints of its family: install the {wanted} ControlNet with "
            f"`dan models pull {pull_name(wanted)}`"
        )


def pull_name(wanted: str) -> str:
    """The catalog name ``dan models pull`` takes for a ControlNet: its alias, but SD 1.x's
    files were always pulled by their names (control_sd15_canny)."""
    return wanted if wanted.startswith("sdxl_") else f"control_{wanted}"


def check_lora_variant(lora: InstalledModel) -> None:
    """Refuse a LoRA file with layers of a variant the engine does not apply (read from its
    safetensors header; a file that cannot be read here is left to the engine to judge)."""
    try:
        keys = tensor_names(lora.path) if lora.path.suffix.lower() == ".safetensors" else []
    except OSError:
        return
    variant = unsupported_lora_variant(keys)
    if variant is not None:
        raise InvalidArgument(
            f"Invalid loras: {lora.name} ({lora.path.name}) holds {variant} layers, which DAN "
            f"does not apply; supported: {', '.join(LORA_VARIANTS)} (LoCon included)"
        )


def check_batch(order: GenerationOrder, width: int, height: int) -> None:
    """Refuse a batch out of range, too many images, or too many pixels in one batch of
    ``width`` x ``height`` images."""
    size, count = order.batch_size, order.n_iter
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise InvalidArgument(
            f"Invalid batch_size: must be an integer between 1 and {MAX_BATCH_SIZE}, got {size}"
        )
    if not 1 <= count <= MAX_N_ITER:
        raise InvalidArgument(
            f"Invalid n_iter: must be an integer between 1 and {MAX_N_ITER}, got {count}"
        )
    if size * count > MAX_IMAGES:
        raise InvalidArgument(
            f"Invalid batch_size x n_iter: at most {MAX_IMAGES} images per request, got "
            f"{size} x {count} = {size * count}"
        )
    check_batch_pixels(size, width, height)


def check_seeds(order: GenerationOrder) -> None:
    """Refuse a seed whose images' seeds (``seed + i``) pass SEED_MAX: each must be one a
    client can send back."""
    images = order.batch_size * order.n_iter
    last = order.seed + images - 1
    if order.seed >= 0 and last > SEED_MAX:
        raise InvalidArgument(
            f"Invalid seed: the {images} images would have the seeds {order.seed} to {last}, "
            f"past the largest seed {SEED_MAX}; use a seed of at most {SEED_MAX + 1 - images}, "
            "or -1"
        )


def check_batch_pixels(batch_size: int, width: int, height: int, what: str = "") -> None:
    """Refuse more than one image in a batch of more than MAX_BATCH_PIXELS pixels (``what``
    names the pass when it is not the first)."""
    # A batch goes through the UNet and the VAE at once: its memory grows with its pixels. A
    # batch of one is bounded by the size limits; more images may hold as many pixels as the
    # largest single image (2048x2048), e.g. 4 of 1024x1024 or 8 of 704x704.
    pixels = batch_size * width * height
    if batch_size > 1 and pixels > MAX_BATCH_PIXELS:
        raise InvalidArgument(
            f"Invalid batch_size: {batch_size} images of {width}x{height}{what} are {pixels} "
            f"pixels in one batch, and a batch holds at most {MAX_BATCH_PIXELS} (one 2048x2048 "
            "image); lower batch_size (n_iter runs batches one after another) or the size"
        )


def check_denoising_steps(steps: int, strength: float) -> None:
    # img2img runs int(steps * strength) denoising steps; 0 would silently do nothing.
    if strength > 0 and int(steps * strength) < 1:
        raise InvalidArgument(
            f"Invalid denoising_strength: {strength:g} x {steps} steps runs no denoising step; "
            f"use at least {1 / steps:.3g}, more steps, or 0 to keep the image"
        )


def uses_word(text: str, word: str) -> bool:
    """Whether ``word`` stands in ``text`` as a word of its own (any case): not inside a
    longer word, whatever punctuation or brackets surround it."""
    pattern = rf"(?<![\w-]){re.escape(word)}(?![\w-])"
    return re.search(pattern, text, re.IGNORECASE) is not None


def check_clip_skip(clip_skip: int) -> None:
    if not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise InvalidArgument(
            f"Invalid clip_skip: must be an integer between 1 and {MAX_CLIP_SKIP}, got {clip_skip}"
        )


def is_none(name: str) -> bool:
    """A1111 clients send "None" (or nothing) for "no second upscaler"."""
    return name.strip().lower() in ("", "none")
