"""LoRAs applied to SD 1.x and SDXL pipelines per task, never leaked.

:meth:`LoraStack.applied` applies any number of cached LoRAs (:mod:`.files`), each with its
weight, to the UNet and the text encoder(s) for the duration of a ``with`` block. A LoRA of the
other family than the checkpoint's is refused before anything changes. Plain LoRA layers go
through PEFT as below; LyCORIS LoHa and LoKr layers are added to the weights and put back
exactly (:mod:`.lycoris`).

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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.tuners_utils import BaseTunerLayer

from dan.domain import InstalledModel, LoraSpec, ModelFamily
from dan.engine.loading.lora.files import (
    ADAPTER_PREFIX,
    LoraCache,
    LoraError,
    LoraFile,
    StateDict,
)
from dan.engine.loading.lora.lycoris import Saved, add_deltas, lycoris_deltas, restore


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
            deltas = [(d, w) for file, w in files for d in lycoris_deltas(pipeline, file)]
            _activate(pipeline, {file.adapter_name: w for file, w in peft if w != 0})
            add_deltas(deltas, saved)
            yield tuple(LoraSpec(model=file.model.ref, weight=w) for file, w in files)
        finally:
            restore(saved)
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
