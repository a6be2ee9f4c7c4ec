"""ControlNet state dicts: original (lllyasviel) names -> diffusers names, and the architecture.

A ControlNet mirrors its UNet's encoder, so its config is read from tensor shapes the way
:mod:`dan.engine.loading.architecture.sd15` reads a checkpoint's: levels from ``down_blocks.N``,
their widths from the res blocks' ``conv2``, attention where a level has ``attentions``, the
cross-attention width from the middle block's ``attn2.to_k``, the hint embedding's widths from its
convolutions. What shapes cannot tell (head count, norm groups, ...) comes from the shipped SD1.5
config ``configs/controlnet_sd15/config.json`` (lllyasviel/sd-controlnet-canny's values).

SDXL ControlNets (diffusers' layout, as ``diffusers_xl_canny_full`` and xinsir's openpose ship)
carry the UNet's size/pooled embedding (``add_embedding``) and 2048-wide cross-attention. Their
head counts and the width of each size number's sinusoidal embedding (which has no weights) are
not in any shape: they come from the UNet the ControlNet runs with, as diffusers'
``ControlNetModel.from_unet`` takes them, else SDXL's own (64-wide heads, 256). Original
names are renamed by rule, so any depth of hint embedding and any number of levels convert (the
tiny test ControlNets as well as the real ones). Only names and shapes are read: meta tensors work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch

from dan.engine.loading.architecture.sdxl import heads
from dan.errors import EngineError

StateDict = dict[str, torch.Tensor]
ORIGINAL = "control_model."
RESNET_NAMES = {  # diffusers -> original, inside a res block
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
SD_SIGNS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
SDXL_SIGN = "add_embedding.linear_1.weight"  # the size/pooled embedding only SDXL has
SDXL_TIME_EMBED_DIM = 256  # SDXL's addition_time_embed_dim


class ControlNetError(EngineError):
    """The ControlNet file cannot be used."""


def to_diffusers_names(tensors: StateDict) -> StateDict:
    """The ControlNet tensors of a state dict in either layout, under diffusers' names.

    Other tensors (the SD checkpoint that v1.0 files carry) are dropped. Works on meta tensors.
    Raises ControlNetError when there is no ControlNet or an original-layout name is unknown.
    """
    if any(k.startswith(ORIGINAL) for k in tensors):
        tensors = {k[len(ORIGINAL) :]: v for k, v in tensors.items() if k.startswith(ORIGINAL)}
    if "input_hint_block.0.weight" in tensors:
        return _from_original(tensors)
    if "controlnet_cond_embedding.conv_in.weight" in tensors:
        return tensors
    found = (
        "a Stable Diffusion checkpoint" if _has_sd(tensors) else f"keys like {sorted(tensors)[:3]}"
    )
    raise ControlNetError(f"not a ControlNet: it holds {found}")


def _has_sd(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(SD_SIGNS) for k in tensors)


# --- original layout -> diffusers names --------------------------------------------------------


def _from_original(tensors: StateDict) -> StateDict:
    ops = _indices(tensors, "input_blocks.", ".0.op.weight")
    hints = _indices(tensors, "input_hint_block.", ".weight")
    if not ops or not hints:
        raise ControlNetError("incomplete ControlNet (no downsampler or hint block)")
    per_level = ops[0] - 1  # input_blocks 1..per_level are the first level's res blocks
    try:
        return {_diffusers_name(k, per_level, hints[-1]): v for k, v in tensors.items()}
    except KeyError as exc:
        raise ControlNetError(f"unexpected ControlNet tensor {exc}") from exc


def _indices(tensors: Mapping[str, torch.Tensor], prefix: str, suffix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
    return sorted({int(m.group(1)) for k in tensors if (m := pattern.match(k))})


def _diffusers_name(key: str, per_level: int, last_hint: int) -> str:
    """diffusers' name of the original-layout tensor ``key`` (``control_model.`` stripped)."""
    simple = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.0.0.": "add_embedding.linear_1.",  # SDXL's size/pooled embedding
        "label_emb.0.2.": "add_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "middle_block.1.": "mid_block.attentions.0.",
        "middle_block_out.0.": "controlnet_mid_block.",
        "input_hint_block.0.": "controlnet_cond_embedding.conv_in.",
        f"input_hint_block.{last_hint}.": "controlnet_cond_embedding.conv_out.",
    }
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.match(r"middle_block\.([02])\.(.*)", key):
        return f"mid_block.resnets.{int(m.group(1)) // 2}." + _resnet_name(m.group(2))
    if m := re.match(r"zero_convs\.(\d+)\.0\.(.*)", key):
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if m := re.match(r"input_hint_block\.(\d+)\.(.*)", key):
        return f"controlnet_cond_embedding.blocks.{int(m.group(1)) // 2 - 1}.{m.group(2)}"
    if m := re.match(r"input_blocks\.(\d+)\.([01])\.(.*)", key):
        return _down_block_name(int(m.group(1)), m.group(2), m.group(3), per_level)
    raise KeyError(key)


