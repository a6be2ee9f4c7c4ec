"""Reading an SD1.x checkpoint's architecture from its tensor shapes, never from its name.

AUTOMATIC1111-layout files carry no config, so every value a diffusers config needs is read from
the shape of one tensor (the way ComfyUI's model detection does) or from how many numbered blocks
there are:

- UNet (``model.diffusion_model.``): input and output channels from ``input_blocks.0.0`` and
  ``out.2``; the down path's levels from ``input_blocks.N``, split at the downsampling ``op``s,
  each level's width from its res blocks' ``out_layers.3`` and its transformer depth from how
  many ``transformer_blocks`` follow them; the cross-attention width from the middle block's
  ``attn2.to_k``; a 2-D ``proj_in`` (linear, not a 1x1 conv) sets ``use_linear_projection``.
- VAE (``first_stage_model.``): image channels from ``encoder.conv_in`` and
  ``decoder.conv_out``, the latent channels from ``decoder.conv_in``, each level's width from
  its last res block's ``conv2``.
- CLIP text encoder (``cond_stage_model.transformer.``): vocabulary and width from the token
  embedding, positions from the position embedding, the MLP width from ``fc1``, the layer count
  from ``encoder.layers.N``.

What shapes cannot tell comes from SD1.x's conventions (8 UNet heads, 64-wide CLIP heads) and
from the SD1.5 configs shipped in ``dan/engine/configs/sd15`` (norm groups, the scheduler, ...).

Why shapes: nothing is looked up by file name or hash and nothing is downloaded, so a real 2 GB
checkpoint, a fine-tune, an inpainting model and the tiny test models all take the same path,
and the tests exercise the code that loads real files. Only key names and shapes are read, so
``meta`` or empty tensors work too. Other model families (SDXL, SD 2.x, ControlNets, LoRAs) are
refused by their key names first, and every refusal says what was found instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch

from dan.errors import UnsupportedCheckpoint

Variant = Literal["sd1", "sd1-inpaint"]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Files saved with old transformers versions lack the ``text_model.`` level; both are in the wild.
CLIP_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
SD1_HEADS = 8  # SD1.x fixes the head count, not the head width; shapes cannot tell it
TOKENIZER_VOCAB = 49408  # the size of dan.engine.loading.tokenizer's vocabulary
TOKENIZER_LENGTH = 77
CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
CONFIG_FORMAT = 1  # part of the folder digest: bump it when the folder's layout changes
FOREIGN_SIGNS = (  # (key prefix, what it shows) for other model families
    ("conditioner.embedders.", "SDXL-style text encoders (conditioner.embedders.*)"),
    ("cond_stage_model.model.", "an OpenCLIP text encoder (cond_stage_model.model.*), as SD 2.x"),
    (UNET + "label_emb.", "a UNet class embedding (label_emb), as SDXL or the x4 upscaler"),
    (UNET + "joint_blocks.", "an MMDiT transformer, as SD3"),
    (UNET + "double_blocks.", "a Flux transformer"),
    ("control_model.", "a ControlNet"),
    ("lora_", "LoRA weights (install them as a LoRA)"),
)
SD1_PARTS = ((UNET, "UNet"), (VAE, "VAE"), (CLIP_PREFIXES[1], "CLIP text encoder"))
# The ranks a tensor read for its shape may have: a convolution's weight, a linear layer's (or
# an embedding table's).
CONV, LINEAR = (4,), (2,)


@dataclass(frozen=True)
class Sd1Architecture:
    """What a checkpoint holds: diffusers configs for its three models (base SD1.5 + shapes)."""

    variant: Variant
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]

    def config_files(self) -> dict[str, dict[str, Any]]:
        """Every file of the config folder, keyed like :data:`CONFIG_FILES`."""
        base = base_configs()
        models = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return {**base, **models}

    @property
    def digest(self) -> str:
        """A short hash naming the config folder; equal configs share one folder."""
        canonical = json.dumps([CONFIG_FORMAT, self.config_files()], sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def base_configs() -> dict[str, dict[str, Any]]:
    """The SD1.5 configs shipped in ``dan/engine/configs/sd15``, keyed like CONFIG_FILES."""
    root = resources.files("dan.engine").joinpath("configs", "sd15")
    return {
        name: json.loads(root.joinpath(*relative.split("/")).read_text("utf-8"))
        for name, relative in CONFIG_FILES.items()
    }


@dataclass(frozen=True)
class _Level:
    """One resolution level of the UNet's down path."""

    channels: int
    res_blocks: int
    depth: int  # transformer blocks per attention; 0 where the level has no attention


