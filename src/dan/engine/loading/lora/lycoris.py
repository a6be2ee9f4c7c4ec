"""LyCORIS LoHa and LoKr layers, applied as A1111's Lora extension applies them.

Neither diffusers nor PEFT load these from kohya-format files, so their change
(:func:`lycoris_delta`) is added to the weights for the duration of a task
(:func:`add_deltas`), and the weights saved on entry are copied back on every exit
(:func:`restore`: bit-exact; costs a copy of each changed weight for the task). Plain LoRA
layers (LoCon too) of the same file take the PEFT path of :mod:`.stack`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from peft.tuners.tuners_utils import BaseTunerLayer

from dan.engine.loading.lora.files import COMPONENTS, LoraError, LoraFile

SGM_BLOCKS = {
    "input_blocks": "down_blocks",
    "middle_block": "mid_block",
    "output_blocks": "up_blocks",
}
Saved = dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(weight) -> weight, its original
Deltas = list[tuple[torch.Tensor, torch.Tensor]]  # (weight, its change at LoRA weight 1)


def lycoris_deltas(pipeline: Any, file: LoraFile) -> Deltas:
    """Each LoHa / LoKr layer of ``file`` as (the weight it changes, its change at weight 1);
    raises LoraError, changing nothing, unless every layer fits a weight of the pipeline."""
    if not file.lycoris:
        return []
    targets = _kohya_targets(pipeline)
    names = _diffusers_names([layer.module for layer in file.lycoris], pipeline.unet.config)
    deltas, misfits = [], []
    for layer in file.lycoris:
        weight = targets.get(names.get(layer.module, ""))
        if weight is None:
            misfits.append(f"{layer.module} (no such layer)")
            continue
        # From the factors' shapes first: a few kB of factors can ask for a product of
        # billions of values, which must fail the task, not exhaust the worker's memory.
        size = delta_size(layer.variant, layer.tensors)
        if size != weight.numel():
            misfits.append(
                f"{layer.module} ({layer.variant} of {size} values, layer {tuple(weight.shape)})"
            )
            continue
        delta = lycoris_delta(layer.variant, layer.tensors, device=weight.device)
        deltas.append((weight, delta.reshape(weight.shape)))
    if misfits:
        raise LoraError(
            f"{file.label} layers do not fit this checkpoint: {len(misfits)} of "
            f"{len(file.lycoris)} differ, e.g. {misfits[0]}"
        )
    return deltas


def delta_size(variant: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """How many values :func:`lycoris_delta` gives for these factors, from their shapes alone
    (-1 when the factors cannot be multiplied)."""

    def product(a: str, b: str) -> int:  # a @ b.flatten(1)
        left, right = tensors[a].shape, tensors[b].shape
        if len(left) != 2 or len(right) < 2 or left[1] != right[0]:
            return -1
        return int(left[0]) * math.prod(right[1:])

    if variant == "LoHa":
        first, second = product("hada_w1_a", "hada_w1_b"), product("hada_w2_a", "hada_w2_b")
        return first if first == second else -1
    sizes = [
        tensors[f"lokr_w{i}"].numel()
        if f"lokr_w{i}" in tensors
        else product(f"lokr_w{i}_a", f"lokr_w{i}_b")
        for i in (1, 2)
    ]
    return -1 if min(sizes) < 0 else sizes[0] * sizes[1]


def _factors(i: int) -> tuple[str, str]:
    return f"lokr_w{i}_a", f"lokr_w{i}_b"


def lycoris_delta(
    variant: str, tensors: Mapping[str, torch.Tensor], *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The change one LoHa or LoKr layer makes to its weight at LoRA weight 1, computed as
    A1111's Lora extension does (float32; flat or 4-d, the caller reshapes it):

    - LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` (rank: ``w1_b``'s rows);
    - LoKr: ``kron(w1, w2) * alpha / rank``, each factor full (``lokr_w1``) or a product
      (``lokr_w1_a @ lokr_w1_b``); rank: ``w2_b``'s rows, else ``w1_b``'s; with neither
      factor decomposed, or no alpha, the scale is 1.
    """
    t = {k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if variant == "LoHa":
        w1 = t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)
        delta = w1 * (t["hada_w2_a"] @ t["hada_w2_b"].flatten(1))
        rank: int | None = t["hada_w1_b"].shape[0]
    else:
        factors = [
            t[f"lokr_w{i}"] if f"lokr_w{i}" in t else t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"]
            for i in (1, 2)
        ]
        w1, w2 = factors
        if w2.ndim == 4:  # a full convolution factor: kron over the kernel dims too
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
        decomposed = [t[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in t]
        rank = decomposed[0].shape[0] if decomposed else None
    scale = alpha / rank if alpha is not None and rank else 1.0
    return delta * scale


def _kohya_targets(pipeline: Any) -> dict[str, torch.Tensor]:
    """The weights of the pipeline's linear and convolution layers by kohya name
    (``lora_unet_down_blocks_0_...``, ``lora_te1_text_model_...``), under any PEFT wrapper."""
    targets: dict[str, torch.Tensor] = {}
    for prefix, component in COMPONENTS.items():
        module = getattr(pipeline, component, None)
        if module is None:
            continue
        text = component != "unet" and not hasattr(module, "text_model")
        for path, layer in module.named_modules():
            if ".base_layer" in path or ".lora_" in path:
                continue  # PEFT's own parts of a wrapped layer
            if isinstance(layer, BaseTunerLayer):
                layer = layer.get_base_layer()
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                name = ("text_model." if text else "") + path
                targets[prefix + name.replace(".", "_")] = layer.weight
    return targets


def _diffusers_names(modules: list[str], unet_config: Any) -> dict[str, str]:
    """kohya module names -> the same in diffusers' UNet layout (LDM-style ``input_blocks``
    names, as in SDXL files, are mapped the way diffusers maps them for plain LoRAs)."""
    unet = {m: m for m in modules if m.startswith("lora_unet_")}
    try:
        mapped = _maybe_map_sgm_blocks_to_diffusers(dict(unet), unet_config)
    except (ValueError, IndexError, KeyError):
        mapped = unet  # unmappable names are reported as missing layers
    names = {original: _renamed_blocks(new) for new, original in mapped.items()}
    return {m: names.get(m, m) for m in modules}


def _renamed_blocks(name: str) -> str:
    """diffusers' block names for the ones its SGM mapping leaves (as its kohya conversion)."""
    for sgm, diffusers in SGM_BLOCKS.items():
        name = name.replace(sgm, diffusers)
    return name


def add_deltas(
    deltas: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], float]],
    saved: Saved,
) -> None:
    """Add each delta times its LoRA weight to its weight, first keeping the original in
    ``saved`` (each weight once), so that :func:`restore` puts back exactly what was there."""
    with torch.no_grad():
        for (weight, delta), multiplier in deltas:
            if multiplier == 0:
                continue
            if id(weight) not in saved:
                saved[id(weight)] = (weight, weight.detach().clone())
            weight.copy_((weight.float() + delta * multiplier).to(weight.dtype))


def restore(saved: Saved) -> None:
    with torch.no_grad():
        for weight, original in saved.values():
            weight.copy_(original)
    saved.clear()
