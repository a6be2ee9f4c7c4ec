"""PNG results with AUTOMATIC1111's ``parameters`` text chunk (no torch here)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from math import isqrt

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from dan import __version__
from dan.domain import GenerationRequest
from dan.errors import InvalidArgument
from dan.samplers import a1111_schedule


def infotext(
    request: GenerationRequest,
    seed: int,
    extra: Mapping[str, object] = {},
    *,
    batch_pos: int = 0,
) -> str:
    """The generation parameters in A1111's infotext format, which its clients parse back.

    ``seed`` is the image's own (``request.seed + i``); an image of a batch of several also
    gets A1111's ``Batch size`` and ``Batch pos`` (its place in its batch)."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    sampler, schedule = request.sampling
    fields: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": sampler,
        # A1111 1.9+'s words for the schedule that ran (see dan.samplers.a1111_schedule).
        "Schedule type": a1111_schedule(sampler, schedule),
        "CFG scale": f"{request.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": request.model.short_hash,
        "Model": request.model.name,
    }
    fields.update(_option_fields(request))
    if request.batch_size > 1:
        fields["Batch size"] = request.batch_size
        fields["Batch pos"] = batch_pos
    fields.update(extra)
    if request.hires is not None:
        fields["Denoising strength"] = f"{request.hires.denoising_strength:g}"
        fields["Hires upscale"] = f"{request.hires.scale:g}"
        fields["Hires upscaler"] = request.hires.upscaler.name
        if request.hires.steps:
            fields["Hires steps"] = request.hires.steps
    if request.loras:
        hashes = ", ".join(f"{lora.model.name}: {lora.model.short_hash}" for lora in request.loras)
        fields["Lora hashes"] = f'"{hashes}"'
        # DAN's own addition, so that reusing the settings restores the weights too.
        weights = ", ".join(f"{lora.model.name}: {lora.weight:g}" for lora in request.loras)
        fields["Lora weights"] = f'"{weights}"'
    fields["Version"] = f"DAN {__version__}"
    return "\n".join([*lines, ", ".join(f"{key}: {value}" for key, value in fields.items())])


def _option_fields(request: GenerationRequest) -> dict[str, object]:
    """A1111's fields for the VAE, clip skip and embeddings, where they are not the defaults."""
    fields: dict[str, object] = {}
    if request.vae is not None:
        fields["VAE hash"] = request.vae.short_hash
        fields["VAE"] = f"{request.vae.name}.safetensors"  # A1111 names the file
    if request.clip_skip > 1:
        fields["Clip skip"] = request.clip_skip
    if request.embeddings:
        # A1111 gives embeddings 12 hex digits (its LoRA and VAE hashes have 10).
        hashes = ", ".join(f"{ref.name}: {ref.sha256[:12]}" for ref in request.embeddings)
        fields["TI hashes"] = f'"{hashes}"'
    return fields


def encode_png(image: Image.Image, parameters: str) -> bytes:
    """PNG bytes of ``image`` carrying ``parameters`` as a tEXt/iTXt chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    # Level 3 encodes a 512x512 result about 2.5x faster than PIL's default 6 for ~20 % more
    # bytes; encoding sits between two generations on the worker, so speed wins.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=3)
    return buffer.getvalue()


def read_parameters(png: bytes) -> str | None:
    """The ``parameters`` text of a PNG, or None."""
    with Image.open(io.BytesIO(png)) as image:
        value = image.info.get("parameters")
    return value if isinstance(value, str) else None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULT_MODES = frozenset({"RGB", "RGBA", "L"})

# Input images: base64 from the client, checked before anything else touches them.
INPUT_FORMATS = {"PNG", "JPEG", "WEBP"}
MAX_INPUT_PIXELS = 4096 * 4096


def decode_image(data: object, field: str, *, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """The image in ``data`` (base64, optionally a ``data:image/...;base64,`` URL), loaded.

    Raises InvalidArgument naming ``field`` for anything that is not a PNG, JPEG or WebP image
    of at most ``max_pixels`` pixels: wrong type, broken base64, another file type, a truncated
    file, or a huge (or decompression-bomb) image, which is refused from its header, before
    its pixels are decoded.
    """
    raw = decode_base64(data, field)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(f"Invalid {field}: the image is far too large ({exc})") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidArgument(f"Invalid {field}: not a PNG, JPEG or WebP image") from exc
    if image.format not in INPUT_FORMATS:
        raise InvalidArgument(
            f"Invalid {field}: {image.format} images are not accepted; send PNG, JPEG or WebP"
        )
    if image.width * image.height > max_pixels:
        raise InvalidArgument(
            f"Invalid {field}: the image is {image.width}x{image.height}; at most "
            f"{max_pixels} pixels (e.g. {isqrt(max_pixels)}x{isqrt(max_pixels)}) are accepted"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"Invalid {field}: the image data is damaged or truncated") from exc
    return image


def decode_base64(data: object, field: str) -> bytes:
    """The bytes of base64 ``data`` (a ``data:...;base64,`` URL is fine); InvalidArgument
    naming ``field`` otherwise."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidArgument(f"Invalid {field}: must be a base64-encoded PNG, JPEG or WebP image")
    text = data.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidArgument(
                f"Invalid {field}: a data URL must be base64 (data:image/png;base64,...)"
            )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"Invalid {field}: not valid base64 ({exc})") from exc