def read_sd1_architecture(state_dict: Mapping[str, torch.Tensor]) -> Sd1Architecture:
    """The architecture of an A1111-layout SD1.x state dict, read from its tensor shapes only.

    Works on real, meta or empty tensors. Values that shapes cannot tell (head counts, norm
    groups, scheduler) are SD1.5's. Raises UnsupportedCheckpoint, naming what was found, for
    SDXL, SD 2.x, ControlNets, LoRAs and anything else that is not an SD1.x checkpoint.
    """
    keys = list(state_dict)
    problem = _not_sd1(keys)
    if problem:
        width = _cross_attention_width(state_dict)
        found = f"; UNet cross-attention width {width} (SD1.x: 768)" if width else ""
        raise UnsupportedCheckpoint(f"not a Stable Diffusion 1.x checkpoint: {problem}{found}")
    unet = _read_unet(state_dict, keys)
    vae = _read_vae(state_dict, keys)
    text_encoder = _read_text_encoder(state_dict, keys)
    _check_consistent(unet, vae, text_encoder)
    base = base_configs()
    return Sd1Architecture(
        variant="sd1" if unet["in_channels"] == vae["latent_channels"] else "sd1-inpaint",
        unet={**base["unet"], **unet},
        vae={**base["vae"], **vae},
        text_encoder={**base["text_encoder"], **text_encoder},
    )


