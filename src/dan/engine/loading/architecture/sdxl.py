"""Reading an SDXL checkpoint's architecture from its tensor shapes (the SGM single-file layout).

SDXL single files (Stability's SGM layout, as A1111 and ComfyUI load them) hold:

- the UNet under ``model.diffusion_model.`` with SD1's block names plus ``label_emb.0.*``, the
  MLP that embeds the pooled text embedding and the six size numbers;
- the VAE under ``first_stage_model.``, in SD1's layout;
- CLIP ViT-L under ``conditioner.embedders.0.transformer.`` (transformers' layout);
- OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (OpenCLIP's layout: fused
  ``attn.in_proj_weight``, ``resblocks``, a ``text_projection`` matrix).

As for SD1.x (:mod:`dan.engine.loading.architecture.sd15`), every size comes from a tensor shape and
what shapes cannot tell comes from the SDXL base configs shipped in ``dan/engine/configs/sdxl``.
Heads are 64 wide in both the UNet ([5, 10, 20] heads at 320/640/1280) and the text encoders; widths
that are not a multiple of 64 only occur in test models and get 8-wide heads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch

from dan.engine.loading.architecture.sd15 import (
    CONV,
    LINEAR,
    UNET,
    VAE,
    _has,
    _indices,
    _read_vae,
    _shape,
    _unet_levels,
)
from dan.errors import UnsupportedCheckpoint

SdxlVariant = Literal["sdxl", "sdxl-inpaint"]

CLIP_L = "conditioner.embedders.0.transformer."
OPEN_CLIP = "conditioner.embedders.1.model."
REFINER_SIGN = "conditioner.embedders.0.model."  # the refiner has only OpenCLIP, as embedder 0
SIZE_NUMBERS = 6  # original (h, w), crop (top, left), target (h, w)
CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
# Tokenizer folders of the config folder and their padding tokens: OpenCLIP pads with "!" (id 0)
# where OpenAI's CLIP pads with its end token.
TOKENIZERS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
CONFIG_FORMAT = 1
SDXL_PARTS = (
    (UNET + "label_emb.0.0.", "UNet size/pooled embedding (label_emb)"),
    (VAE, "VAE"),
    (CLIP_L, "CLIP ViT-L text encoder"),
    (OPEN_CLIP, "OpenCLIP ViT-bigG text encoder"),
)


@dataclass(frozen=True)
class SdxlArchitecture:
    """What an SDXL checkpoint holds: diffusers configs for its four models."""

    variant: SdxlVariant
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]

    def config_files(self) -> dict[str, dict[str, Any]]:
        """Every config file of the folder, by path relative to it."""
        base = base_configs()
        models = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }
        return {CONFIG_FILES[name]: config for name, config in {**base, **models}.items()}

    @property
    def tokenizers(self) -> dict[str, str]:
        return TOKENIZERS

    @property
    def digest(self) -> str:
        canonical = json.dumps(["sdxl", CONFIG_FORMAT, self.config_files()], sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def base_configs() -> dict[str, dict[str, Any]]:
    """The SDXL base configs shipped in ``dan/engine/configs/sdxl``, keyed like CONFIG_FILES."""
    root = resources.files("dan.engine").joinpath("configs", "sdxl")
    return {
        name: json.loads(root.joinpath(*relative.split("/")).read_text("utf-8"))
        for name, relative in CONFIG_FILES.items()
    }


def is_sdxl(keys: list[str]) -> bool:
    """Whether the keys are SGM's (SDXL base or refiner): what picks the family of a file."""
    return _has(keys, "conditioner.embedders.")


def read_sdxl_architecture(state_dict: Mapping[str, torch.Tensor]) -> SdxlArchitecture:
    """The architecture of an SGM-layout SDXL state dict, read from its tensor shapes only.

    Raises UnsupportedCheckpoint, naming what was found, for the SDXL refiner and for files
    that lack one of SDXL's four parts.
    """
    keys = list(state_dict)
    if _has(keys, REFINER_SIGN):
        raise UnsupportedCheckpoint(
            "an SDXL refiner (one OpenCLIP text encoder as conditioner.embedders.0.model.*); "
            "DAN runs SDXL base checkpoints and their fine-tunes"
        )
    missing = next((f"no {what} ({p}*)" for p, what in SDXL_PARTS if not _has(keys, p)), None)
    if missing:
        raise UnsupportedCheckpoint(f"not a complete SDXL checkpoint: {missing}")
    text_encoder = _read_clip_l(state_dict, keys)
    text_encoder_2 = _read_open_clip(state_dict, keys)
    unet = _read_unet(state_dict, keys, pooled=text_encoder_2["projection_dim"])
    vae = _read_vae(state_dict, keys)
    _check_consistent(unet, vae, text_encoder, text_encoder_2)
    base = base_configs()
    return SdxlArchitecture(
        variant="sdxl" if unet["in_channels"] == vae["latent_channels"] else "sdxl-inpaint",
        unet={**base["unet"], **unet},
        vae={**base["vae"], **vae},
        text_encoder={**base["text_encoder"], **text_encoder},
        text_encoder_2={**base["text_encoder_2"], **text_encoder_2},
    )


