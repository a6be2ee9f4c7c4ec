"""PNG results with AUTOMATIC1111's ``parameters`` text chunk (no torch here)."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

from dan import __version__
from dan.domain import GenerationRequest


def infotext(request: GenerationRequest, seed: int) -> str:
    """The generation parameters in A1111's infotext format, which its clients parse back."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = {
        "Steps": request.steps,
        "Sampler": request.sampler_name,
        "CFG scale": f"{request.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": request.model.short_hash,
        "Model": request.model.name,
        "Version": f"DAN {__version__}",
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


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
