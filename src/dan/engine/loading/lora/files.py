"""kohya-format LoRA files: read from disk once, checked, cached by sha256.

:func:`read_lora` reads a file and sorts its layers: plain LoRA (and LoCon) pairs
(``lora_down`` / ``lora_up``, kohya's scaling ``W + weight * alpha / rank * up @ down``), which
become PEFT adapters (:mod:`.stack`), and LyCORIS LoHa / LoKr layers (:mod:`.lycoris`). Both key
layouts of SD1 LoRAs are read (``lora_unet_down_blocks_...`` and LDM-style
``lora_unet_input_blocks_...``), and kohya's SDXL files (LDM-style UNet names, text encoders
``lora_te1_`` and ``lora_te2_``). Only the file is checked here (names, pairs, ranks, the
family its keys belong to); whether it fits a checkpoint is known when it is applied.

:class:`LoraCache` keeps read files by sha256, least recently used evicted beyond a byte budget;
it is thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dan.domain import InstalledModel, ModelFamily
from dan.engine.loading.checkpoint import read_state_dict
from dan.errors import EngineError, UnsupportedCheckpoint
from dan.models.families import (
    LORA_VARIANTS,
    lora_family,
    unsupported_lora_variant,
)

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "dan_"
# kohya prefix -> pipeline component (SD 1.x: lora_te_; SDXL: lora_te1_ and lora_te2_)
COMPONENTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
LYCORIS_SUFFIXES = {*LORA_VARIANTS["LoHa"], *LORA_VARIANTS["LoKr"], "alpha"}
StateDict = dict[str, torch.Tensor]
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


class LoraError(EngineError):
    """This LoRA cannot be applied: the file is corrupt, not a kohya LoRA, or made for another
    base model."""


@dataclass(frozen=True)
class Lycoris:
    """One LoHa or LoKr layer of a file: ``tensors`` by suffix (``hada_w1_a``, ``lokr_w1``,
    ``alpha``...), for the module kohya names ``module`` in ``component``."""

    variant: str  # "LoHa" / "LoKr"
    component: str
    module: str
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LoraFile:
    """A kohya LoRA as read from disk. ``tensors`` are shared, never modified in place.

    Plain LoRA (and LoCon) layers are in ``tensors`` and become a PEFT adapter; LoHa and LoKr
    layers are in ``lycoris`` and are added to the weights they change for one task.
    """

    model: InstalledModel
    family: ModelFamily
    tensors: Mapping[str, torch.Tensor]  # the plain LoRA layers only
    layers: Mapping[str, int]  # component -> how many modules its plain LoRA layers change
    lycoris: tuple[Lycoris, ...]
    nbytes: int

    @property
    def adapter_name(self) -> str:
        return adapter_name(self.model.sha256)

    @property
    def label(self) -> str:
        """How messages name it."""
        return f"LoRA {self.model.name!r} ({self.model.sha256[:10]})"


def adapter_name(sha256: str) -> str:
    """The PEFT adapter name of a LoRA file."""
    return ADAPTER_PREFIX + sha256[:16]


def read_lora(model: InstalledModel, *, allow_ckpt: bool = False) -> LoraFile:
    """Read and check a kohya LoRA file (``.safetensors``; pickles only with ``allow_ckpt``).

    Only the file is checked here (names, pairs, ranks); whether it fits a checkpoint is known
    when it is applied. Raises LoraError naming the LoRA.
    """
    label = f"LoRA {model.name!r} ({model.sha256[:10]})"
    try:
        # Not inference tensors, even when called under inference_mode: they become adapter
        # weights, which PEFT's requires_grad bookkeeping must be able to touch later.
        with torch.inference_mode(False):
            tensors = read_state_dict(model.path, allow_ckpt=allow_ckpt)
    except UnsupportedCheckpoint as exc:
        raise LoraError(f"{label}: {exc.message}") from exc
    plain, lycoris = _check_kohya(tensors, label)
    layers = dict.fromkeys(COMPONENTS.values(), 0)
    for key in plain:
        if key.endswith(".lora_down.weight"):
            _check_pair(plain, key.removesuffix(".lora_down.weight"), label)
            layers[_component(key)] += 1
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    family = lora_family(list(tensors))
    return LoraFile(model, family, plain, layers, lycoris, nbytes)


def _component(key: str) -> str:
    return next(c for p, c in COMPONENTS.items() if key.startswith(p))


def _check_kohya(
    tensors: Mapping[str, torch.Tensor], label: str
) -> tuple[StateDict, tuple[Lycoris, ...]]:
    """The plain LoRA tensors and the LyCORIS layers of a kohya-format file; raises LoraError
    for anything else."""
    if any(key.startswith(CHECKPOINT_PREFIXES) for key in tensors):
        raise LoraError(f"{label} is a Stable Diffusion checkpoint, not a LoRA")
    foreign = next((k for k in tensors if not k.startswith(tuple(COMPONENTS))), None)
    if foreign is not None:
        raise LoraError(
            f"{label} is not a kohya LoRA (keys lora_unet_* / lora_te*_*): found {foreign!r}"
        )
    unsupported = unsupported_lora_variant(list(tensors))
    if unsupported is not None:
        raise LoraError(f"{label} holds {unsupported} layers, which DAN does not apply")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, suffix = key.partition(".")
        if suffix not in LORA_SUFFIXES and suffix not in LYCORIS_SUFFIXES:
            raise LoraError(
                f"{label} holds {key!r}: only LoRA / LoCon (lora_down, lora_up), LoHa (hada_*) "
                "and LoKr (lokr_*) layers are supported"
            )
        modules.setdefault(module, {})[suffix] = tensor
    plain: StateDict = {}
    lycoris = []
    for module, parts in modules.items():
        variant = _variant(parts, f"{label}: {module}")
        if variant == "LoRA":
            plain.update({f"{module}.{suffix}": t for suffix, t in parts.items()})
        else:
            lycoris.append(Lycoris(variant, _component(module), module, parts))
    if not plain and not lycoris:
        raise LoraError(f"{label} holds no LoRA layers (no *.lora_down.weight, hada_*, lokr_*)")
    return plain, tuple(lycoris)


def _variant(parts: Mapping[str, torch.Tensor], where: str) -> str:
    """Which variant one module's tensors are, checking that they are complete."""
    found = [name for name, own in LORA_VARIANTS.items() if set(parts) & set(own)]
    if len(found) != 1:
        raise LoraError(
            f"{where} has {' and '.join(found) or 'no'} layer tensors; expected one kind"
        )
    variant = found[0]
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise LoraError(f"{where}.alpha is not a single number")
    if variant == "LoRA":
        if "lora_down.weight" not in parts:
            raise LoraError(f"{where} has lora_up but no lora_down")
        return variant
    if variant == "LoHa":
        missing = [s for s in LORA_VARIANTS["LoHa"] if s not in parts]
    else:
        missing = [
            f"lokr_w{i} or lokr_w{i}_a/_b"
            for i in (1, 2)
            if f"lokr_w{i}" not in parts and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(parts)
        ]
    if missing:
        raise LoraError(f"{where} is an incomplete {variant} layer: no {', '.join(missing)}")
    return variant