def encode_input_png(image: Image.Image) -> bytes:
    """A lossless copy of an input image, as it is kept for the worker."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def check_result_png(data: bytes, width: int, height: int, max_bytes: int) -> None:
    """Raise InvalidArgument unless ``data`` is a whole, undamaged PNG of exactly ``width`` x
    ``height`` pixels in at most ``max_bytes``. The size is read from the header before any
    pixel is decoded, so a decompression bomb costs nothing; then every pixel and checksum
    is decoded once (bounded by the expected size)."""
    if len(data) > max_bytes:
        raise InvalidArgument(f"the PNG is {len(data)} bytes; at most {max_bytes} are accepted")
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidArgument("not a PNG file")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != (width, height):
                raise InvalidArgument(
                    f"the image is {image.width}x{image.height}; the task makes {width}x{height}"
                )
            if image.mode not in RESULT_MODES:
                raise InvalidArgument(f"the image is in mode {image.mode}, not RGB")
            image.load()
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, UnidentifiedImageError) as exc:
        raise InvalidArgument(f"not a usable PNG ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidArgument(f"the PNG is damaged or truncated ({exc})") from exc


PREVIEW_SIDE = 256  # the largest side of a step preview, in pixels
PREVIEW_BYTES = 64 * 1024


def encode_preview(image: Image.Image) -> bytes:
    """A step preview as a small PNG (at most PREVIEW_SIDE on its longest side)."""
    small = image.convert("RGB")
    small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def check_preview(data: bytes) -> None:
    """Raise InvalidArgument unless ``data`` is a PNG of at most PREVIEW_SIDE x PREVIEW_SIDE
    pixels in at most PREVIEW_BYTES (what a node may show a task's owner while it runs)."""
    if len(data) > PREVIEW_BYTES or not data.startswith(PNG_SIGNATURE):
        raise InvalidArgument(f"a preview is a PNG of at most {PREVIEW_BYTES} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if max(image.size) > PREVIEW_SIDE:
                raise InvalidArgument(f"a preview is at most {PREVIEW_SIDE} pixels on a side")
            image.load()
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidArgument(f"the preview is not a usable PNG ({exc})") from exc


THUMBNAIL = (32, 32)


def picture_distance(first: bytes, second: bytes) -> float:
    """How different two pictures are, 0 (the same) to 1: the root-mean-square difference of
    their 32x32 colour thumbnails (box-filtered, values 0-1).

    Two runs of one task on different GPUs, dtypes or thread counts differ in fine detail,
    which the thumbnail averages away; another seed or another prompt changes the
    composition, which it keeps. Images of different sizes are as different as can be (1)."""
    with Image.open(io.BytesIO(first)) as a, Image.open(io.BytesIO(second)) as b:
        if a.size != b.size:
            return 1.0
        small_a = np.asarray(a.convert("RGB").resize(THUMBNAIL, Image.Resampling.BOX))
        small_b = np.asarray(b.convert("RGB").resize(THUMBNAIL, Image.Resampling.BOX))
    difference = (small_a.astype(np.float64) - small_b.astype(np.float64)) / 255.0
    return float(np.sqrt(np.mean(difference**2)))


def load_png(data: bytes) -> Image.Image:
    """An image stored by :func:`encode_input_png`, loaded."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- inpainting masks ------------------------------------------------------------------------

# A1111's create_binary_mask: a pixel above 128 is "regenerate". Thresholding is what makes a
# JPEG-compressed mask (ringing around every edge) as clean as the PNG it was made from.
MASK_THRESHOLD = 128


def mask_values(mask_image: Image.Image) -> Image.Image:
    """The raw mask as ``"L"`` (not yet thresholded), by A1111's rule.

    If the image has an alpha channel that is not opaque everywhere, the alpha is the mask
    (opaque = regenerate), so a brush stroke painted on a transparent layer works. Otherwise the
    luminance is (white = regenerate): grayscale, RGB and fully opaque RGBA masks alike.
    """
    if mask_image.mode in ("RGBA", "LA", "PA") or "transparency" in mask_image.info:
        alpha = mask_image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    if mask_image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale PNGs: convert("L") would clip every value above 255 to white.
        wide = np.asarray(mask_image, dtype=np.uint32)
        return Image.fromarray((wide // 257).clip(0, 255).astype(np.uint8))
    return mask_image.convert("L")


def regenerated_area(mask_image: Image.Image) -> Image.Image:
    """The thresholded mask: 255 where a pixel is regenerated (with mask_mode 0), else 0."""
    return mask_values(mask_image).point([255 if v > MASK_THRESHOLD else 0 for v in range(256)])
