"""TaskRunner: turns a claimed task into engine calls and stored result images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from PIL.Image import Image

from dan.domain import (
    ClaimedTask,
    DetectRequest,
    GenerationRequest,
    Img2ImgRequest,
    InterrogateRequest,
    ModelFiles,
    ModelKind,
    ModelRef,
    PreviewSink,
    ProgressCallback,
    TaskKind,
    TaskResult,
    UpscaleRequest,
)
from dan.engine.base import Engine
from dan.errors import DanError, EngineError
from dan.imaging import encode_png, infotext, load_png
from dan.nodes.protocol import result_key
from dan.tasks.order_models import ModelLookup


class TaskFiles(Protocol):
    """Where a task's input images are read and its results written (a BlobStore, or the
    server's, over HTTP, on a remote node). Keys are ``<task id>/<file name>``."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; KeyError if there are none."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``."""
        ...


class TaskRunner:
    """Runs one task of any kind. Raises what the engine raises (see Engine)."""

    def __init__(self, engine: Engine, models: ModelLookup, blobs: TaskFiles) -> None:
        self._engine, self._models, self._blobs = engine, models, blobs

    def run(
        self, task: ClaimedTask, progress: ProgressCallback, preview: PreviewSink | None = None
    ) -> TaskResult:
        """Run ``task``; its result images are stored under the keys of its try
        (dan.nodes.protocol.result_key), so a late run never overwrites a newer one. Step
        previews of generations are offered to ``preview``."""
        if task.kind == TaskKind.TXT2IMG:
            request = GenerationRequest.from_params(task.params)
            return self._txt2img(task, request, progress, preview)
        if task.kind == TaskKind.IMG2IMG:
            request2 = Img2ImgRequest.from_params(task.params)
            return self._img2img(task, request2, progress, preview)
        if task.kind == TaskKind.UPSCALE:
            return self._upscale(task, UpscaleRequest.from_params(task.params), progress)
        if task.kind == TaskKind.DETECT:
            return self._annotate(task, DetectRequest.from_params(task.params), progress)
        if task.kind == TaskKind.INTERROGATE:
            return self._interrogate(InterrogateRequest.from_params(task.params), progress)
        raise DanError(f"this worker cannot run {task.kind} tasks")

    def batch_limit(self, task: ClaimedTask) -> int:
        """How many tasks (``task`` included) may run with it as one batch: 1 for a task that
        never batches, else as many as the engine's batch limit has rows for."""
        if task.kind != TaskKind.TXT2IMG or task.batch_key is None:
            return 1
        request = GenerationRequest.from_params(task.params)
        return max(1, self._engine.batch_limit(request) // request.batch_size)

    def run_batch(
        self,
        tasks: Sequence[ClaimedTask],
        progress: Sequence[ProgressCallback],
        previews: Sequence[PreviewSink | None],
    ) -> list[TaskResult | None]:
        """Run txt2img tasks of one batch key together (Engine.txt2img_batch): each task's
        result stored as :meth:`run` stores it, None for a task whose progress raised
        TaskCancelled (it left the batch). Raises TaskCancelled if every task left."""
        requests = [GenerationRequest.from_params(task.params) for task in tasks]
        files = self._files(requests[0])  # one batch key: the same files
        made = self._engine.txt2img_batch(requests, files, progress, previews)
        return [
            None if images is None else self._store(task, request, images)
            for task, request, images in zip(tasks, requests, made, strict=True)
        ]

    def _txt2img(
        self,
        task: ClaimedTask,
        request: GenerationRequest,
        progress: ProgressCallback,
        preview: PreviewSink | None,
    ) -> TaskResult:
        control = self._control_image(request)
        files = self._files(request)
        images = self._engine.txt2img(request, files, progress, control, preview=preview)
        return self._store(task, request, images)

    def _img2img(
        self,
        task: ClaimedTask,
        request: Img2ImgRequest,
        progress: ProgressCallback,
        preview: PreviewSink | None,
    ) -> TaskResult:
        init = self._input(request.init_image_key)
        mask = self._input(request.inpaint.mask_key) if request.inpaint else None
        files = self._files(request.generation)
        control = self._control_image(request.generation)
        images = self._engine.img2img(
            request, init, mask, files, progress, control, preview=preview
        )
        extra = {"Denoising strength": f"{request.denoising_strength:g}"}
        if request.inpaint:
            extra["Mask blur"] = str(request.inpaint.mask_blur)
        return self._store(task, request.generation, images, extra)

    def _upscale(
        self, task: ClaimedTask, request: UpscaleRequest, progress: ProgressCallback
    ) -> TaskResult:
        image = self._input(request.image_key)
        models = [c.model for c in (request.upscaler, request.upscaler2) if c and c.model]
        files = self._resolve([(ModelKind.UPSCALER, ref) for ref in models])
        result = self._engine.upscale(request, image, files, progress)
        key = result_key(task.id, task.attempt, 0)
        self._blobs.put(key, encode_png(result, _upscale_infotext(request)))
        return TaskResult(image_keys=(key,), seeds=())

    def _annotate(
        self, task: ClaimedTask, request: DetectRequest, progress: ProgressCallback
    ) -> TaskResult:
        files = self._resolve(_pose_model(request.pose_model))
        result = self._engine.annotate(request, self._input(request.image_key), files, progress)
        key = result_key(task.id, task.attempt, 0)
        self._blobs.put(key, encode_png(result, f"Preprocessor: {request.preprocess}"))
        return TaskResult(image_keys=(key,), seeds=())

    def _interrogate(self, request: InterrogateRequest, progress: ProgressCallback) -> TaskResult:
        files = self._resolve([(ModelKind.INTERROGATOR, ref) for ref in request.files.values()])
        image = self._input(request.image_key)
        return TaskResult(caption=self._engine.interrogate(request, image, files, progress))

    def _files(self, request: GenerationRequest) -> ModelFiles:
        """The installed file of every model the request names, by sha256."""
        wanted = [(ModelKind.CHECKPOINT, request.model)]
        wanted += [(ModelKind.LORA, lora.model) for lora in request.loras]
        wanted += [(ModelKind.EMBEDDING, ref) for ref in request.embeddings]
        if request.vae:
            wanted.append((ModelKind.VAE, request.vae))
        if request.hires and request.hires.upscaler.model:
            wanted.append((ModelKind.UPSCALER, request.hires.upscaler.model))
        if request.control_net:
            wanted.append((ModelKind.CONTROLNET, request.control_net.model))
            wanted += _pose_model(request.control_net.pose_model)
        return self._resolve(wanted)

    def _control_image(self, request: GenerationRequest) -> Image | None:
        return self._input(request.control_net.image_key) if request.control_net else None

    def _resolve(self, wanted: list[tuple[ModelKind, ModelRef]]) -> ModelFiles:
        return {ref.sha256: self._models.resolve(kind, ref.sha256) for kind, ref in wanted}

    def _input(self, key: str) -> Image:
        try:
            return load_png(self._blobs.get(key))
        except KeyError as exc:
            raise EngineError(f"the input image {key} of this task is missing") from exc

    def _store(
        self,
        task: ClaimedTask,
        request: GenerationRequest,
        images: list[Image],
        extra: dict[str, str] | None = None,
    ) -> TaskResult:
        """Every image as a PNG with its own seed (A1111's ``seed + i``) in its parameters."""
        seeds = request.seeds
        if len(images) != len(seeds):
            raise EngineError(f"the engine made {len(images)} images, not {len(seeds)}")
        keys = []
        for i, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            key = result_key(task.id, task.attempt, i)
            text = infotext(request, seed, extra or {}, batch_pos=i % request.batch_size)
            self._blobs.put(key, encode_png(image, text))
            keys.append(key)
        return TaskResult(image_keys=tuple(keys), seeds=seeds)


def _pose_model(ref: ModelRef | None) -> list[tuple[ModelKind, ModelRef]]:
    return [(ModelKind.ANNOTATOR, ref)] if ref is not None else []


def _upscale_infotext(request: UpscaleRequest) -> str:
    text = (
        f"Postprocess upscale by: {request.rate:g}, Postprocess upscaler: {request.upscaler.name}"
    )
    if request.upscaler2 is not None:
        text += (
            f", Postprocess upscaler 2: {request.upscaler2.name}"
            f", Postprocess upscaler 2 visibility: {request.upscaler2_factor:g}"
        )
    return text
