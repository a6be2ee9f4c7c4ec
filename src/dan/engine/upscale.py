"""Upscalers by their AUTOMATIC1111 names: latent modes, PIL resizes, super-resolution models.

Three families:

- latent modes (``Latent``, ``Latent (bicubic)``, ...) interpolate SD latents; only hires fix
  uses them (:func:`upscale_latents`);
- ``Lanczos`` and ``Nearest`` are plain PIL resizes;
- model upscalers (``ESRGAN 4x``, ``R-ESRGAN 4x+``, ..., or any installed upscaler file) are
  super-resolution networks whose architecture spandrel reads from the state dict. They run
  tile by tile, each tile with a margin of context that is cut off again, so memory is bounded
  by the tile size and the seams vanish once the margin covers the network's receptive field.
  Like A1111, a model runs until the image is at least the requested size (at most 3 times), then
  Lanczos brings it to the exact size (a 4x model asked for 2x is downscaled).

The names are plain strings in plain tuples so that the torch-free API layer can copy them.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL.Image import Image
from safetensors.torch import load_file
from spandrel import (  # type: ignore[import-untyped]
    ImageModelDescriptor,
    ModelLoader,
    ModelTiling,
    UnsupportedModelError,
)

from dan.domain import InstalledModel, ModelFiles, ProgressCallback, UpscalerChoice, UpscaleRequest
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


class UnsupportedUpscaler(EngineError):
    """This upscaler file is not a super-resolution model DAN can run."""


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


# --- model files -----------------------------------------------------------------------------


def read_upscaler_state(path: Path) -> dict[str, Any]:
    """The state dict in an upscaler file (``.safetensors``, or ``.pth``/``.pt``/``.ckpt``).

    Pickled files are read with ``weights_only=True``: tensors and plain containers only, no
    code runs. Raises UnsupportedUpscaler for a file that cannot be read.
    """
    state: object
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or not a tensor file: all mean the same here
        raise UnsupportedUpscaler(
            f"cannot read upscaler file {path.name}: it is not a readable .pth or .safetensors "
            f"state dict ({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict):
        raise UnsupportedUpscaler(f"{path.name} holds a {type(state).__name__}, not a state dict")
    return state


def load_upscaler(path: Path, device: torch.device) -> ImageModelDescriptor:
    """The super-resolution model in ``path`` on ``device``, in eval mode, fp32.

    Raises UnsupportedUpscaler when the file cannot be read, spandrel knows no architecture
    with these tensors, or the model is not RGB super-resolution with a scale above 1 (a
    denoiser, a face restorer, an inpainter).
    """
    state = read_upscaler_state(path)
    try:
        model = ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError as exc:
        raise UnsupportedUpscaler(
            f"{path.name} is not a model architecture DAN can run (ESRGAN, Real-ESRGAN, SwinIR...)"
        ) from exc
    except Exception as exc:  # a known layout whose tensors do not fit it
        raise UnsupportedUpscaler(
            f"{path.name} is a damaged upscaler file: {_summary(exc)}"
        ) from exc
    _check_super_resolution(model, path.name)
    return model.to(device).eval()


def _check_super_resolution(model: Any, name: str) -> None:
    if not isinstance(model, ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        purpose = getattr(model, "purpose", "unknown")
        raise UnsupportedUpscaler(
            f"{name} is not a super-resolution upscaler: spandrel reads it as "
            f"{model.architecture.name} for {purpose!r} at scale {model.scale}"
        )
    if model.input_channels != 3 or model.output_channels != 3:
        raise UnsupportedUpscaler(f"{name} does not work on RGB images")


def _summary(exc: Exception, limit: int = 200) -> str:
    """The exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UpscalerModels:
    """Super-resolution models by sha256 on one device, and how to run them.

    At most ``capacity`` models stay loaded; the least recently used goes first. ``tile_size``
    is the side of the square each model call is responsible for (0: the whole image at once)
    and ``tile_overlap`` the context margin added on every side of it, in input pixels.
    Models run in ``dtype`` on GPUs when the architecture supports it, in fp32 on CPUs.
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        capacity: int = 2,
        tile_size: int = 192,
        tile_overlap: int = 16,
    ) -> None:
        if capacity < 1 or tile_size < 0 or tile_overlap < 0:
            raise ValueError("capacity must be >= 1, tile_size and tile_overlap >= 0")
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.loads = 0
        self._models: OrderedDict[str, ImageModelDescriptor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_file: InstalledModel) -> ImageModelDescriptor:
        """The loaded model of ``model_file`` (read on first use). Raises UnsupportedUpscaler."""
        with self._lock:
            model = self._models.get(model_file.sha256)
            if model is None:
                model = load_upscaler(model_file.path, self.device)
                self.loads += 1
                self._models[model_file.sha256] = model
            self._models.move_to_end(model_file.sha256)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def loaded(self) -> list[str]:
        """sha256 of the loaded models, least recently used first."""
        with self._lock:
            return list(self._models)

    def tile_size_for(self, model: ImageModelDescriptor) -> int:
        """The tile size for ``model``: 0 (untiled) for models that tile internally."""
        return 0 if model.tiling == ModelTiling.INTERNAL else self.tile_size

    def run_dtype(self, model: ImageModelDescriptor) -> torch.dtype:
        """fp32 on CPUs; the engine's half dtype on GPUs where the architecture supports it."""
        if self.device.type == "cpu":
            return torch.float32
        if self.dtype == torch.float16 and model.supports_half:
            return torch.float16
        if self.dtype == torch.bfloat16 and model.supports_bfloat16:
            return torch.bfloat16
        return torch.float32


