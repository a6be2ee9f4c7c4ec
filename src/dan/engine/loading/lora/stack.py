"""kohya-format LoRAs on SD 1.x and SDXL pipelines: read from disk once, applied per task,
never leaked.

A LoRA file is read once into :class:`LoraCache` (by sha256, least recently used evicted beyond
a byte budget). :meth:`LoraStack.applied` applies any number of cached LoRAs, each with its
weight, to the UNet and the text encoder for the duration of a ``with`` block, with kohya's
scaling ``W + weight * alpha / rank * up @ down``; both key layouts of SD1 LoRAs work
(``lora_unet_down_blocks_...`` and LDM-style ``lora_unet_input_blocks_...``), and kohya's SDXL
files (LDM-style UNet names, text encoders ``lora_te1_`` and ``lora_te2_``). A LoRA of the other
family than the checkpoint's is refused before anything changes.

LyCORIS LoHa and LoKr layers (which neither diffusers nor PEFT load from kohya-format files) are
applied as A1111's Lora extension applies them: their change (:func:`lycoris_delta`) is added
to the weights for the duration of the block, and the weights saved on entry are copied back
on every exit (bit-exact; costs a copy of each changed weight for the task). Plain LoRA layers
(LoCon too) of the same file take the PEFT path below.

Design: adapters stay loaded, disabled, between tasks. Each LoRA becomes a PEFT adapter named
``dan_<sha256[:16]>`` (equal lengths: no name is a substring of another, which PEFT's key
matching needs), never fused into the base weights. Once loaded into a checkpoint's modules it
stays while the LoRA is cached; a task only switches adapters on (``set_adapter`` and
``set_scale`` on each LoRA layer) and ends by switching all of them off. Measured on a 2-core
CPU, full-size SD1.5 UNet and text encoder, rank-32 fp16 LoRA (38 MB): loading the adapter from
the cached state dict and unloading it again costs 0.7-1.4 s per task, switching resident
adapters 30-40 ms (``bench/lora_switch.py``); a UNet pass through disabled LoRA layers is as fast
as through plain ones and bit-identical to it.

Why that is safe: the base weights are never written, and a disabled PEFT layer returns exactly
``base_layer(x)``. ``applied`` enables exactly the requested adapters on entry and disables all
of them in ``finally`` (errors and cancellations included), so no task inherits another's LoRA
and outputs outside the block are bit-identical to the base checkpoint's. Adapters of LoRAs
that left the cache are deleted the next time their checkpoint applies LoRAs (device memory for
adapters: about the cache budget per checkpoint at most); :meth:`LoraStack.unload_all` removes
every LoRA layer, leaving the modules exactly as loaded.

Not for concurrent tasks on one checkpoint: ``applied`` changes modules that every pipeline
built from that checkpoint shares. :class:`LoraCache` itself is thread-safe.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.tuners_utils import BaseTunerLayer

from dan.domain import InstalledModel, LoraSpec, ModelFamily
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
SGM_BLOCKS = {
    "input_blocks": "down_blocks",
    "middle_block": "mid_block",
    "output_blocks": "up_blocks",
}
Saved = dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(weight) -> weight, its original
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


class LoraStack:
    """Applies cached LoRAs to SD 1.x / SDXL pipelines for one task at a time (see the module
    docstring).

    ``pipeline`` arguments are diffusers SD 1.x or SDXL pipelines (txt2img, img2img, inpaint,
    ControlNet: anything with ``unet``, ``text_encoder`` (and ``text_encoder_2``) and diffusers'
    LoRA loader methods). Pipelines
    built from one checkpoint's components share its modules, so any of them may be passed.
    """

    def __init__(self, cache: LoraCache) -> None:
        self.cache = cache

    @contextmanager
    def applied(
        self, pipeline: Any, loras: Sequence[tuple[InstalledModel, float]]
    ) -> Iterator[tuple[LoraSpec, ...]]:
        """Inside the block, ``pipeline`` computes with ``loras`` (each times its weight).

        The same file listed twice counts once with the weights summed; weight 0 leaves a LoRA
        out (it is still checked). Yields what was applied. On entry and on every exit all
        other adapters are disabled, so outputs outside the block are bit-identical to the
        base checkpoint's. Raises LoraError, naming the LoRA, for a corrupt or foreign file or
        one that does not fit this UNet / text encoder; the pipeline is left clean.
        """
        files = self._resolve(loras)
        saved: Saved = {}  # the weights LoHa / LoKr layers changed, with their originals
        try:
            for file, _ in files:
                _check_family(pipeline, file)
            peft = [(file, w) for file, w in files if any(file.layers.values())]
            self._drop_stale(pipeline, keep={file.adapter_name for file, _ in peft})
            for file, _ in peft:
                self._ensure_loaded(pipeline, file)
            deltas = [(d, w) for file, w in files for d in _lycoris_deltas(pipeline, file)]
            _activate(pipeline, {file.adapter_name: w for file, w in peft if w != 0})
            _add_deltas(deltas, saved)
            yield tuple(LoraSpec(model=file.model.ref, weight=w) for file, w in files)
        finally:
            _restore(saved)
            _activate(pipeline, {})

    def unload_all(self, pipeline: Any) -> None:
        """Remove every LoRA layer: the modules are again exactly as the checkpoint loaded."""
        pipeline.unload_lora_weights()

    def _resolve(
        self, loras: Sequence[tuple[InstalledModel, float]]
    ) -> list[tuple[LoraFile, float]]:
        weights: dict[str, float] = {}
        files: dict[str, LoraFile] = {}
        for model, weight in loras:
            if not math.isfinite(weight):
                raise LoraError(
                    f"LoRA {model.name!r}: weight must be a finite number, got {weight}"
                )
            files[model.sha256] = self.cache.get(model)
            weights[model.sha256] = weights.get(model.sha256, 0.0) + weight
        return [(files[sha], weights[sha]) for sha in files]

    def _drop_stale(self, pipeline: Any, *, keep: set[str]) -> None:
        """Delete this pipeline's adapters of LoRAs that left the cache (bounds device memory)."""
        stale = {n for n in _resident(pipeline) if n.startswith(ADAPTER_PREFIX)}
        stale -= self.cache.adapter_names() | keep
        for name in sorted(stale):
            _remove_adapter(pipeline, name)

    def _ensure_loaded(self, pipeline: Any, file: LoraFile) -> None:
        name = file.adapter_name
        if name in _resident(pipeline):
            return
        try:
            _load_adapter(pipeline, file)
        except Exception as exc:
            _remove_adapter(pipeline, name)
            if isinstance(exc, LoraError) or _is_device_failure(exc):
                raise
            # diffusers, PEFT and transformers raise ValueError, RuntimeError (size mismatch),
            # KeyError... for a file they cannot map onto these modules.
            raise LoraError(
                f"{file.label} does not fit this checkpoint: {_first_line(exc)}"
            ) from exc


def _load_adapter(pipeline: Any, file: LoraFile) -> None:
    """Load ``file`` as a disabled adapter; raises LoraError if a layer does not fit."""
    name = file.adapter_name
    # unet_config maps LDM-style names (input_blocks...) onto diffusers' blocks; diffusers-style
    # names pass through unchanged. The dict is copied because the conversion pops from it.
    state, alphas = pipeline.lora_state_dict(dict(file.tensors), unet_config=pipeline.unet.config)
    for component, pairs in _peft_pairs(pipeline, state).items():
        _check_fits(getattr(pipeline, component), pairs, f"{file.label} {component}")
    # As in read_lora: no inference tensors among the adapter weights (casts make new ones).
    with torch.inference_mode(False), _quiet_adapter_loading():
        if file.layers["unet"]:
            pipeline.load_lora_into_unet(
                state, alphas, unet=pipeline.unet, adapter_name=name, low_cpu_mem_usage=True
            )
        for component in ("text_encoder", "text_encoder_2"):
            if file.layers[component]:
                pipeline.load_lora_into_text_encoder(
                    state,
                    alphas,
                    text_encoder=getattr(pipeline, component),
                    prefix=component,
                    adapter_name=name,
                    low_cpu_mem_usage=True,
                )
    _activate(pipeline, {})  # loading activates the new adapter; nothing runs until asked
    for component, expected in file.layers.items():  # in case a loader skipped keys silently
        if not expected:
            continue
        found = _count_layers(getattr(pipeline, component), name)
        if found != expected:
            raise LoraError(
                f"{file.label} does not fit this checkpoint: {found} of its {expected} "
                f"{component} layers were loaded"
            )


