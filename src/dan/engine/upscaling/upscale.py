"""Upscalers by their AUTOMATIC1111 names: latent modes, PIL resizes, super-resolution models.

Three families:

- latent modes (``Latent``, ``Latent (bicubic)``, ...) interpolate SD latents; only hires fix
  uses them (:func:`upscale_latents`);
- ``Lanczos`` and ``Nearest`` are plain PIL resizes;
- model upscalers (``ESRGAN 4x``, ``R-ESRGAN 4x+``, ..., or any installed upscaler file) are
  super-resolution networks, loaded and run tile by tile by
  :mod:`dan.engine.upscaling.upscale_models`.
  Like A1111, a model runs until the image is at least the requested size (at most 3 times), then
  Lanczos brings it to the exact size (a 4x model asked for 2x is downscaled).

:func:`resize_image` and :func:`upscale_image` pick the family by name; :func:`upscale` is the
standalone endpoint, blending two upscalers. The names are plain strings in plain tuples so that
the torch-free API layer can copy them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL.Image import Image
from spandrel import ImageModelDescriptor  # type: ignore[import-untyped]

from dan.domain import (
    InstalledModel,
    ModelFiles,
    ProgressCallback,
    UpscalerChoice,
    UpscaleRequest,
    scaled_size,
)
from dan.engine.upscaling.upscale_models import UpscalerModels, run_model, tile_boxes
from dan.errors import EngineError


@dataclass(frozen=True)
class LatentMode:
    """How a latent mode interpolates: a ``torch.nn.functional.interpolate`` mode, antialiased?"""

    mode: str
    antialias: bool


# A1111's table of latent upscale modes (shared.latent_upscale_modes).
LATENT_UPSCALE_MODES: Mapping[str, LatentMode] = MappingProxyType(
    {
        "Latent": LatentMode("bilinear", antialias=False),
        "Latent (antialiased)": LatentMode("bilinear", antialias=True),
        "Latent (bicubic)": LatentMode("bicubic", antialias=False),
        "Latent (bicubic antialiased)": LatentMode("bicubic", antialias=True),
        "Latent (nearest)": LatentMode("nearest", antialias=False),
        "Latent (nearest-exact)": LatentMode("nearest-exact", antialias=False),
    }
)
LATENT_UPSCALERS: tuple[str, ...] = tuple(LATENT_UPSCALE_MODES)
# Built-in image upscalers: PIL resizes, no file needed (what dan.domain.IMAGE_UPSCALERS copies).
IMAGE_UPSCALERS: tuple[str, ...] = ("Lanczos", "Nearest")
# The catalog's A1111 aliases of model upscalers; any installed upscaler file works by its name.
MODEL_UPSCALERS = ("ESRGAN 4x", "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "SwinIR 4x")
# Every fixed name hires fix accepts; the standalone endpoint takes all but the latent modes.
UPSCALER_NAMES: tuple[str, ...] = LATENT_UPSCALERS + IMAGE_UPSCALERS + MODEL_UPSCALERS

_RESAMPLING = {"Lanczos": PILImage.Resampling.LANCZOS, "Nearest": PILImage.Resampling.NEAREST}
MAX_MODEL_PASSES = 3  # as A1111: a 4x model reaches at most 64x


def is_latent_upscaler(name: str) -> bool:
    """True for the latent modes, which work on latents and not on images."""
    return name in LATENT_UPSCALE_MODES


# --- latents ---------------------------------------------------------------------------------


def upscale_latents(
    latents: torch.Tensor, width: int, height: int, mode_name: str, *, vae_scale_factor: int = 8
) -> torch.Tensor:
    """``latents`` (N, C, h, w) interpolated to the latents of a ``width`` x ``height`` image.

    Interpolates in fp32 (half-precision interpolation is missing or slow on CPUs) and returns
    the input's dtype and device. Raises EngineError for a name that is not a latent mode.
    """
    mode = LATENT_UPSCALE_MODES.get(mode_name)
    if mode is None:
        raise EngineError(f"{mode_name!r} is not a latent upscaler; one of {LATENT_UPSCALERS}")
    size = (height // vae_scale_factor, width // vae_scale_factor)
    resized = F.interpolate(latents.float(), size=size, mode=mode.mode, antialias=mode.antialias)
    return resized.to(latents.dtype)


# --- model upscalers: passes to the requested size -------------------------------------------


def _model_passes(size: tuple[int, int], target: tuple[int, int], scale: int) -> int:
    """How many runs of a ``scale``x model bring ``size`` to at least ``target`` (at most 3)."""
    needed = max(target[0] / size[0], target[1] / size[1])
    if needed <= 1:
        return 0
    return min(math.ceil(math.log(needed, scale) - 1e-9), MAX_MODEL_PASSES)


def _model_resize(
    image: Image,
    size: tuple[int, int],
    model: ImageModelDescriptor,
    models: UpscalerModels,
    progress: ProgressCallback | None,
) -> Image:
    passes = _model_passes(image.size, size, model.scale)
    # Progress over every tile of every pass: later passes work on larger images.
    tile_size = models.tile_size_for(model)
    counts = [
        len(tile_boxes(image.width * model.scale**p, image.height * model.scale**p, tile_size))
        for p in range(passes)
    ]
    for index in range(passes):
        on_tile = _offset_progress(progress, sum(counts[:index]), sum(counts))
        image = run_model(model, image, models, on_tile)
    return image.resize(size, PILImage.Resampling.LANCZOS) if image.size != size else image


def _offset_progress(
    progress: ProgressCallback | None, offset: int, total: int
) -> ProgressCallback | None:
    """Progress of a part that starts ``offset`` units into a run of ``total`` units."""
    if progress is None:
        return None
    return lambda done, _count: progress(offset + done, total)


# --- upscaling images ------------------------------------------------------------------------


def resize_image(
    image: Image,
    size: tuple[int, int],
    upscaler: UpscalerChoice,
    model_file: InstalledModel | None,
    *,
    models: UpscalerModels,
    progress: ProgressCallback | None = None,
) -> Image:
    """``image`` as RGB of exactly ``size`` (width, height), made by ``upscaler``.

    ``model_file`` is the file of a model upscaler (None for Lanczos/Nearest). Model upscalers
    report ``progress(tiles done, tiles in all)``. Raises EngineError for a latent mode or an
    unknown name without a file, UnsupportedUpscaler for a file that is no upscaler.
    """
    rgb = image.convert("RGB")
    resample = _RESAMPLING.get(upscaler.name)
    if resample is not None:
        return rgb.resize(size, resample)
    if is_latent_upscaler(upscaler.name):
        raise EngineError(f"{upscaler.name!r} upscales latents: it works in hires fix only")
    if model_file is None:
        raise EngineError(
            f"upscaler {upscaler.name!r} needs its model file, which is not installed; "
            f"built-in upscalers: {IMAGE_UPSCALERS}"
        )
    return _model_resize(rgb, size, models.get(model_file), models, progress)


def upscale_image(
    image: Image,
    scale: float,
    upscaler: UpscalerChoice,
    model_file: InstalledModel | None,
    *,
    models: UpscalerModels,
    progress: ProgressCallback | None = None,
) -> Image:
    """``image`` enlarged ``scale`` times (see :func:`scaled_size`, :func:`resize_image`)."""
    size = scaled_size(image.size, scale)
    return resize_image(image, size, upscaler, model_file, models=models, progress=progress)


def model_file_of(upscaler: UpscalerChoice, files: ModelFiles) -> InstalledModel | None:
    """The installed file a model upscaler names, None for the others.

    Raises EngineError when the upscaler names a file that ``files`` lacks.
    """
    if upscaler.model is None:
        return None
    model_file = files.get(upscaler.model.sha256)
    if model_file is None:
        raise EngineError(f"the file of upscaler {upscaler.name!r} was not given to the engine")
    return model_file


def upscale(
    request: UpscaleRequest,
    image: Image,
    files: ModelFiles,
    *,
    models: UpscalerModels,
    progress: ProgressCallback | None = None,
) -> Image:
    """The standalone endpoint (A1111 extras): ``image`` enlarged ``request.rate`` times.

    With ``upscaler2``, the result is ``Image.blend(upscaler's, upscaler2's, upscaler2_factor)``;
    an upscaler whose share is 0 is not run. Progress rises monotonically to 1 across both.
    Raises EngineError (UnsupportedUpscaler for bad files).
    """
    factor = request.upscaler2_factor
    if not 0 <= factor <= 1:
        raise EngineError(f"upscaler2_factor must be between 0 and 1, got {factor}")
    stages = _blend_stages(request)
    results = [
        upscale_image(
            image,
            request.rate,
            choice,
            model_file_of(choice, files),
            models=models,
            progress=_stage_progress(progress, index, len(stages)),
        )
        for index, choice in enumerate(stages)
    ]
    if progress is not None:
        progress(1, 1)
    if len(results) == 2:
        return PILImage.blend(results[0], results[1], factor)
    return results[0]


def _blend_stages(request: UpscaleRequest) -> list[UpscalerChoice]:
    """The upscalers whose result is part of the blend, in blend order."""
    if request.upscaler2 is None or request.upscaler2_factor == 0:
        return [request.upscaler]
    if request.upscaler2_factor == 1:
        return [request.upscaler2]
    return [request.upscaler, request.upscaler2]


def _stage_progress(
    progress: ProgressCallback | None, stage: int, stages: int
) -> ProgressCallback | None:
    """Progress of one of ``stages`` equal stages: the ratio rises from stage/stages."""
    if progress is None:
        return None
    return lambda done, total: progress(stage * total + done, stages * total)
