"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, no size conditioning."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from dan.domain import ModelFamily
from dan.engine.generation.prompts import PromptEmbeds, encode_prompts
from dan.engine.loading.architecture.sd15 import Sd1Architecture
from dan.engine.loading.checkpoint import sd_pipeline_of

if TYPE_CHECKING:
    from dan.engine.families import PipelineTask

PIPELINES: dict[str, Any] = {
    "txt2img": StableDiffusionPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "inpaint": StableDiffusionInpaintPipeline,
    "controlnet_txt2img": StableDiffusionControlNetPipeline,
    "controlnet_img2img": StableDiffusionControlNetImg2ImgPipeline,
    "controlnet_inpaint": StableDiffusionControlNetInpaintPipeline,
}


class Sd15:
    """The SD 1.x family (see :class:`dan.engine.families.Family`)."""

    name = ModelFamily.SD15
    supports_controlnet = True

    def load(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        cache_dir: Path,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[Any, Sd1Architecture]:
        return sd_pipeline_of(dict(state_dict), cache_dir=cache_dir, dtype=dtype, device=device)

    def owns(self, pipeline: Any) -> bool:
        return isinstance(pipeline, StableDiffusionPipeline)

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
        embeds, negative = encode_prompts(
            pipeline.tokenizer,
            pipeline.text_encoder,
            prompt,
            negative_prompt,
            device=device,
            dtype=dtype,
            clip_skip=clip_skip,
        )
        return PromptEmbeds(embeds, negative)

    def pipeline(self, task: PipelineTask, base: Any, scheduler: Any, **extra: Any) -> Any:
        components = {**base.components, "scheduler": scheduler, **extra}
        pipeline = PIPELINES[task](**components, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline
