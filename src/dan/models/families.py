"""Which model family a file belongs to, read from its tensor names without loading it.

The API process must not import torch, so only the JSON header of a ``.safetensors`` file is
read (its first bytes: an 8-byte length, then the tensor names and shapes). The signs are the
key names the engine's loaders go by (:mod:`dan.engine.families`):

- checkpoints: SDXL's text encoders sit under ``conditioner.embedders.`` (the SGM layout);
- LoRAs: kohya's SDXL files name two text encoders, ``lora_te1_`` and ``lora_te2_``;
- ControlNets: SDXL's carry the size/pooled embedding (``add_embedding`` in diffusers' layout,
  ``label_emb`` in the original one);
- embeddings: SDXL's hold ``clip_l`` and ``clip_g`` vectors, SD 1.x's ``emb_params``.

Anything else is SD 1.x. A pickled file (``.ckpt``/``.pt``/``.pth``) cannot be read without
unpickling it, so it counts as SD 1.x: SDXL files are distributed as safetensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from dan.domain import ModelFamily, ModelKind

HEADER_LIMIT = 100_000_000  # safetensors' own limit on the header size
SDXL_SIGNS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.CHECKPOINT: ("conditioner.embedders.",),
    ModelKind.LORA: ("lora_te1_", "lora_te2_"),
    ModelKind.CONTROLNET: ("add_embedding.", "control_model.label_emb.", "label_emb."),
    ModelKind.EMBEDDING: ("clip_g",),  # SDXL embeddings hold one tensor per text encoder
}


def family_of_file(kind: ModelKind, path: Path) -> ModelFamily | None:
    """The family of the ``kind`` file at ``path``; None for kinds that have none (upscalers,
    interrogators, ...) and for VAEs (SD 1.x and SDXL VAEs have the same tensors). Raises
    OSError when the file cannot be read."""
    signs = SDXL_SIGNS.get(kind)
    if signs is None:
        return None
    keys = tensor_names(path) if path.suffix.lower() == ".safetensors" else []
    sdxl = any(key.startswith(signs) for key in keys)
    return ModelFamily.SDXL if sdxl else ModelFamily.SD15


def tensor_names(path: Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file's header ([] when it has no valid header:
    the engine says what is wrong with such a file when it loads it)."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return []
        (length,) = struct.unpack("<Q", prefix)
        if length > HEADER_LIMIT:
            return []
        try:
            header = json.loads(file.read(length))
        except ValueError:
            return []
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else []