# --- running models --------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # left, top, right, bottom


def tile_boxes(width: int, height: int, tile_size: int) -> list[Box]:
    """Boxes of at most ``tile_size`` square covering the image, row by row (0: one box)."""
    if tile_size <= 0:
        return [(0, 0, width, height)]
    return [
        (left, top, min(left + tile_size, width), min(top + tile_size, height))
        for top in range(0, height, tile_size)
        for left in range(0, width, tile_size)
    ]


def _with_margin(box: Box, margin: int, width: int, height: int) -> Box:
    left, top, right, bottom = box
    return (
        max(left - margin, 0),
        max(top - margin, 0),
        min(right + margin, width),
        min(bottom + margin, height),
    )


def _image_tensor(image: Image) -> torch.Tensor:
    """(1, 3, H, W) fp32 in [0, 1] on the CPU."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _to_pixels(tensor: torch.Tensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """(1, 3, h, w) in [0, 1] -> (h, w, 3) uint8 on the CPU."""
    pixels = tensor[0].float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def run_model(
    model: ImageModelDescriptor,
    image: Image,
    models: UpscalerModels,
    on_tile: ProgressCallback | None = None,
) -> Image:
    """``image`` enlarged ``model.scale`` times by one pass of ``model``, tile by tile.

    ``on_tile(done, total)`` is called after each tile (cancellation raised there propagates).
    """
    width, height = image.size
    scale = model.scale
    boxes = tile_boxes(width, height, models.tile_size_for(model))
    source = _image_tensor(image)
    output = np.zeros((height * scale, width * scale, 3), dtype=np.uint8)
    dtype = models.run_dtype(model)
    model.to(models.device, dtype)
    with torch.inference_mode():
        for done, box in enumerate(boxes, start=1):
            left, top, right, bottom = box
            c_left, c_top, c_right, c_bottom = _with_margin(box, models.tile_overlap, width, height)
            tile = source[:, :, c_top:c_bottom, c_left:c_right].to(models.device, dtype)
            pixels = _to_pixels(model(tile))
            core = pixels[
                (top - c_top) * scale : (bottom - c_top) * scale,
                (left - c_left) * scale : (right - c_left) * scale,
            ]
            output[top * scale : bottom * scale, left * scale : right * scale] = core
            if on_tile is not None:
                on_tile(done, len(boxes))
    return PILImage.fromarray(output)


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


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size`` times ``scale``, each side rounded half up (at least 1 pixel)."""
    return (max(1, math.floor(size[0] * scale + 0.5)), max(1, math.floor(size[1] * scale + 0.5)))


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
