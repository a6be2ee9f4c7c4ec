"""DiffusersEngine: Stable Diffusion 1.x on diffusers, with warm pipelines."""

from __future__ import annotations

import logging
import platform
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import StableDiffusionPipeline
from PIL.Image import Image

from dan.config import Settings
from dan.domain import (
    GenerationRequest,
    Img2ImgRequest,
    InstalledModel,
    ModelFiles,
    ProgressCallback,
    UpscaleRequest,
)
from dan.engine.checkpoint import load_sd_pipeline
from dan.engine.detect import Sd1Architecture
from dan.engine.prompts import encode_prompts
from dan.engine.samplers import make_scheduler
from dan.errors import EngineError, FatalEngineError

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is fastest."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise."""
    if setting != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            setting
        ]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass
class LoadedCheckpoint:
    pipeline: StableDiffusionPipeline
    architecture: Sd1Architecture
    size_bytes: int


class PipelineCache:
    """Loaded checkpoints by sha256, least recently used evicted beyond a memory budget.

    The entry in use is never evicted, so one checkpoint larger than the budget still loads.
    """

    def __init__(self, budget_bytes: int, load: Any) -> None:
        self._budget = budget_bytes
        self._load = load
        self._entries: OrderedDict[str, LoadedCheckpoint] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, model: InstalledModel) -> LoadedCheckpoint:
        with self._lock:
            entry = self._entries.get(model.sha256)
            if entry is None:
                entry = self._load(model)
                self.loads += 1
                self._entries[model.sha256] = entry
            self._entries.move_to_end(model.sha256)
            self._evict()
            return entry

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _evict(self) -> None:
        while len(self._entries) > 1 and self._total() > self._budget:
            sha, _ = self._entries.popitem(last=False)
            log.info("unloaded checkpoint %s (memory budget)", sha[:10])

    def _total(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())


def _pipeline_bytes(pipeline: StableDiffusionPipeline) -> int:
    modules = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class DiffusersEngine:
    """The Engine of DAN workers (see dan.engine.base.Engine for the contract)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        # torchsde warns on float rounding of Karras sigmas (t slightly below t0); harmless.
        warnings.filterwarnings("ignore", message="Should have ta>=t0", category=UserWarning)
        self.pipelines = PipelineCache(settings.pipeline_cache_bytes, self._load)

    def describe(self) -> dict[str, str]:
        name = (
            torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor()
        )
        return {
            "device": str(self.device),
            "device_name": name or "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        }

    def txt2img(
        self, request: GenerationRequest, files: ModelFiles, progress: ProgressCallback
    ) -> list[Image]:
        loaded = self.pipelines.get(files[request.model.sha256])
        try:
            return self._txt2img(loaded.pipeline, request, progress)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise EngineError(
                f"out of GPU memory at {request.width}x{request.height}; try a smaller size"
            ) from exc
        except RuntimeError as exc:
            if "CUDA" in str(exc) or "cuDNN" in str(exc):
                raise FatalEngineError(f"the GPU failed: {exc}") from exc
            raise EngineError(f"generation failed: {exc}") from exc

    def img2img(
        self,
        request: Img2ImgRequest,
        init_image: Image,
        mask: Image | None,
        files: ModelFiles,
        progress: ProgressCallback,
    ) -> list[Image]:
        raise EngineError("img2img is not supported by this worker yet")

    def upscale(
        self, request: UpscaleRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        raise EngineError("upscaling is not supported by this worker yet")

    def _txt2img(
        self, base: StableDiffusionPipeline, request: GenerationRequest, progress: ProgressCallback
    ) -> list[Image]:
        # A pipeline of its own per request: shares the weights, but never the scheduler state.
        scheduler = make_scheduler(request.sampler_name, base.scheduler.config, seed=request.seed)
        pipeline = StableDiffusionPipeline(
            **{**base.components, "scheduler": scheduler}, requires_safety_checker=False
        )
        pipeline.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            embeds, negative_embeds = encode_prompts(
                base.tokenizer,
                base.text_encoder,
                request.prompt,
                request.negative_prompt,
                device=self.device,
                dtype=self.dtype,
            )
            # Noise from a CPU generator: the same seed gives the same image on any device.
            generator = torch.Generator("cpu").manual_seed(request.seed)
            output = pipeline(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative_embeds,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                generator=generator,
                callback_on_step_end=_step_callback(progress),
            )
        images: list[Image] = output.images
        return images

    def _load(self, model: InstalledModel) -> LoadedCheckpoint:
        log.info(
            "loading checkpoint %s (%s) on %s as %s",
            model.name,
            model.sha256[:10],
            self.device,
            self.dtype,
        )
        pipeline, architecture = load_sd_pipeline(
            model.path,
            cache_dir=self._settings.cache_dir,
            dtype=self.dtype,
            device=self.device,
            allow_ckpt=self._settings.allow_ckpt,
        )
        return LoadedCheckpoint(pipeline, architecture, _pipeline_bytes(pipeline))


def _step_callback(progress: ProgressCallback) -> Any:
    # The total comes from the pipeline: second-order samplers (DPM++ SDE) evaluate the model
    # twice per step, so there are more callbacks than requested steps.
    def on_step_end(
        pipeline: Any, step: int, _timestep: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        progress(step + 1, int(pipeline.num_timesteps))
        return kwargs

    return on_step_end
