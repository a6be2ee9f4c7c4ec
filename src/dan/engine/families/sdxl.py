"""Stable Diffusion XL: two text encoders, a pooled embedding and size conditioning.

Prompts are encoded as AUTOMATIC1111 does for SDXL: the prompt is parsed and cut into 75-token
chunks once (both tokenizers share CLIP's BPE vocabulary); each encoder encodes every chunk
(CLIP ViT-L padding with its end token, OpenCLIP bigG with "!" = id 0 after the end token) and
weights its own penultimate hidden states (emphasis "Original"); the two are joined along the
width (768 + 1280). The pooled embedding is bigG's projection of the first chunk's end token, not
weighted. An empty negative prompt is all zeros, hidden states and pooled alike (A1111's and
diffusers' "force zeros for empty prompt").

Size conditioning is A1111's: original size = target size = the size generated, crop (0, 0) —
which is what diffusers' SDXL pipelines use when given no sizes, so none are passed: each pass
(hires fix's second one too) is conditioned on its own size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from dan.domain import ModelFamily
from dan.engine.generation.prompts import PromptChunk, PromptEmbeds, apply_emphasis, tokenize_prompt
from dan.engine.loading.architecture.sdxl import (
    CLIP_L,
    OPEN_CLIP,
    SdxlArchitecture,
    read_sdxl_architecture,
)
from dan.engine.loading.checkpoint import converting, load_module, write_configs

if TYPE_CHECKING:
    from dan.engine.families import PipelineTask

PIPELINES: dict[str, Any] = {
    "txt2img": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "inpaint": StableDiffusionXLInpaintPipeline,
    "controlnet_txt2img": StableDiffusionXLControlNetPipeline,
    "controlnet_img2img": StableDiffusionXLControlNetImg2ImgPipeline,
    "controlnet_inpaint": StableDiffusionXLControlNetInpaintPipeline,
}
PENULTIMATE = -2  # SDXL's UNet reads both encoders' second-to-last hidden states


class Sdxl:
    """The SDXL family (see :class:`dan.engine.families.Family`)."""

    name = ModelFamily.SDXL
    supports_controlnet = True

    def load(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        cache_dir: Path,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> tuple[Any, SdxlArchitecture]:
        from diffusers import EulerDiscreteScheduler
        from transformers import CLIPTokenizer

        architecture = read_sdxl_architecture(state_dict)
        models = _load_models(state_dict, architecture, dtype, torch.device(device))
        files = architecture.config_files()
        folder = write_configs(architecture.digest, files, architecture.tokenizers, cache_dir)
        pipeline = StableDiffusionXLPipeline(
            **models,
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            scheduler=EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),  # type: ignore[no-untyped-call]
            add_watermarker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline, architecture

    def owns(self, pipeline: Any) -> bool:
        return isinstance(pipeline, StableDiffusionXLPipeline)

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
        # A1111 ignores clip skip on SDXL (unless its "sdxl_clip_l_skip" option is set, off by
        # default): both encoders always give their penultimate layer. So does DAN.
        return encode_sdxl_prompts(pipeline, prompt, negative_prompt, device=device, dtype=dtype)

    def pipeline(self, task: PipelineTask, base: Any, scheduler: Any, **extra: Any) -> Any:
        components = {**base.components, "scheduler": scheduler, **extra}
        pipeline = PIPELINES[task](**components, add_watermarker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


# --- prompts ---------------------------------------------------------------------------------


def encode_sdxl_prompts(
    pipeline: Any,
    prompt: str,
    negative_prompt: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> PromptEmbeds:
    """Both prompts for an SDXL pipeline (see the module docstring): (1, 77 * k, width) hidden
    states, k the larger chunk count, the shorter prompt padded with empty-prompt chunks; pooled
    (1, projection). No gradients are tracked."""
    tokenizer = pipeline.tokenizer
    positive = tokenize_prompt(tokenizer, prompt)
    zero_negative = negative_prompt == ""  # A1111 zeroes exactly the empty string
    negative = [] if zero_negative else tokenize_prompt(tokenizer, negative_prompt)
    count = max(len(positive), len(negative))
    empty = tokenize_prompt(tokenizer, "")[0]
    chunks = _padded(positive, count, empty) + _padded(negative, count, empty)
    hidden, pooled = _encode(pipeline, chunks, count)
    hidden = hidden.to(device=device, dtype=dtype)
    pooled = pooled.to(device=device, dtype=dtype)
    if zero_negative:
        return PromptEmbeds(hidden, torch.zeros_like(hidden), pooled, torch.zeros_like(pooled))
    return PromptEmbeds(hidden[:1], hidden[1:], pooled[:1], pooled[1:])


def _padded(chunks: list[PromptChunk], count: int, empty: PromptChunk) -> list[PromptChunk]:
    return chunks + [empty] * (count - len(chunks)) if chunks else []


def _encode(pipeline: Any, chunks: list[PromptChunk], count: int) -> tuple[Any, Any]:
    """Hidden states (prompts, 77 * count, 768 + 1280) and the pooled embedding of each prompt's
    first chunk (prompts, projection), float32; ``chunks`` holds ``count`` chunks per prompt."""
    pad = pipeline.tokenizer_2.pad_token_id
    end = pipeline.tokenizer.eos_token_id
    clip_l = _hidden(pipeline.text_encoder, chunks, end)
    open_clip = _hidden(pipeline.text_encoder_2, [_pad_after_end(c, pad) for c in chunks], end)
    hidden = torch.cat([clip_l[0], open_clip[0]], dim=-1)
    prompts = len(chunks) // count
    # Chunk-major rows: each prompt's `count` rows, laid end to end, are its sequence.
    joined = hidden.reshape(prompts, count * hidden.shape[1], hidden.shape[2])
    return joined, open_clip[1][::count]


def _hidden(text_encoder: Any, chunks: list[PromptChunk], end: int) -> tuple[Any, Any]:
    """Weighted penultimate hidden states of ``chunks``, and the pooled projections at the
    ``end`` token (if the encoder has a projection), float32."""
    device = text_encoder.device
    input_ids = torch.tensor([chunk.input_ids for chunk in chunks], device=device)
    weights = torch.tensor([chunk.weights for chunk in chunks], device=device)
    with torch.no_grad():
        output = text_encoder(input_ids=input_ids, output_hidden_states=True)
        hidden = apply_emphasis(output.hidden_states[PENULTIMATE].float(), weights.float())
        if getattr(output, "text_embeds", None) is None:
            return hidden, None
        return hidden, _pooled(text_encoder, output.last_hidden_state, input_ids, end).float()


def _pooled(text_encoder: Any, last_hidden: Any, input_ids: Any, end: int) -> Any:
    """The projection of each chunk's first end token, as A1111 pools. transformers pools at
    the largest id when a config says ``eos_token_id: 2`` (SDXL's do), which is no longer the
    end token once an embedding's placeholder ids are added past it."""
    first_end = (input_ids == end).int().argmax(dim=-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return text_encoder.text_projection(last_hidden[rows, first_end])


def _pad_after_end(chunk: PromptChunk, pad: int) -> PromptChunk:
    """The chunk with every id after its first end token replaced by ``pad`` (OpenCLIP's
    padding; A1111 does the same for its second encoder)."""
    ids = list(chunk.input_ids)
    end = ids.index(ids[-1])  # chunks always end with the end token
    return PromptChunk(tuple(ids[: end + 1] + [pad] * (len(ids) - end - 1)), chunk.weights)


# --- loading ---------------------------------------------------------------------------------


def _load_models(
    state_dict: Mapping[str, torch.Tensor],
    architecture: SdxlArchitecture,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """UNet, VAE and both text encoders holding the checkpoint's tensors, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l_config = CLIPTextConfig.from_dict(architecture.text_encoder)
    open_config = CLIPTextConfig.from_dict(architecture.text_encoder_2)
    with torch.device("meta"):  # only its config and tensor names are read
        clip_l_names, open_clip_names = (
            CLIPTextModel(clip_l_config),
            CLIPTextModelWithProjection(open_config),
        )
    weights = dict(state_dict)
    clip_l_weights = {
        k[len(CLIP_L) :]: v
        for k, v in weights.items()
        if k.startswith(CLIP_L) and not k.endswith("position_ids")
    }
    with converting("OpenCLIP bigG text encoder"):
        open_clip_weights = convert_open_clip_checkpoint(open_clip_names, weights, prefix=OPEN_CLIP)  # type: ignore[no-untyped-call]
    with converting("UNet"):
        unet_weights = convert_ldm_unet_checkpoint(weights, architecture.unet)  # type: ignore[no-untyped-call]
    with converting("VAE"):
        vae_weights = convert_ldm_vae_checkpoint(weights, architecture.vae)  # type: ignore[no-untyped-call]
    return {
        "unet": load_module(
            lambda: UNet2DConditionModel.from_config(architecture.unet),  # type: ignore[no-untyped-call]
            unet_weights,
            "UNet",
            dtype,
            device,
        ),
        "vae": load_module(
            lambda: AutoencoderKL.from_config(architecture.vae),  # type: ignore[no-untyped-call]
            vae_weights,
            "VAE",
            dtype,
            device,
        ),
        "text_encoder": load_module(
            lambda: CLIPTextModel(clip_l_config),
            _named_for(clip_l_names, clip_l_weights),
            "CLIP ViT-L text encoder",
            dtype,
            device,
        ),
        "text_encoder_2": load_module(
            lambda: CLIPTextModelWithProjection(open_config),
            _named_for(open_clip_names, open_clip_weights),
            "OpenCLIP bigG text encoder",
            dtype,
            device,
        ),
    }


def _named_for(module: torch.nn.Module, weights: Mapping[str, Any]) -> dict[str, Any]:
    """``weights`` with or without the ``text_model.`` level, as ``module`` names its tensors
    (transformers >= 5.6 dropped it from CLIPTextModel, not from the projection model)."""
    level = "text_model."
    wants_level = any(k.startswith(level) for k in module.state_dict())
    renamed: dict[str, Any] = {}
    for key, value in weights.items():
        bare = key.removeprefix(level)
        in_text_model = key.startswith(level) or not key.startswith("text_projection")
        renamed[level + bare if wants_level and in_text_model else bare] = value
    return renamed
