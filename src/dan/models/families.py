"""Which model family a file belongs to, read from its tensor names without loading it.

The API process must not import torch, so only the JSON header of a ``.safetensors`` file is
read (its first bytes: an 8-byte length, then the tensor names and shapes). The signs are the
key names the engine's loaders go by (:mod:`dan.engine.families`):

- checkpoints: SDXL's text encoders sit under ``conditioner.embedders.`` (the SGM layout);
- LoRAs: kohya's SDXL files name two text encoders, ``lora_te1_`` and ``lora_te2_``; a file
  that trains the UNet only shows SDXL by its transformer depth (``transformer_blocks_1`` and
  deeper: SD 1.x and 2.x UNets have one transformer block per attention);
- ControlNets: SDXL's carry the size/pooled embedding (``add_embedding`` in diffusers' layout,
  ``label_emb`` in the original one);
- embeddings: SDXL's hold ``clip_l`` and ``clip_g`` vectors, SD 1.x's ``emb_params``.

Anything else is SD 1.x. A pickled file (``.ckpt``/``.pt``/``.pth``) cannot be read without
unpickling it, so it counts as SD 1.x: SDXL files are distributed as safetensors.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from dan.domain import ModelFamily, ModelKind

HEADER_LIMIT = 100_000_000  # safetensors' own limit on the header size
SDXL_SIGNS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.CHECKPOINT: ("conditioner.embedders.",),
    ModelKind.LORA: ("lora_te1_", "lora_te2_"),
    ModelKind.CONTROLNET: ("add_embedding.", "control_model.label_emb.", "label_emb."),
    ModelKind.EMBEDDING: ("clip_g",),  # SDXL embeddings hold one tensor per text encoder
}
SDXL_LORA_UNET = re.compile(r"lora_unet_.*_transformer_blocks_(?:[1-9]|\d{2,})_")

# Layers of a kohya-format LoRA file: ``<lora_unet_/lora_te*_ module>.<suffix>``. The engine
# applies plain LoRA (and LoCon: the same tensors on convolutions), LoHa and LoKr layers.
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_VARIANTS: dict[str, tuple[str, ...]] = {
    "LoRA": ("lora_down.weight", "lora_up.weight"),
    "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LoKr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
# The LyCORIS / kohya variants it does not apply, by a tensor suffix that only they have.
UNSUPPORTED_LORA_VARIANTS: dict[str, str] = {
    "hada_t1": "LoHa with Tucker decomposition (hada_t1)",
    "hada_t2": "LoHa with Tucker decomposition (hada_t2)",
    "lokr_t2": "LoKr with Tucker decomposition (lokr_t2)",
    "lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)",
    "dora_scale": "DoRA (dora_scale)",
    "diff": "full weight differences (diff)",
    "diff_b": "full weight differences (diff_b)",
    "on_input": "(IA)^3 (on_input)",
    "oft_blocks": "OFT (oft_blocks)",
    "oft_diag": "OFT (oft_diag)",
    "a1.weight": "GLoRA (a1)",
    "w_norm": "norm-layer LyCORIS (w_norm)",
    "b_norm": "norm-layer LyCORIS (b_norm)",
}


def family_of_file(kind: ModelKind, path: Path) -> ModelFamily | None:
    """The family of the ``kind`` file at ``path``; None for kinds that have none (upscalers,
    interrogators, ...) and for VAEs (SD 1.x and SDXL VAEs have the same tensors). Raises
    OSError when the file cannot be read."""
    signs = SDXL_SIGNS.get(kind)
    if signs is None:
        return None
    keys = tensor_names(path) if path.suffix.lower() == ".safetensors" else []
    if kind == ModelKind.LORA:
        return lora_family(keys)
    sdxl = any(key.startswith(signs) for key in keys)
    return ModelFamily.SDXL if sdxl else ModelFamily.SD15


def lora_family(keys: list[str]) -> ModelFamily:
    """The family of a kohya-format LoRA (any variant) with these tensor names."""
    sdxl = any(
        key.startswith(SDXL_SIGNS[ModelKind.LORA]) or SDXL_LORA_UNET.match(key) for key in keys
    )
    return ModelFamily.SDXL if sdxl else ModelFamily.SD15


def lora_variants(keys: list[str]) -> set[str]:
    """The variants (``LoRA``, ``LoHa``, ``LoKr``) of a kohya-format LoRA's layers."""
    suffixes = {key.partition(".")[2] for key in keys if key.startswith(LORA_PREFIXES)}
    return {name for name, own in LORA_VARIANTS.items() if suffixes & set(own)}


def unsupported_lora_variant(keys: list[str]) -> str | None:
    """The first LoRA variant among these tensor names that DAN cannot apply, described for a
    message (e.g. ``DoRA (dora_scale)``); None when every layer is plain LoRA, LoHa or LoKr."""
    for key in keys:
        if key.startswith(LORA_PREFIXES):
            variant = UNSUPPORTED_LORA_VARIANTS.get(key.partition(".")[2])
            if variant is not None:
                return variant
    return None


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file's header ([] when it has no valid header:
    the engine says what is wrong with such a file when it loads it)."""
    try:
        header, _ = safetensors_header(path)
    except ValueError:
        return []
    return [key for key in header if key != "__metadata__"]


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a ``.safetensors`` file (tensor name -> ``dtype``, ``shape`` and
    ``data_offsets``, plus ``__metadata__``) as the file declares it, unchecked, and the
    offset where the data its ``data_offsets`` count from starts. Reads at most
    :data:`HEADER_LIMIT` bytes. Raises ValueError, saying why, when the file has no valid
    header, and OSError when it cannot be read."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError("the file is shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > HEADER_LIMIT:
            raise ValueError(f"it declares a {length}-byte header (at most {HEADER_LIMIT})")
        text = file.read(length)
    if len(text) < length:
        raise ValueError(f"it declares a {length}-byte header but holds {len(text)} bytes")
    try:
        header = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ValueError(f"its header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    return header, 8 + length
