"""Step previews: what the picture looks like so far, from the latents, without the VAE.

Decoding latents with the VAE at every step would cost as much as a step. Instead each
checkpoint's latents are mapped to colours by a linear map (4 latent channels -> RGB, and a
bias) fitted once, when the first preview is asked for, on a few latents decoded by that
checkpoint's own VAE: no extra weights, and the same for any SD 1.x file. The preview has the
latents' resolution (1/8 of the picture's), which is plenty for a progress view.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from PIL.Image import Image

from dan.domain import ProgressCallback

FIT_SAMPLES, FIT_SIZE = 4, 8  # latents decoded to fit the map: 4 of 8x8 (64x64 pixels)
LatentsSink = Callable[[torch.Tensor], None]


class LatentPreviewer:
    """``previewer(latents)``: the RGB picture of the first latent of a (n, 4, h, w) batch."""

    def __init__(self, vae: Any) -> None:
        self._vae = vae
        self._map: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def __call__(self, latents: torch.Tensor) -> Image:
        weights, bias = self._fitted()
        flat = latents[0].detach().float().cpu().reshape(latents.shape[1], -1).T  # (h*w, 4)
        rgb = (flat @ weights + bias).clamp(0.0, 1.0).reshape(*latents.shape[2:], 3)
        return PILImage.fromarray((rgb.numpy() * 255.0 + 0.5).astype(np.uint8))

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._map is None:
                self._map = self._fit()
            return self._map

    def _fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least squares from latent pixels to the colours the VAE decodes them to (each
        latent pixel stands for an 8x8 block of the picture)."""
        vae = self._vae
        channels = int(vae.config.latent_channels)
        generator = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn(FIT_SAMPLES, channels, FIT_SIZE, FIT_SIZE, generator=generator)
        parameter = next(vae.parameters())
        with torch.inference_mode():
            scaled = (latents / vae.config.scaling_factor).to(parameter.device, parameter.dtype)
            decoded = vae.decode(scaled, return_dict=False)[0].float().cpu()
        colours = F.adaptive_avg_pool2d((decoded + 1.0) / 2.0, FIT_SIZE)  # (n, 3, 8, 8)
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        targets = colours.permute(0, 2, 3, 1).reshape(-1, 3)
        with_bias = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
        solution = torch.linalg.lstsq(with_bias, targets).solution  # (channels + 1, 3)
        return solution[:channels].contiguous(), solution[channels].contiguous()


def step_callback(
    progress: ProgressCallback,
    *,
    offset: int = 0,
    total: int | None = None,
    on_latents: LatentsSink | None = None,
) -> Any:
    """A diffusers ``callback_on_step_end`` that reports ``(offset + steps done, total)`` (the
    pipeline's own step count when ``total`` is None: second-order samplers call it twice per
    step), never past the total, and hands the latents to ``on_latents`` for a preview."""

    def on_step_end(
        pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        steps = total if total is not None else int(pipeline.num_timesteps)
        progress(min(offset + step + 1, steps), steps)
        latents = kwargs.get("latents")
        if on_latents is not None and latents is not None:
            on_latents(latents)
        return kwargs

    return on_step_end
