"""VAE files used instead of a checkpoint's own VAE (A1111's ``sd_vae``).

A VAE file holds the VAE's tensors in the original layout (A1111's ``vae-ft-mse-840000``,
``sdxl_vae``: ``encoder.down.0...``, with or without ``first_stage_model.``) or in diffusers'
(``encoder.down_blocks.0...``). It is loaded into the checkpoint's VAE architecture (its
config, scaling factor included), swapped into the checkpoint's pipeline for one request and the
checkpoint's own put back in ``finally``. The last VAE loaded is kept warm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

from dan.domain import InstalledModel
from dan.engine.loading.checkpoint import load_module, read_state_dict
from dan.errors import EngineError, UnsupportedCheckpoint

log = logging.getLogger(__name__)
DIFFUSERS_SIGN = "encoder.down_blocks."  # a key only diffusers' layout has


class VaeFiles:
    """VAE files loaded for the architecture that uses them; only the latest is held."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._device, self._dtype = device, dtype
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[str, str], Any] | None = None

    def get(self, model: InstalledModel, config: dict[str, Any]) -> Any:
        """The AutoencoderKL of ``config`` holding ``model``'s tensors; EngineError naming the
        file when it cannot be read or its tensors do not fit the checkpoint's VAE."""
        key = (model.sha256, json.dumps(config, sort_keys=True, default=str))
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # free the old one first
                self._loaded = (key, self._load(model, config))
                log.info("loaded VAE %s (%s)", model.name, model.sha256[:10])
            return self._loaded[1]

    def _load(self, model: InstalledModel, config: dict[str, Any]) -> Any:
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        try:
            state_dict = read_state_dict(model.path, allow_ckpt=False)
        except UnsupportedCheckpoint as exc:
            raise EngineError(f"VAE {model.path.name}: {exc.message}") from exc
        weights = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
        if not any(key.startswith(DIFFUSERS_SIGN) for key in weights):
            weights = convert_ldm_vae_checkpoint(weights, config)  # type: ignore[no-untyped-call]
        what = f"VAE file {model.path.name} (for this checkpoint's VAE)"
        vae = load_module(
            lambda: AutoencoderKL.from_config(config),  # type: ignore[no-untyped-call]
            weights,
            what,
            self._dtype,
            self._device,
            error=EngineError,
        )
        vae.enable_slicing()  # type: ignore[operator]  # as the checkpoint's own: one image of a batch at a time
        return vae


@contextlib.contextmanager
def swapped_vae(pipeline: Any, vae: Any | None) -> Iterator[None]:
    """``pipeline`` with ``vae`` in place of its own (nothing changes for None), its own put
    back afterwards, whatever happens."""
    if vae is None:
        yield
        return
    own = pipeline.vae
    pipeline.vae = vae
    try:
        yield
    finally:
        pipeline.vae = own
