"""Model families: everything that differs between Stable Diffusion 1.x and SDXL, one object
per family.

A :class:`Family` knows how to recognise its checkpoints, load them offline, encode prompts for
them and build each kind of diffusers pipeline around a loaded checkpoint's components. The
engine (``diffusers_engine.py``, ``generation/``, ``control/``) asks the checkpoint's family for
these and never branches on the family itself. The family of a file is picked from its key names
(:func:`family_of_state_dict`); the family of a loaded pipeline from its class
(:func:`family_of_pipeline`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from dan.domain import ModelFamily
from dan.engine.families.sd15 import Sd15
from dan.engine.families.sdxl import Sdxl
from dan.engine.generation.prompts import PromptEmbeds
from dan.engine.loading.architecture.sd15 import Sd1Architecture
from dan.engine.loading.architecture.sdxl import SdxlArchitecture, is_sdxl
from dan.engine.loading.checkpoint import read_state_dict
from dan.errors import UnsupportedCheckpoint

Architecture = Sd1Architecture | SdxlArchitecture
# The pipelines the engine builds around a checkpoint's components (ControlNet ones take
# ``controlnet=``).
PipelineTask = Literal[
    "txt2img",
    "img2img",
    "inpaint",
    "controlnet_txt2img",
    "controlnet_img2img",
    "controlnet_inpaint",
]


class Family(Protocol):
    """What one model family does its own way. Stateless: one instance serves every task."""

    name: ModelFamily
    supports_controlnet: bool  # whether DAN's ControlNet units run on this family yet

    def load(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        cache_dir: Path,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[Any, Architecture]:
        """The txt2img pipeline of a checkpoint of this family, and its architecture (read from
        its tensors); raises UnsupportedCheckpoint for a file this family cannot load."""
        ...

    def owns(self, pipeline: Any) -> bool:
        """Whether ``pipeline`` (as :meth:`load` returns it) is of this family."""
        ...

    def encode_prompts(
        self,
        pipeline: Any,
        prompt: str,
        negative_prompt: str,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        clip_skip: int = 1,
    ) -> PromptEmbeds:
        """Both prompts encoded A1111's way (weights, BREAK, any length, clip skip), LoRA tags
        removed."""
        ...

    def pipeline(self, task: PipelineTask, base: Any, scheduler: Any, **extra: Any) -> Any:
        """A ``task`` pipeline sharing ``base``'s weights, with its own ``scheduler``."""
        ...


FAMILIES: tuple[Family, ...] = (Sd15(), Sdxl())


def family_named(name: ModelFamily) -> Family:
    return next(family for family in FAMILIES if family.name == name)


def family_of_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Family:
    """The family whose loader takes this checkpoint: SGM key names are SDXL's, the rest are
    left to SD1.x's architecture reader (which names whatever else it finds)."""
    return family_named(ModelFamily.SDXL if is_sdxl(list(state_dict)) else ModelFamily.SD15)


def family_of_pipeline(pipeline: Any) -> Family:
    """The family of a pipeline :func:`load_checkpoint` returned."""
    family = next((f for f in FAMILIES if f.owns(pipeline)), None)
    if family is None:
        raise TypeError(f"no model family runs a {type(pipeline).__name__}")
    return family


def load_checkpoint(
    path: Path,
    *,
    cache_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    allow_ckpt: bool,
) -> tuple[Any, Architecture, Family]:
    """The txt2img pipeline of the single-file checkpoint at ``path`` (any family), its
    architecture and family. Nothing is downloaded. Raises UnsupportedCheckpoint naming the file
    for anything wrong with it, EngineError when the config folder cannot be written."""
    state_dict = read_state_dict(path, allow_ckpt=allow_ckpt)
    family = family_of_state_dict(state_dict)
    try:
        pipeline, architecture = family.load(
            state_dict, cache_dir=cache_dir, dtype=dtype, device=device
        )
    except UnsupportedCheckpoint as exc:
        raise UnsupportedCheckpoint(f"{path.name}: {exc.message}") from exc
    return pipeline, architecture, family
