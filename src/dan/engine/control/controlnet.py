"""ControlNets for Stable Diffusion 1.x and SDXL: loaded offline, kept warm.

Files: the original lllyasviel layout (``control_model.*``, as ``control_sd15_canny.pth``, a
pickled ``{"state_dict": ...}`` or plain dict, or ``.safetensors``; the v1.0 files also carry a
whole SD checkpoint, which is ignored) and diffusers' layout (``controlnet_cond_embedding.*``,
``down_blocks.*``, ``controlnet_down_blocks.*``). Names and architecture come from
:mod:`dan.engine.control.layout` (tensor shapes over the shipped SD1.5 config), so the tiny
test ControlNets load through the same code as real ones. SDXL ControlNets (``add_embedding``,
2048-wide cross-attention) are loaded for the UNet they run with (see
:func:`load_controlnet`); a ControlNet of another family than the checkpoint's is refused,
naming both. Pickles load with ``weights_only=True`` only, once what they declare is checked: a
ControlNet file is data, never code.

Running a ControlNet: :mod:`dan.engine.control.runs`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dan.domain import (
    InstalledModel,
)
from dan.engine.control.layout import (
    ControlNetError,
    StateDict,
    is_sdxl_controlnet,
    read_controlnet_config,
    to_diffusers_names,
)
from dan.engine.loading.checkpoint import load_module
from dan.engine.loading.pickles import load_pickle
from dan.engine.loading.shapes import Limits, check_tensors

__all__ = [
    "ControlNetCache",
    "ControlNetError",
    "load_controlnet",
    "read_controlnet_state_dict",
]
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# A ControlNet is an SD UNet's encoder (the v1.0 files carry a whole SD checkpoint besides): the
# checkpoints' bounds hold for it.
CONTROLNET_LIMITS = Limits("a ControlNet", max_rank=4, max_side=1 << 17)


# --- reading ---------------------------------------------------------------------------------


def read_controlnet_state_dict(path: Path) -> StateDict:
    """The ControlNet's tensors of ``path`` under diffusers' names, on the CPU.

    Raises ControlNetError, naming the file, for an unknown suffix, a file that cannot be read,
    one declaring more than it holds (see :mod:`dan.engine.loading.pickles`) or shapes no
    ControlNet has, and a file that holds no ControlNet (an SD checkpoint, a LoRA, ...).
    """
    tensors = _tensors_of(_read(path), path)
    check_tensors(path.name, tensors, CONTROLNET_LIMITS, ControlNetError)
    try:
        return to_diffusers_names(tensors)
    except ControlNetError as exc:
        raise ControlNetError(f"{path.name}: {exc.message}") from exc


def _read(path: Path) -> object:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        if suffix in PICKLE_SUFFIXES:
            return load_pickle(path, ControlNetError)
    except ControlNetError:
        raise
    except Exception as exc:  # safetensors and unpickling raise many types
        raise ControlNetError(f"{path.name} cannot be read (truncated or corrupt?): {exc}") from exc
    raise ControlNetError(f"{path.name}: unknown ControlNet format {suffix!r}; use .safetensors")


def _tensors_of(raw: object, path: Path) -> StateDict:
    while isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ControlNetError(f"{path.name} holds a {type(raw).__name__}, not a state dict")
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ControlNetError(f"{path.name} holds no tensors")
    return tensors


# --- loading -----------------------------------------------------------------------------------


def load_controlnet(
    path: Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    unet: Mapping[str, Any] | None = None,
) -> Any:
    """A ``ControlNetModel`` holding the weights of ``path``, on ``device`` in ``dtype``, in eval
    mode without gradients. Every tensor of the architecture must be in the file and nothing
    else (strict). Nothing is downloaded. ``unet`` is the config of the checkpoint's UNet it is
    for: the ControlNet must fit it (same family, widths and cross-attention), and an SDXL
    ControlNet takes from it what its tensors cannot tell. Raises ControlNetError naming the
    file, and for a ControlNet that does not fit ``unet`` both families.
    """
    from diffusers import ControlNetModel

    tensors = read_controlnet_state_dict(path)
    try:
        config = read_controlnet_config(tensors, unet)
    except (KeyError, IndexError) as exc:
        raise ControlNetError(f"{path.name}: incomplete ControlNet, no tensor {exc}") from exc
    if unet is not None:
        check_fits(path.name, config, unet)
    return load_module(
        lambda: ControlNetModel.from_config(config),
        tensors,
        f"{path.name} ControlNet",
        dtype,
        device,
        error=ControlNetError,
    )


def check_fits(name: str, config: Mapping[str, Any], unet: Mapping[str, Any]) -> None:
    """Raise ControlNetError unless the ControlNet ``config`` (of file ``name``) mirrors the
    encoder of the UNet ``unet``: same family, level widths and cross-attention width."""
    ours, theirs = _family(config), _family(unet)
    widths = list(config["block_out_channels"]), list(unet["block_out_channels"])
    context = config["cross_attention_dim"], unet["cross_attention_dim"]
    if ours != theirs or widths[0] != widths[1] or context[0] != context[1]:
        raise ControlNetError(
            f"{name} is an {ours} ControlNet (widths {widths[0]}, cross-attention {context[0]}) "
            f"and the checkpoint an {theirs} one (widths {widths[1]}, cross-attention "
            f"{context[1]}); use a ControlNet made for {theirs} checkpoints"
        )


def _family(config: Mapping[str, Any]) -> str:
    return "sdxl" if is_sdxl_controlnet(config) or config.get("addition_embed_type") else "sd15"


class ControlNetCache:
    """Loaded ControlNets by sha256 (and the UNet settings an SDXL one borrows), kept warm next
    to the checkpoints; the least recently used beyond ``max_models`` is dropped. Thread-safe; a
    load happens once per key while cached.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, max_models: int = 2) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self._device, self._dtype, self._max = device, dtype, max_models
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, model: InstalledModel, unet: Mapping[str, Any] | None = None) -> Any:
        """The ControlNetModel of ``model`` for the UNet of config ``unet`` (see
        :func:`load_controlnet`); raises ControlNetError for an unusable file or one that does
        not fit the UNet."""
        key = (model.sha256, _borrowed(unet))
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                loaded = load_controlnet(
                    model.path, dtype=self._dtype, device=self._device, unet=unet
                )
                self.loads += 1
                self._models[key] = loaded
            elif unet is not None:  # a cached model fits the UNets it was checked against
                check_fits(model.path.name, loaded.config, unet)
            self._models.move_to_end(key)
            while len(self._models) > self._max:
                self._models.popitem(last=False)
            return loaded

    def loaded(self) -> list[str]:
        """The sha256 of each cached ControlNet, least recently used first."""
        with self._lock:
            return [sha256 for sha256, _ in self._models]


def _borrowed(unet: Mapping[str, Any] | None) -> str:
    """What an SDXL ControlNet takes from ``unet``: part of the cache key."""
    if unet is None:
        return ""
    return repr((unet.get("attention_head_dim"), unet.get("addition_time_embed_dim")))
