"""Step previews: the linear map from latents to colours is fitted on the VAE's own decodes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from dan.engine.generation.preview import LatentPreviewer


class LinearVae(nn.Module):
    """A VAE whose decoder is exactly linear per latent pixel (1x1 convolution, then each
    latent pixel painted over its 8x8 block): the map the previewer fits is known."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(latent_channels=4, scaling_factor=0.18215)
        self.mix = nn.Conv2d(4, 3, kernel_size=1)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.mix.weight.copy_(0.03 * torch.randn(3, 4, 1, 1, generator=generator))
            self.mix.bias.copy_(torch.tensor([0.1, -0.2, 0.05]))

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        colours = self.mix(latents)
        return (nn.functional.interpolate(colours, scale_factor=8, mode="nearest"),)


def test_the_fitted_map_recovers_a_linear_decoder() -> None:
    vae = LinearVae()
    previewer = LatentPreviewer(vae)
    latents = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(9))
    picture = np.asarray(previewer(latents), dtype=float)
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor)[0][0, :, ::8, ::8]
    expected = ((decoded + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255
    assert picture.shape == (6, 10, 3)  # the latents' height and width
    assert np.abs(picture - expected).max() <= 1.0  # the same colours, to the 8-bit level
