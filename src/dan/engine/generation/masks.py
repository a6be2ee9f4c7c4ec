"""Image and mask geometry of img2img and inpainting, as AUTOMATIC1111 does it (PIL, numpy, and
OpenCV for the "fill" masked content).

Conventions used throughout:

- A *mask* is an ``"L"`` image: 255 = regenerate, 0 = keep, values in between only after blur.
- A *box* is ``(left, top, right, bottom)`` in pixels, right and bottom exclusive (PIL's crop box).
- Resampling is Lanczos, as in A1111; an image already at the requested size is never resampled,
  so its pixels pass through unchanged.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageFilter

from dan.domain import MaskMode, ResizeMode
from dan.errors import EngineError
from dan.imaging import MASK_THRESHOLD, mask_values

Box = tuple[int, int, int, int]

MAX_MASK_BLUR = 64
# What a transparent init image is flattened onto: A1111's default img2img background colour.
BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as ``"RGB"``; transparent pixels are composited onto white (A1111's flatten)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --- fitting to the requested size ----------------------------------------------------------


def fit_image(image: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """``image`` ("RGB" or "L") made exactly ``width`` x ``height`` the way ``mode`` says.

    - JUST_RESIZE: stretched, the aspect ratio is not kept.
    - CROP_AND_RESIZE: scaled to cover the target, then the centre is cropped out.
    - RESIZE_AND_FILL: scaled to fit inside the target, centred; the empty bands repeat the
      image's outermost row (top/bottom) or column (left/right).

    An image that already has the requested size is returned as a copy, pixel for pixel.
    """
    if image.size == (width, height):
        return image.copy()
    if mode == ResizeMode.JUST_RESIZE:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if mode == ResizeMode.CROP_AND_RESIZE:
        return _crop_and_resize(image, width, height)
    return _resize_and_fill(image, width, height)


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    # Sizes and offsets use A1111's integer arithmetic, so crops land on the same pixels.
    if width / height > image.width / image.height:
        size = (width, max(1, image.height * width // image.width))
    else:
        size = (max(1, image.width * height // image.height), height)
    left = size[0] // 2 - width // 2
    top = size[1] // 2 - height // 2
    resized = image.resize(size, Image.Resampling.LANCZOS)
    return resized.crop((left, top, left + width, top + height))


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    if width / height < image.width / image.height:
        size = (width, max(1, image.height * width // image.width))
    else:
        size = (max(1, image.width * height // image.height), height)
    left = width // 2 - size[0] // 2
    top = height // 2 - size[1] // 2
    pixels = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    # The far band takes whatever is left, so an odd difference leaves no unfilled row.
    pad = [(top, height - top - size[1]), (left, width - left - size[0])]
    pad += [(0, 0)] * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


# --- masks ----------------------------------------------------------------------------------


def prepare_mask(
    mask_image: Image.Image,
    width: int,
    height: int,
    resize_mode: ResizeMode,
    blur: int,
    mode: MaskMode,
) -> Image.Image:
    """The ``"L"`` mask that decides what is regenerated, at ``width`` x ``height``.

    Steps: :func:`mask_values`; fitted with ``resize_mode`` (the init image's mode, so mask and
    image stay aligned); thresholded (> 128 is 255, else 0); inverted for REGENERATE_UNMASKED;
    Gaussian blur of radius ``blur`` (PIL's radius is the standard deviation, A1111's sigma).
    Blurring last, at the generation size, keeps the blur width in output pixels.

    Raises EngineError when ``blur`` is outside 0-64 or when no pixel is left to regenerate.
    """
    if not 0 <= blur <= MAX_MASK_BLUR:
        raise EngineError(f"mask_blur must be between 0 and {MAX_MASK_BLUR}, got {blur}")
    fitted = fit_image(mask_values(mask_image), width, height, resize_mode)
    binary = fitted.point([255 if value > MASK_THRESHOLD else 0 for value in range(256)])
    if mode == MaskMode.REGENERATE_UNMASKED:
        binary = binary.point([255 - value for value in range(256)])
    if binary.getbbox() is None:
        raise EngineError(_empty_mask_message(mode))
    if blur == 0:
        return binary
    return binary.filter(ImageFilter.GaussianBlur(blur))


def _empty_mask_message(mode: MaskMode) -> str:
    if mode == MaskMode.REGENERATE_UNMASKED:
        return (
            "the mask is white (or opaque) everywhere, so with mask_mode 1 (regenerate the "
            "unmasked part) there is nothing to regenerate"
        )
    return (
        "the mask has no white (or opaque) pixel, so with mask_mode 0 (regenerate the masked "
        "part) there is nothing to regenerate; paint the part to redraw white"
    )


# --- inpaint "only masked": the crop box and pasting back ------------------------------------


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Box:
    """The box of ``mask`` that inpaint_area ONLY_MASKED regenerates at ``width`` x ``height``.

    It is A1111's: the bounding box of the mask's non-zero pixels (blur included), grown by
    ``padding`` on every side, then grown along one axis to the aspect ratio of ``width`` x
    ``height`` around its centre, shifted back inside the image where it sticks out. Only when
    the image itself is too small is it clipped (and the aspect ratio no longer exact).

    Raises EngineError for a mask without non-zero pixels or a negative padding.
    """
    if padding < 0:
        raise EngineError(f"inpaint padding must be 0 or more pixels, got {padding}")
    bbox = mask.getbbox()
    if bbox is None:
        raise EngineError("the mask is empty: there is no region to regenerate")
    left, top, right, bottom = bbox
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, mask.width), min(bottom + padding, mask.height)
    box_w, box_h = right - left, bottom - top
    if box_w / box_h > width / height:
        top, bottom = _grow(top, bottom, round(box_w * height / width), mask.height)
    else:
        left, right = _grow(left, right, round(box_h * width / height), mask.width)
    return left, top, right, bottom


def _grow(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """``[start, end)`` widened to ``length`` about its centre, kept inside ``[0, limit)``."""
    start -= (length - (end - start)) // 2
    end = start + length
    if end > limit:  # shift back rather than clip, so the aspect ratio survives
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, min(end - start, limit)
    return start, end


def paste_back(
    original: Image.Image,
    generated: Image.Image,
    mask: Image.Image,
    box: Box | None = None,
) -> Image.Image:
    """``generated`` laid over ``original`` (both "RGB") through ``mask`` ("L", original's size).

    With ``box``, ``generated`` is the regenerated crop: it is resized to the box and put there
    first; without, it must have the original's size. Where ``mask`` is 0 the result is
    byte-identical to ``original``, where it is 255 it is the generated pixel, in between a
    linear blend rounded to nearest.
    """
    if mask.size != original.size:
        raise EngineError(f"mask is {_size(mask)} but the image is {_size(original)}")
    canvas = generated
    if box is not None:
        canvas = original.copy()
        crop_size = (box[2] - box[0], box[3] - box[1])
        canvas.paste(generated.resize(crop_size, Image.Resampling.LANCZOS), box[:2])
    if canvas.size != original.size:
        raise EngineError(f"generated image is {_size(canvas)} but the image is {_size(original)}")
    keep = np.asarray(original.convert("RGB"), dtype=np.uint32)
    new = np.asarray(canvas.convert("RGB"), dtype=np.uint32)
    weight = np.asarray(mask, dtype=np.uint32)[..., None]
    # Integer arithmetic: weight 0 gives exactly `keep`, weight 255 exactly `new`.
    blended = (keep * (255 - weight) + new * weight + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))


def _size(image: Image.Image) -> str:
    return f"{image.width}x{image.height}"


FILL_RADIUS = 5  # pixels around each filled pixel that OpenCV's inpainting looks at


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with every pixel the mask touches (> 0) filled from the colours around it
    (OpenCV's Telea inpainting): A1111's "fill" masked content, which denoising then starts
    from instead of what the picture had there. Pixels outside the mask are unchanged."""
    rgb = np.asarray(to_rgb(image))
    touched = (np.asarray(mask.convert("L")) > 0).astype(np.uint8)
    filled = cv2.inpaint(rgb, touched, FILL_RADIUS, cv2.INPAINT_TELEA)
    return Image.fromarray(filled)
