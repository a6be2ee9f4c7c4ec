"""DiffusersEngine: Stable Diffusion 1.x on diffusers, with warm pipelines.

Every request runs on pipelines of its own, built around the cached checkpoint's components
with a fresh scheduler, so requests share weights but never sampler state. LoRAs are applied to
the cached components for the duration of one request and removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline
from PIL.Image import Image

from dan.config import Settings
from dan.domain import (
    DetectRequest,
    GenerationRequest,
    Img2ImgRequest,
    InstalledModel,
    InterrogateRequest,
    ModelFiles,
    ModelRef,
    PreviewSink,
    ProgressCallback,
    UpscaleRequest,
)
from dan.engine.cache import LoadedCheckpoint, PipelineCache, WarmModel, pipeline_bytes
from dan.engine.checkpoint import load_sd_pipeline
from dan.engine.controlnet import (
    ControlNetCache,
    ControlUnit,
    controlled_img2img,
    controlled_txt2img,
)
from dan.engine.device import pick_device, pick_dtype
from dan.engine.hires import PromptEmbeds, hires_fix
from dan.engine.img2img import run_img2img, validate_img2img
from dan.engine.interrogate import Interrogators
from dan.engine.lora import LoraCache, LoraStack
from dan.engine.openpose_body import OpenPoseBody
from dan.engine.preprocess import PoseEstimator, preprocess
from dan.engine.preview import LatentPreviewer, LatentsSink, step_callback
from dan.engine.prompts import encode_prompts
from dan.engine.samplers import make_scheduler
from dan.engine.upscale import upscale
from dan.engine.upscale_models import UpscalerModels
from dan.errors import EngineError, FatalEngineError
from dan.prompt_tags import extract_lora_tags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """What every denoising pass of one request shares."""

    base: StableDiffusionPipeline
    embeds: PromptEmbeds
    request: GenerationRequest
    progress: ProgressCallback
    on_latents: LatentsSink | None = None  # step previews, when someone wants them

    def scheduler(self) -> Any:
        """A new scheduler for one pass: passes never share sampler state."""
        return make_scheduler(
            self.request.sampler_name, self.base.scheduler.config, seed=self.request.seed
        )

    def generator(self) -> torch.Generator:
        # Noise from a CPU generator: the same seed gives the same image on any device.
        return torch.Generator("cpu").manual_seed(self.request.seed)


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
        self.upscalers = UpscalerModels(self.device, self.dtype)
        self.controlnets = ControlNetCache(self.device, self.dtype)
        self.loras = LoraStack(LoraCache(settings.lora_cache_bytes, allow_ckpt=settings.allow_ckpt))
        self.interrogators = Interrogators(self.device, self.dtype, settings.cache_dir)
        self.pose_models = WarmModel(lambda m: OpenPoseBody.load(m.path, self.device, self.dtype))
        # transformers draws a progress bar for every adapter loaded into the text encoder.
        transformers.utils.logging.disable_progress_bar()

    def describe(self) -> dict[str, str]:
        on_gpu = self.device.type == "cuda"
        name = torch.cuda.get_device_name(self.device) if on_gpu else platform.processor()
        memory = torch.cuda.get_device_properties(self.device).total_memory if on_gpu else 0
        return {
            "device": str(self.device),
            "device_name": name or "cpu",
            "device_memory_bytes": str(memory),  # 0: the host's memory is what the node has
            "dtype": str(self.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        }

    def txt2img(
        self,
        request: GenerationRequest,
        files: ModelFiles,
        progress: ProgressCallback,
        control_image: Image | None = None,
        *,
        preview: PreviewSink | None = None,
    ) -> list[Image]:
        with self._conditioned(request, files, progress, preview) as c:
            unit = self._control_unit(request, files, control_image)
            if request.hires is not None:
                return [self._hires(c, files, unit)]
            if unit is not None:
                return controlled_txt2img(c.base, request, unit, **_denoising(c))
            pipeline = StableDiffusionPipeline(
                **{**c.base.components, "scheduler": c.scheduler()}, requires_safety_checker=False
            )
            pipeline.set_progress_bar_config(disable=True)
            output = pipeline(
                prompt_embeds=c.embeds.prompt_embeds,
                negative_prompt_embeds=c.embeds.negative_prompt_embeds,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                generator=c.generator(),
                callback_on_step_end=step_callback(progress, on_latents=c.on_latents),
            )
            return list(output.images)

    def img2img(
        self,
        request: Img2ImgRequest,
        init_image: Image,
        mask: Image | None,
        files: ModelFiles,
        progress: ProgressCallback,
        control_image: Image | None = None,
        *,
        preview: PreviewSink | None = None,
    ) -> list[Image]:
        validate_img2img(request, init_image, mask)
        with self._conditioned(request.generation, files, progress, preview) as c:
            unit = self._control_unit(request.generation, files, control_image)
            if unit is not None:
                images = controlled_img2img(
                    c.base, request, init_image, mask, unit, **_denoising(c)
                )
            else:
                images = run_img2img(c.base, request, init_image, mask, **_denoising(c))
        progress(1, 1)  # strength 0 runs no step
        return images

    def upscale(
        self, request: UpscaleRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        with _engine_errors(f"{image.width}x{image.height} x {request.rate:g}"):
            return upscale(request, image, files, models=self.upscalers, progress=progress)

    def detect(
        self, request: DetectRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        control = preprocess(
            request.preprocess,
            image,
            request.low_threshold,
            request.high_threshold,
            pose=self._pose(request.pose_model, files),
        )
        progress(1, 1)
        return control

    def interrogate(
        self,
        request: InterrogateRequest,
        image: Image,
        files: ModelFiles,
        progress: ProgressCallback,
    ) -> str:
        with _engine_errors(f"{request.model} interrogate"):
            return self.interrogators.interrogate(request, image, files, progress)

    def _pose(self, ref: ModelRef | None, files: ModelFiles) -> PoseEstimator | None:
        """The OpenPose body model's estimator when the request names it, else None."""
        if ref is None:
            return None
        return self.pose_models.get(files[ref.sha256]).estimate

    def _control_unit(
        self, request: GenerationRequest, files: ModelFiles, control_image: Image | None
    ) -> ControlUnit | None:
        """The request's ControlNet with its preprocessed control image, if it has one."""
        spec = request.control_net
        if spec is None:
            return None
        if control_image is None:
            raise EngineError("control_net needs a control image")
        pose = self._pose(spec.pose_model, files)
        image = preprocess(
            spec.preprocess, control_image, spec.low_threshold, spec.high_threshold, pose=pose
        )
        return ControlUnit.from_spec(spec, self.controlnets.get(files[spec.model.sha256]), image)

    def _hires(self, c: Conditioning, files: ModelFiles, unit: ControlUnit | None) -> Image:
        return hires_fix(
            c.base,
            c.request,
            c.embeds,
            new_scheduler=c.scheduler,
            new_generator=c.generator,
            files=files,
            upscalers=self.upscalers,
            progress=c.progress,
            unit=unit,
            on_latents=c.on_latents,
        )

    @contextlib.contextmanager
    def _conditioned(
        self,
        request: GenerationRequest,
        files: ModelFiles,
        progress: ProgressCallback,
        preview: PreviewSink | None = None,
    ) -> Iterator[Conditioning]:
        """The loaded checkpoint with the request's LoRAs applied and its prompts encoded."""
        loaded = self.pipelines.get(files[request.model.sha256])
        base = loaded.pipeline
        on_latents = _previews(loaded.previewer, preview) if preview is not None else None
        with (
            _engine_errors(f"{request.width}x{request.height}"),
            self._loras(base, request, files),
            torch.inference_mode(),
        ):
            prompt, _ = extract_lora_tags(request.prompt)  # the service resolved them already
            embeds, negative = encode_prompts(
                base.tokenizer,
                base.text_encoder,
                prompt,
                request.negative_prompt,
                device=self.device,
                dtype=self.dtype,
            )
            embedded = PromptEmbeds(embeds, negative)
            yield Conditioning(base, embedded, request, progress, on_latents)

    def _loras(
        self, base: StableDiffusionPipeline, request: GenerationRequest, files: ModelFiles
    ) -> contextlib.AbstractContextManager[object]:
        """Exactly the request's LoRAs switched on, all of them off again afterwards."""
        loras = [(files[spec.model.sha256], spec.weight) for spec in request.loras]
        return self.loras.applied(base, loras)

    def _load(self, model: InstalledModel) -> LoadedCheckpoint:
        log.info("loading checkpoint %s (%s) on %s", model.name, model.sha256[:10], self.device)
        pipeline, architecture = load_sd_pipeline(
            model.path,
            cache_dir=self._settings.cache_dir,
            dtype=self.dtype,
            device=self.device,
            allow_ckpt=self._settings.allow_ckpt,
        )
        previewer = LatentPreviewer(pipeline.vae)
        return LoadedCheckpoint(pipeline, architecture, pipeline_bytes(pipeline), previewer)


def _denoising(c: Conditioning) -> dict[str, Any]:
    """The per-pass arguments every denoising run of a request takes."""
    return {
        "scheduler": c.scheduler(),
        "prompt_embeds": c.embeds.prompt_embeds,
        "negative_prompt_embeds": c.embeds.negative_prompt_embeds,
        "generator": c.generator(),
        "callback_on_step_end": step_callback(c.progress, on_latents=c.on_latents),
    }


def _previews(previewer: LatentPreviewer, sink: PreviewSink) -> LatentsSink:
    """Latents offered to ``sink`` as a picture it may ask ``previewer`` to draw."""

    def on_latents(latents: torch.Tensor) -> None:
        sink(lambda: previewer(latents))

    return on_latents


@contextlib.contextmanager
def _engine_errors(size: str) -> Iterator[None]:
    """Translate torch's failures: out of memory fails the task, a broken GPU the worker."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise EngineError(f"out of GPU memory at {size}; try a smaller size") from exc
    except RuntimeError as exc:
        if "CUDA" in str(exc) or "cuDNN" in str(exc):
            raise FatalEngineError(f"the GPU failed: {exc}") from exc
        raise EngineError(f"generation failed: {exc}") from exc