def _check_pair(tensors: Mapping[str, torch.Tensor], name: str, label: str) -> None:
    down, up = tensors[f"{name}.lora_down.weight"], tensors.get(f"{name}.lora_up.weight")
    alpha = tensors.get(f"{name}.alpha")
    if up is None:
        raise LoraError(f"{label}: {name} has lora_down but no lora_up")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise LoraError(
            f"{label}: {name} has mismatched shapes down {tuple(down.shape)}, up {tuple(up.shape)}"
        )
    if alpha is not None and alpha.numel() != 1:
        raise LoraError(f"{label}: {name}.alpha is not a single number")


class LoraCache:
    """LoRA files by sha256, each read from disk once, least recently used evicted beyond
    ``budget_bytes``. The entry just read is kept even when it alone exceeds the budget."""

    def __init__(self, budget_bytes: int, *, allow_ckpt: bool = False) -> None:
        self._budget = budget_bytes
        self._allow_ckpt = allow_ckpt
        self._entries: OrderedDict[str, LoraFile] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files read from disk, for tests and logs

    def get(self, model: InstalledModel) -> LoraFile:
        """The LoRA of ``model``, read now if not cached. Raises LoraError (nothing cached)."""
        with self._lock:
            entry = self._entries.get(model.sha256)
            if entry is None:
                self.reads += 1
                entry = read_lora(model, allow_ckpt=self._allow_ckpt)
                self._entries[model.sha256] = entry
            self._entries.move_to_end(model.sha256)
            self._evict()
            return entry

    def adapter_names(self) -> set[str]:
        """Adapter names of the cached LoRAs."""
        with self._lock:
            return {entry.adapter_name for entry in self._entries.values()}

    def cached(self) -> list[str]:
        """sha256 of the cached LoRAs, least recently used first."""
        with self._lock:
            return list(self._entries)

    def _evict(self) -> None:
        while len(self._entries) > 1 and self._total() > self._budget:
            _, entry = self._entries.popitem(last=False)
            log.info("dropped %s from the LoRA cache (memory budget)", entry.label)

    def _total(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())