def _has(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _not_sd1(keys: list[str]) -> str | None:
    """Why the keys are not an SD1.x checkpoint, when the names alone show it."""
    foreign = next((what for prefix, what in FOREIGN_SIGNS if _has(keys, prefix)), None)
    missing = (f"no {what} ({prefix}*)" for prefix, what in SD1_PARTS if not _has(keys, prefix))
    return foreign or next(missing, None)


def _cross_attention_width(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    key = next(
        (k for k in state_dict if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None
    )
    shape = tuple(state_dict[key].shape) if key else ()
    return int(shape[-1]) if shape else None


def _shape(
    state_dict: Mapping[str, torch.Tensor], key: str, ranks: tuple[int, ...]
) -> tuple[int, ...]:
    """The shape of ``key``, which must have one of ``ranks`` dimensions (a 0-d tensor where
    a convolution belongs would otherwise surface as torch's IndexError)."""
    tensor = state_dict.get(key)
    if tensor is None:
        raise UnsupportedCheckpoint(f"not a Stable Diffusion 1.x checkpoint: no tensor {key}")
    shape = tuple(tensor.shape)
    if len(shape) not in ranks:
        expected = " or ".join(f"{rank}-d" for rank in ranks)
        raise UnsupportedCheckpoint(f"tensor {key} has shape {list(shape)}; it must be {expected}")
    return shape


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """The sorted numbers N of keys ``<prefix>N.*``."""
    found = {k[len(prefix) :].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return sorted(int(n) for n in found if n.isdigit())


def _read_unet(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
    levels = _unet_levels(state_dict, keys)
    depth = _transformer_depth(
        levels, len(_indices(keys, UNET + "middle_block.1.transformer_blocks."))
    )
    attention = [level.depth > 0 for level in levels]
    context = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    config: dict[str, Any] = {
        "in_channels": _shape(state_dict, UNET + "input_blocks.0.0.weight", CONV)[1],
        "out_channels": _shape(state_dict, UNET + "out.2.weight", CONV)[0],
        "block_out_channels": [level.channels for level in levels],
        "layers_per_block": levels[0].res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        "cross_attention_dim": _shape(state_dict, context, LINEAR)[1],
        "attention_head_dim": SD1_HEADS,
    }
    # Only values SD1.5 does not have are added, so SD1.5 yields exactly the shipped config.
    if depth != 1:
        config["transformer_layers_per_block"] = depth
    if len(_shape(state_dict, UNET + "middle_block.1.proj_in.weight", LINEAR + CONV)) == 2:
        config["use_linear_projection"] = True
    return config


def _transformer_depth(levels: list[_Level], mid_depth: int) -> int:
    """The one transformer depth of every attention; checks that 8 heads fit each width."""
    depths = {level.depth for level in levels if level.depth} | {mid_depth}
    if len(depths) != 1 or 0 in depths or len({level.res_blocks for level in levels}) != 1:
        raise UnsupportedCheckpoint(f"irregular UNet (levels {levels}, middle depth {mid_depth})")
    widths = [level.channels for level in levels if level.depth] + [levels[-1].channels]
    if any(width % SD1_HEADS for width in widths):
        raise UnsupportedCheckpoint(f"UNet attention widths {widths} do not split into 8 heads")
    return mid_depth


def _unet_levels(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> list[_Level]:
    """The down path's levels; ``input_blocks`` 1.. are res blocks, each level ending in an op."""
    prefix = UNET + "input_blocks."
    levels: list[_Level] = []
    blocks: list[tuple[int, int]] = []  # (channels, transformer depth) of the open level
    for i in _indices(keys, prefix)[1:]:
        block = f"{prefix}{i}."
        if block + "0.op.weight" in state_dict:
            levels.append(_level_of(blocks))
            blocks = []
            continue
        channels = _shape(state_dict, block + "0.out_layers.3.weight", CONV)[0]
        blocks.append((channels, len(_indices(keys, block + "1.transformer_blocks."))))
    levels.append(_level_of(blocks))
    return levels


def _level_of(blocks: list[tuple[int, int]]) -> _Level:
    if len(set(blocks)) != 1:
        raise UnsupportedCheckpoint(f"irregular UNet level: (channels, depth) of blocks {blocks}")
    channels, depth = blocks[0]
    return _Level(channels=channels, res_blocks=len(blocks), depth=depth)


def _read_vae(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
    encoder = VAE + "encoder."
    levels = _indices(keys, encoder + "down.")
    res_blocks = len(_indices(keys, encoder + "down.0.block."))
    last = res_blocks - 1
    return {
        "in_channels": _shape(state_dict, encoder + "conv_in.weight", CONV)[1],
        "out_channels": _shape(state_dict, VAE + "decoder.conv_out.weight", CONV)[0],
        "block_out_channels": [
            _shape(state_dict, f"{encoder}down.{i}.block.{last}.conv2.weight", CONV)[0]
            for i in levels
        ],
        "layers_per_block": res_blocks,
        "latent_channels": _shape(state_dict, VAE + "decoder.conv_in.weight", CONV)[1],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }


def clip_prefix(keys: Iterable[str]) -> str:
    """The CLIP text encoder's key prefix in these keys (with or without ``text_model.``)."""
    return CLIP_PREFIXES[0] if _has(keys, CLIP_PREFIXES[0]) else CLIP_PREFIXES[1]


def _read_text_encoder(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, Any]:
    prefix = clip_prefix(keys)
    vocab, hidden = _shape(state_dict, prefix + "embeddings.token_embedding.weight", LINEAR)
    fc1 = prefix + "encoder.layers.0.mlp.fc1.weight"
    positions = prefix + "embeddings.position_embedding.weight"
    return {
        "hidden_size": hidden,
        "intermediate_size": _shape(state_dict, fc1, LINEAR)[0],
        "max_position_embeddings": _shape(state_dict, positions, LINEAR)[0],
        "num_attention_heads": _clip_heads(hidden),
        "num_hidden_layers": len(_indices(keys, prefix + "encoder.layers.")),
        "vocab_size": vocab,
    }


def _clip_heads(hidden: int) -> int:
    """OpenAI's CLIP text towers use 64-wide heads (ViT-L/14: 768 -> 12). Widths that are not a
    multiple of 64 only occur in test models; they get 8-wide heads."""
    return hidden // 64 if hidden % 64 == 0 else max(1, hidden // 8)


def _check_consistent(unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any]) -> None:
    latent = vae["latent_channels"]
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise UnsupportedCheckpoint(
            f"UNet cross-attention width {unet['cross_attention_dim']} does not match the CLIP "
            f"text encoder's width {text['hidden_size']} (SD1.x: 768 for both)"
        )
    # Inpainting UNets also take the mask and the masked image's latents: 4 + 1 + 4 channels.
    if unet["in_channels"] not in (latent, 2 * latent + 1) or unet["out_channels"] != latent:
        raise UnsupportedCheckpoint(
            f"UNet maps {unet['in_channels']} -> {unet['out_channels']} channels with "
            f"{latent} latent channels; SD1.x takes 4 (9 for inpainting) and returns 4"
        )
    if text["vocab_size"] < TOKENIZER_VOCAB or text["max_position_embeddings"] < TOKENIZER_LENGTH:
        raise UnsupportedCheckpoint(
            f"CLIP text encoder has {text['vocab_size']} tokens and "
            f"{text['max_position_embeddings']} positions; SD1.x: 49408 and 77"
        )
