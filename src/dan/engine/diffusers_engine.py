"""DiffusersEngine: Stable Diffusion 1.x and SDXL on diffusers, with warm pipelines.

Every request runs on pipelines of its own, built around the cached checkpoint's components
with a fresh scheduler, so requests share weights but never sampler state. LoRAs are applied to
the cached components for the duration of one request and removed in ``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import diffusers
import torch
import transformers
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
from dan.engine.control.controlnet import ControlNetCache
from dan.engine.control.openpose_body import OpenPoseBody
from dan.engine.control.preprocess import PoseEstimator, preprocess
from dan.engine.control.runs import ControlUnit, controlled_txt2img
from dan.engine.families import load_checkpoint
from dan.engine.generation.batching import Member, run_batch
from dan.engine.generation.compiled import Compiler, FastUNet, use_inductor_cache
from dan.engine.generation.hires import hires_fix
from dan.engine.generation.img2img import run_img2img, validate_img2img
from dan.engine.generation.packages import Packages, UNetSource
from dan.engine.generation.preview import LatentPreviewer, LatentsSink
from dan.engine.generation.prompts import PromptEmbeds
from dan.engine.generation.txt2img import Conditioning, denoising_arguments, previews, run_txt2img
from dan.engine.interrogation.interrogate import Interrogators
from dan.engine.loading.cache import (
    LoadedCheckpoint,
    PipelineCache,
    WarmModel,
    module_bytes,
    pipeline_bytes,
)
from dan.engine.loading.device import pick_device, pick_dtype
from dan.engine.loading.embeddings import Rewrite, embeddings_applied
from dan.engine.loading.lora.files import LoraCache
from dan.engine.loading.lora.stack import LoraStack
from dan.engine.loading.vae import VaeFiles, swapped_vae
from dan.engine.upscaling.upscale import upscale
from dan.engine.upscaling.upscale_models import UpscalerModels
from dan.errors import EngineError, FatalEngineError
from dan.prompt_tags import extract_lora_tags

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
BATCH_PIXELS = 512 * 512  # batch_max is for images of this size or smaller
CPU_BATCH_MAX = 2  # measured by bench/batching.py (README, "Batching across requests")


def _exclusive(
    method: Callable[Concatenate[DiffusersEngine, P], R],
) -> Callable[Concatenate[DiffusersEngine, P], R]:
    """``method`` run holding the engine's ``running`` lock."""

    @functools.wraps(method)
    def run(engine: DiffusersEngine, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with engine.running:
            return method(engine, *args, **kwargs)

    return run


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
        # Held by every task: one runs at a time.
        self.running = threading.RLock()
        self.fast_path = _fast_path_on(settings.fast_path, self.device, self.dtype)
        if self.fast_path:
            use_inductor_cache(settings.cache_dir)
            # diffusers' upsampler calls an lru_cache'd version check that dynamo traces through.
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools")
        self.pipelines = PipelineCache(settings.pipeline_cache_bytes, self._load)
        self.upscalers = UpscalerModels(self.device, self.dtype)
        self.controlnets = ControlNetCache(self.device, self.dtype)
        self.vaes = VaeFiles(self.device, self.dtype)
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
            "fast_path": "compile" if self.fast_path else "off",
        }

    @_exclusive
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
            unit = self._control_unit(c, request, files, control_image)
            batches = c.batches()
            return [image for batch in batches for image in self._txt2img(batch, files, unit)]

    def batch_limit(self, request: GenerationRequest) -> int:
        """``batch_max`` images (the setting, else this device's default: see
        :func:`default_batch_max`; 1 with the fast path on), fewer in proportion for images
        larger than 512x512 (a batch's memory grows with its pixels), at least 1."""
        # With the CPU fast path on, a batch is another shape to compile and runs eager till
        # then; two compiled single runs beat one eager batch of two (1.35x vs 1.15x here).
        default = 1 if self.fast_path else default_batch_max(self.device)
        limit = self._settings.batch_max or default
        fits = limit * BATCH_PIXELS // (request.width * request.height)
        return max(1, min(limit, fits))

    @_exclusive
    def txt2img_batch(
        self,
        requests: Sequence[GenerationRequest],
        files: ModelFiles,
        progress: Sequence[ProgressCallback],
        previews: Sequence[PreviewSink | None],
    ) -> list[list[Image] | None]:
        first = requests[0]
        with self._applied(first, files) as (loaded, words):
            members = [
                Member(r, self._encode(loaded, words, r), p, self._latents(loaded, sink))
                for r, p, sink in zip(requests, progress, previews, strict=True)
            ]
            return run_batch(self._base(loaded, first), loaded.family, members)

    @staticmethod
    def _latents(loaded: LoadedCheckpoint, sink: PreviewSink | None) -> LatentsSink | None:
        return previews(loaded.previewer, sink) if sink is not None else None

    def _txt2img(self, c: Conditioning, files: ModelFiles, unit: ControlUnit | None) -> list[Image]:
        """The images of one batch."""
        if c.request.hires is not None:
            return self._hires(c, files, unit)
        if unit is not None:
            return controlled_txt2img(c.base, c.request, unit, **denoising_arguments(c))
        return run_txt2img(c)

    @_exclusive
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
        images: list[Image] = []
        with self._conditioned(request.generation, files, progress, preview) as c:
            unit = self._control_unit(c, request.generation, files, control_image)
            for batch in c.batches():
                arguments = denoising_arguments(batch)
                images += run_img2img(batch.base, request, init_image, mask, unit=unit, **arguments)
        progress(1, 1)  # strength 0 runs no step
        return images

    @_exclusive
    def upscale(
        self, request: UpscaleRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        with _engine_errors(f"{image.width}x{image.height} x {request.rate:g}"):
            return upscale(request, image, files, models=self.upscalers, progress=progress)

    @_exclusive
    def annotate(
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

    @_exclusive
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
        self,
        c: Conditioning,
        request: GenerationRequest,
        files: ModelFiles,
        control_image: Image | None,
    ) -> ControlUnit | None:
        """The request's ControlNet, loaded for the checkpoint's UNet (a ControlNet of another
        family raises EngineError naming both), with its preprocessed control image."""
        spec = request.control_net
        if spec is None:
            return None
        family = c.family
        if not family.supports_controlnet:
            raise EngineError(
                f"ControlNet does not run on {family.name.value} checkpoints in DAN yet; "
                "send the request without control_net or use an SD 1.x checkpoint"
            )
        if control_image is None:
            raise EngineError("control_net needs a control image")
        pose = self._pose(spec.pose_model, files)
        image = preprocess(
            spec.preprocess, control_image, spec.low_threshold, spec.high_threshold, pose=pose
        )
        model = self.controlnets.get(files[spec.model.sha256], c.base.unet.config)
        return ControlUnit.from_spec(spec, model, image)

    def _hires(self, c: Conditioning, files: ModelFiles, unit: ControlUnit | None) -> list[Image]:
        return hires_fix(
            c.base,
            c.request,
            c.embeds,
            new_scheduler=c.scheduler,
            new_generators=c.generators,
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
        """The loaded checkpoint with the request's LoRAs, VAE and embeddings applied and its
        prompts encoded."""
        with self._applied(request, files) as (loaded, words):
            on_latents = previews(loaded.previewer, preview) if preview is not None else None
            embeds = self._encode(loaded, words, request)
            base = self._base(loaded, request)
            first = request.batch_seeds(0)
            yield Conditioning(base, loaded.family, embeds, request, progress, first, on_latents)

    @contextlib.contextmanager
    def _applied(
        self, request: GenerationRequest, files: ModelFiles
    ) -> Iterator[tuple[LoadedCheckpoint, Rewrite]]:
        """The loaded checkpoint with the request's LoRAs, VAE and embeddings applied (and
        torch in inference mode), and what spells its embeddings' names in a prompt."""
        loaded = self.pipelines.get(files[request.model.sha256])
        base = loaded.pipeline
        with (
            _engine_errors(f"{request.width}x{request.height}"),
            self._loras(base, request, files),
            swapped_vae(base, self._vae(base, request, files)),
            embeddings_applied(base, [files[e.sha256] for e in request.embeddings]) as words,
            torch.inference_mode(),
        ):
            yield loaded, words

    def _encode(
        self, loaded: LoadedCheckpoint, words: Rewrite, request: GenerationRequest
    ) -> PromptEmbeds:
        prompt, _ = extract_lora_tags(request.prompt)  # the service resolved them already
        return loaded.family.encode_prompts(
            loaded.pipeline,
            words(prompt),
            words(request.negative_prompt),
            device=self.device,
            dtype=self.dtype,
            clip_skip=request.clip_skip,
        )

    @staticmethod
    def _base(loaded: LoadedCheckpoint, request: GenerationRequest) -> Any:
        """The pipeline a request's runs are built from: a plain request's takes the UNet
        compiled for its shapes (when the fast path is on)."""
        base = loaded.pipeline
        if loaded.fast_unet is not None and not request.loras and not request.control_net:
            return loaded.family.pipeline("txt2img", base, base.scheduler, unet=loaded.fast_unet)
        return base

    def _loras(
        self, base: Any, request: GenerationRequest, files: ModelFiles
    ) -> contextlib.AbstractContextManager[object]:
        """Exactly the request's LoRAs switched on, all of them off again afterwards."""
        loras = [(files[spec.model.sha256], spec.weight) for spec in request.loras]
        return self.loras.applied(base, loras)

    def _vae(self, base: Any, request: GenerationRequest, files: ModelFiles) -> Any | None:
        """The request's VAE file loaded for ``base``'s VAE architecture; None: its own."""
        if request.vae is None:
            return None
        return self.vaes.get(files[request.vae.sha256], dict(base.vae.config))

    def _load(self, model: InstalledModel) -> LoadedCheckpoint:
        log.info("loading checkpoint %s (%s) on %s", model.name, model.sha256[:10], self.device)
        pipeline, architecture, family = load_checkpoint(
            model.path,
            cache_dir=self._settings.cache_dir,
            dtype=self.dtype,
            device=self.device,
            allow_ckpt=self._settings.allow_ckpt,
        )
        # A batch's images are decoded (and encoded) one at a time: the VAE's memory is then
        # that of one image whatever the batch, and each image decodes as it does alone.
        pipeline.vae.enable_slicing()
        previewer = LatentPreviewer(pipeline.vae)
        size = pipeline_bytes(pipeline)
        fast = None
        if self.fast_path:
            # oneDNN's convolutions are faster on channels-last tensors (the probe: the VAE
            # decode 0.9 -> 0.4 s, the eager UNet 10 %); the compiled UNet picks its own.
            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
            source = UNetSource(
                model.path,
                model.sha256,
                self.dtype,
                self._settings.allow_ckpt,
                self._settings.cache_dir,
            )
            compiler = Compiler(
                Packages(source, self._settings.cache_dir / "fastpath"),
                max_shapes=self._settings.compile_max_shapes,
                name=model.name,
                weight_bytes=module_bytes(pipeline.unet),
            )
            fast = FastUNet(pipeline.unet, compiler)
        return LoadedCheckpoint(pipeline, architecture, size, previewer, family, fast)


def default_batch_max(device: torch.device) -> int:
    """How many 512x512 images one UNet batch holds by default. CPU: 2 (bench/batching.py,
    full-size SD1.5 in bf16 on 2 cores: batches of 2 made 1.15x the images per second of one
    at a time, of 4 1.12x: a CPU is busy with one image already, and a larger batch only
    delays its first results). CUDA: by the card's memory, about 1.5 GB per image in fp16
    with 4 GB kept for the weights and the VAE, at most 8 (an estimate: not measured yet,
    bench/gpu_batching.py is the script to measure it)."""
    if device.type != "cuda":
        return CPU_BATCH_MAX
    free = torch.cuda.get_device_properties(device).total_memory - 4 * 1024**3
    return max(1, min(8, int(free // (1.5 * 1024**3))))


def _fast_path_on(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """``auto``: where it was measured to win, on CPUs computing in bf16 (oneDNN's prepacked
    bf16 kernels); on CUDA DAN has no compiled path yet."""
    if setting == "auto":
        return device.type == "cpu" and dtype == torch.bfloat16
    return setting == "compile"


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