def heads(width: int) -> int:
    """Head count of an attention ``width`` wide: 64-wide heads (8-wide for test widths)."""
    return width // 64 if width % 64 == 0 else max(1, width // 8)


def _read_unet(
    state_dict: Mapping[str, torch.Tensor], keys: list[str], *, pooled: int
) -> dict[str, Any]:
    levels = _unet_levels(state_dict, keys)
    mid_depth = len(_indices(keys, UNET + "middle_block.1.transformer_blocks."))
    if mid_depth != levels[-1].depth or len({level.res_blocks for level in levels}) != 1:
        raise UnsupportedCheckpoint(f"irregular SDXL UNet (levels {levels}, middle {mid_depth})")
    attention = [level.depth > 0 for level in levels]
    context = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    proj_in = UNET + "middle_block.1.proj_in.weight"
    embedding_inputs = _shape(state_dict, UNET + "label_emb.0.0.weight", LINEAR)[1]
    return {
        "in_channels": _shape(state_dict, UNET + "input_blocks.0.0.weight", CONV)[1],
        "out_channels": _shape(state_dict, UNET + "out.2.weight", CONV)[0],
        "block_out_channels": [level.channels for level in levels],
        "layers_per_block": levels[0].res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        # diffusers wants a depth for attention-less levels too; SDXL's config says 1.
        "transformer_layers_per_block": [max(level.depth, 1) for level in levels],
        "attention_head_dim": [heads(level.channels) for level in levels],
        "cross_attention_dim": _shape(state_dict, context, LINEAR)[1],
        "projection_class_embeddings_input_dim": embedding_inputs,
        "addition_time_embed_dim": (embedding_inputs - pooled) // SIZE_NUMBERS,
        "use_linear_projection": len(_shape(state_dict, proj_in, LINEAR + CONV)) == 2,
    }


def _read_clip_l(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
    prefix = CLIP_L + "text_model." if _has(keys, CLIP_L + "text_model.") else CLIP_L
    vocab, hidden = _shape(state_dict, prefix + "embeddings.token_embedding.weight", LINEAR)
    fc1 = prefix + "encoder.layers.0.mlp.fc1.weight"
    positions = prefix + "embeddings.position_embedding.weight"
    return {
        "hidden_size": hidden,
        "intermediate_size": _shape(state_dict, fc1, LINEAR)[0],
        "max_position_embeddings": _shape(state_dict, positions, LINEAR)[0],
        "num_attention_heads": heads(hidden),
        "num_hidden_layers": len(_indices(keys, prefix + "encoder.layers.")),
        "projection_dim": hidden,
        "vocab_size": vocab,
    }


def _read_open_clip(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
    vocab, hidden = _shape(state_dict, OPEN_CLIP + "token_embedding.weight", LINEAR)
    blocks = OPEN_CLIP + "transformer.resblocks."
    positions = OPEN_CLIP + "positional_embedding"
    return {
        "hidden_size": hidden,
        "intermediate_size": _shape(state_dict, blocks + "0.mlp.c_fc.weight", LINEAR)[0],
        "max_position_embeddings": _shape(state_dict, positions, LINEAR)[0],
        "num_attention_heads": heads(hidden),
        "num_hidden_layers": len(_indices(keys, blocks)),
        "projection_dim": _shape(state_dict, OPEN_CLIP + "text_projection", LINEAR)[1],
        "vocab_size": vocab,
    }


def _check_consistent(
    unet: dict[str, Any], vae: dict[str, Any], clip_l: dict[str, Any], open_clip: dict[str, Any]
) -> None:
    context = clip_l["hidden_size"] + open_clip["hidden_size"]
    if unet["cross_attention_dim"] != context:
        raise UnsupportedCheckpoint(
            f"UNet cross-attention width {unet['cross_attention_dim']} is not the two text "
            f"encoders' widths together ({clip_l['hidden_size']} + {open_clip['hidden_size']}; "
            "SDXL: 768 + 1280 = 2048)"
        )
    latent = vae["latent_channels"]
    if unet["in_channels"] not in (latent, 2 * latent + 1) or unet["out_channels"] != latent:
        raise UnsupportedCheckpoint(
            f"UNet maps {unet['in_channels']} -> {unet['out_channels']} channels with "
            f"{latent} latent channels; SDXL takes 4 (9 for inpainting) and returns 4"
        )
    if (unet["projection_class_embeddings_input_dim"] - open_clip["projection_dim"]) % SIZE_NUMBERS:
        raise UnsupportedCheckpoint(
            f"UNet size embedding takes {unet['projection_class_embeddings_input_dim']} inputs, "
            f"not the pooled width {open_clip['projection_dim']} plus 6 equal size embeddings"
        )
