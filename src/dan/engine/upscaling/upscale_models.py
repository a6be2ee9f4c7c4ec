"""Super-resolution model upscalers: reading their files, keeping them loaded, running them.

A model upscaler (``ESRGAN 4x``, ``R-ESRGAN 4x+``, ..., or any installed upscaler file) is a
super-resolution network whose architecture spandrel reads from the state dict. Files are
``.safetensors`` or pickled ``.pth``/``.pt``/``.ckpt`` read with ``weights_only=True``; anything
that is not an RGB super-resolution model raises :class:`UnsupportedUpscaler`.

:class:`UpscalerModels` keeps the last few models loaded on one device. :func:`run_model` runs
one pass tile by tile, each tile with a margin of context that is cut off again, so memory is
bounded by the tile size and the seams vanish once the margin covers the network's receptive
field. How many passes reach a requested size is :mod:`dan.engine.upscaling.upscale`'s business.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL.Image import Image
from safetensors.torch import load_file
from spandrel import (  # type: ignore[import-untyped]
    ImageModelDescriptor,
    ModelLoader,
    ModelTiling,
    UnsupportedModelError,
)

from dan.domain import InstalledModel, ProgressCallback
from dan.engine.loading.pickles import load_pickle
from dan.engine.loading.shapes import Limits, check_tensors, named_tensors
from dan.errors import EngineError

# Convolutions and attention tables; some architectures spandrel reads have 3-d convolutions.
UPSCALER_LIMITS = Limits("an upscaler", max_rank=5, max_side=1 << 17)


class UnsupportedUpscaler(EngineError):
    """This upscaler file is not a super-resolution model DAN can run."""


# --- model files -----------------------------------------------------------------------------


def read_upscaler_state(path: Path) -> dict[str, Any]:
    """The state dict in an upscaler file (``.safetensors``, or ``.pth``/``.pt``/``.ckpt``).

    Pickled files are read with ``weights_only=True``: tensors and plain containers only, no
    code runs. Raises UnsupportedUpscaler for a file that cannot be read, declares more than it
    holds (see :mod:`dan.engine.loading.pickles`) or holds shapes no upscaler has.
    """
    state: object
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = load_pickle(path, UnsupportedUpscaler)
    except UnsupportedUpscaler:
        raise
    except Exception as exc:  # truncated, corrupt or not a tensor file: all mean the same here
        raise UnsupportedUpscaler(
            f"cannot read upscaler file {path.name}: it is not a readable .pth or .safetensors "
            f"state dict ({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict):
        raise UnsupportedUpscaler(f"{path.name} holds a {type(state).__name__}, not a state dict")
    # Nested: spandrel unwraps training files' "params_ema" and the like itself.
    check_tensors(path.name, named_tensors(state), UPSCALER_LIMITS, UnsupportedUpscaler)
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