def _peft_pairs(pipeline: Any, state: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """``state`` (diffusers' conversion of a kohya file) per component, as PEFT names them:
    ``<module path>.lora_A.weight`` / ``.lora_B.weight``, the way diffusers' loaders do."""
    pairs: dict[str, StateDict] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        prefix = component + "."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            continue
        if component == "unet":
            pairs[component] = convert_unet_state_dict_to_peft(own)
            continue
        own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
        module = getattr(pipeline, component)
        if not hasattr(module, "text_model"):  # transformers >= 5.6 dropped it
            own = {k.removeprefix("text_model."): v for k, v in own.items()}
        pairs[component] = own
    return pairs


def _check_fits(module: torch.nn.Module, pairs: StateDict, label: str) -> None:
    """Raise LoraError unless every pair names a layer of ``module`` with matching shapes.

    ``label`` is the LoRA's label and the component's name ("... unet").
    """
    layers = dict(module.named_modules())
    downs = {k.split(".lora_A.")[0]: v for k, v in pairs.items() if ".lora_A." in k}
    misfits = []
    for path, down in downs.items():
        up = pairs.get(f"{path}.lora_B.weight")
        weight = getattr(layers.get(path), "weight", None)
        if not isinstance(weight, torch.Tensor):
            misfits.append(f"{path} (no such layer)")
        elif up is None or down.shape[1:] != weight.shape[1:] or up.shape[0] != weight.shape[0]:
            misfits.append(
                f"{path} (LoRA {tuple(down.shape[1:])} -> {up.shape[0] if up is not None else '?'}"
                f", layer {tuple(weight.shape[1:])} -> {weight.shape[0]})"
            )
    if misfits:
        raise LoraError(
            f"{label} layers do not fit this checkpoint: {len(misfits)} of {len(downs)} "
            f"differ, e.g. {misfits[0]}; is it made for another base model (SDXL, SD 2.x)?"
        )


def _check_family(pipeline: Any, file: LoraFile) -> None:
    """Raise LoraError for a LoRA made for the other family than the pipeline's."""
    sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    family = ModelFamily.SDXL if sdxl else ModelFamily.SD15
    if file.family != family:
        raise LoraError(
            f"{file.label} is an {file.family.value} LoRA and this checkpoint is "
            f"{family.value}; a LoRA only works with checkpoints of its family"
        )


def _lycoris_deltas(pipeline: Any, file: LoraFile) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
        delta = lycoris_delta(layer.variant, layer.tensors, device=weight.device)
        if delta.numel() != weight.numel():
            misfits.append(
                f"{layer.module} ({layer.variant} {tuple(delta.shape)}, layer "
                f"{tuple(weight.shape)})"
            )
            continue
        deltas.append((weight, delta.reshape(weight.shape)))
    if misfits:
        raise LoraError(
            f"{file.label} layers do not fit this checkpoint: {len(misfits)} of "
            f"{len(file.lycoris)} differ, e.g. {misfits[0]}"
        )
    return deltas


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


def _add_deltas(
    deltas: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], float]],
    saved: Saved,
) -> None:
    """Add each delta times its LoRA weight to its weight, first keeping the original in
    ``saved`` (each weight once), so that :func:`_restore` puts back exactly what was there."""
    with torch.no_grad():
        for (weight, delta), multiplier in deltas:
            if multiplier == 0:
                continue
            if id(weight) not in saved:
                saved[id(weight)] = (weight, weight.detach().clone())
            weight.copy_((weight.float() + delta * multiplier).to(weight.dtype))


def _restore(saved: Saved) -> None:
    with torch.no_grad():
        for weight, original in saved.values():
            weight.copy_(original)
    saved.clear()


def _modules(pipeline: Any) -> list[torch.nn.Module]:
    """The components a LoRA changes: the UNet and the one or two text encoders."""
    names = ("unet", "text_encoder", "text_encoder_2")
    return [m for name in names if (m := getattr(pipeline, name, None)) is not None]


def _tuner_layers(pipeline: Any) -> Iterator[BaseTunerLayer]:
    for module in _modules(pipeline):
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                yield layer


def _activate(pipeline: Any, weights: Mapping[str, float]) -> None:
    """Exactly the adapters in ``weights`` compute, each scaled by its weight; ``{}``: none.

    A disabled PEFT layer returns ``base_layer(x)`` itself, hence bit-identical outputs.
    """
    names = list(weights)
    for layer in _tuner_layers(pipeline):
        if not names:
            layer.enable_adapters(False)
            continue
        layer.enable_adapters(True)
        layer.set_adapter(names, inference_mode=True)  # keeps requires_grad off
        for name, weight in weights.items():
            layer.set_scale(name, weight)  # PEFT multiplies by alpha / rank itself


def _resident(pipeline: Any) -> set[str]:
    """Adapter names loaded into the pipeline's UNet or text encoder."""
    return {
        name
        for module in _modules(pipeline)
        for name in (getattr(module, "peft_config", None) or {})
    }


def _count_layers(module: torch.nn.Module, name: str) -> int:
    return sum(
        1
        for layer in module.modules()
        if isinstance(layer, BaseTunerLayer) and name in getattr(layer, "lora_A", {})
    )


def _remove_adapter(pipeline: Any, name: str) -> None:
    """Delete adapter ``name`` wherever it is (a no-op where it is not); with no adapter left,
    remove the emptied LoRA layers too."""
    pipeline.delete_adapters([name])
    if not _resident(pipeline):
        pipeline.unload_lora_weights()


def _first_line(exc: Exception) -> str:
    """Library errors can list every tensor; a task's message needs the first line."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _is_device_failure(exc: Exception) -> bool:
    """Out of memory or a broken GPU: the engine's own handling applies, not a LoRA error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA" in str(exc)


class _DropLoadReport(logging.Filter):
    # transformers lists every other adapter's weights as "MISSING" when a second adapter is
    # loaded into the text encoder; they are untouched. Real failures raise instead.
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _quiet_adapter_loading() -> Iterator[None]:
    """Silence the two misleading messages of loading a further adapter (see above)."""
    logger = logging.getLogger("transformers.integrations.peft")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        logger.removeFilter(report_filter)