def _down_block_name(block: int, part: str, rest: str, per_level: int) -> str:
    level, slot = divmod(block - 1, per_level + 1)
    prefix = f"down_blocks.{level}."
    if slot == per_level:  # the level's last block is its downsampler
        return prefix + "downsamplers.0.conv." + rest.removeprefix("op.")
    if part == "1":
        return prefix + f"attentions.{slot}." + rest
    return prefix + f"resnets.{slot}." + _resnet_name(rest)


def _resnet_name(rest: str) -> str:
    for new, old in RESNET_NAMES.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(rest)


# --- architecture from shapes ------------------------------------------------------------------


def base_controlnet_config() -> dict[str, Any]:
    """The shipped SD1.5 ControlNet config (lllyasviel/sd-controlnet-canny's values)."""
    root = resources.files("dan.engine").joinpath("configs", "controlnet_sd15", "config.json")
    config: dict[str, Any] = json.loads(root.read_text("utf-8"))
    return config


def is_sdxl_controlnet(tensors: Mapping[str, Any]) -> bool:
    """Whether diffusers-named ControlNet tensors (or a config's keys) are an SDXL ControlNet's."""
    return SDXL_SIGN in tensors


def read_controlnet_config(
    tensors: Mapping[str, torch.Tensor], unet: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ControlNetModel config of diffusers-named ``tensors``: SD1.5's, with shapes' values;
    for an SDXL ControlNet also its size embedding, with what shapes cannot tell taken from
    ``unet`` (the config of the UNet it runs with) when given.

    Raises KeyError for a missing tensor (the caller names the file).
    """
    levels = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("down_blocks.")})
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in tensors) for i in levels]
    hint = "controlnet_cond_embedding."
    hint_blocks = len({k.split(".")[2] for k in tensors if k.startswith(hint + "blocks.")})
    mid = "mid_block.attentions.0."
    config = {
        **base_controlnet_config(),
        "in_channels": tensors["conv_in.weight"].shape[1],
        "conditioning_channels": tensors[hint + "conv_in.weight"].shape[1],
        "conditioning_embedding_out_channels": [tensors[hint + "conv_in.weight"].shape[0]]
        + [tensors[f"{hint}blocks.{i}.weight"].shape[0] for i in range(1, hint_blocks, 2)],
        "block_out_channels": [
            tensors[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in levels
        ],
        "layers_per_block": len(
            {k.split(".")[3] for k in tensors if k.startswith("down_blocks.0.resnets.")}
        ),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "cross_attention_dim": tensors[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "use_linear_projection": tensors[mid + "proj_in.weight"].ndim == 2,
    }
    if is_sdxl_controlnet(tensors):
        return {**config, **_sdxl_config(tensors, config["block_out_channels"], unet or {})}
    depth = _depth(tensors, mid)
    if depth != 1:
        config["transformer_layers_per_block"] = depth
    return config


def _sdxl_config(
    tensors: Mapping[str, torch.Tensor], widths: list[int], unet: Mapping[str, Any]
) -> dict[str, Any]:
    """An SDXL ControlNet's own settings: per-level transformer depths from the shapes, head
    counts and the size numbers' embedding width from ``unet`` (else SDXL's)."""
    # diffusers wants a depth for attention-less levels too; SDXL's config says 1.
    depths = [max(_depth(tensors, f"down_blocks.{i}.attentions.0."), 1) for i in range(len(widths))]
    return {
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": tensors[SDXL_SIGN].shape[1],
        "transformer_layers_per_block": depths,
        "attention_head_dim": unet.get("attention_head_dim", [heads(w) for w in widths]),
        "addition_time_embed_dim": unet.get("addition_time_embed_dim", SDXL_TIME_EMBED_DIM),
    }


def _depth(tensors: Mapping[str, torch.Tensor], attention: str) -> int:
    """How many transformer blocks the attention at ``attention`` (a name prefix) has."""
    prefix = attention + "transformer_blocks."
    return len({k[len(prefix) :].split(".")[0] for k in tensors if k.startswith(prefix)})
