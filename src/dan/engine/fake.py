"""FakeEngine: the Engine contract without torch, for testing the layers above the seam.

It draws flat images whose colours come from their seeds (``batch_size`` x ``n_iter`` of them,
image i from ``seed + i``), reports every step, and can be told to be slow or to fail, so tests
of the worker loop and the API can exercise progress, cancellation and failure isolation
quickly. The real engine has its own tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from PIL import Image as PILImage
from PIL.Image import Image

from dan.domain import (
    DetectRequest,
    GenerationRequest,
    Img2ImgRequest,
    InpaintArea,
    InterrogateRequest,
    ModelFiles,
    PreviewSink,
    ProgressCallback,
    UpscaleRequest,
    hires_size,
    scaled_size,
)
from dan.engine.base import one_by_one
from dan.errors import EngineError, FatalEngineError, TaskCancelled


class FakeEngine:
    FAIL_PROMPT = "fake:fail"
    FATAL_PROMPT = "fake:fatal"
    OOM_PROMPT = "fake:oom"  # the host runs out of memory (MemoryError) mid-task

    def __init__(self, *, step_s: float = 0.0, batch_max: int = 1) -> None:
        self.step_s = step_s
        self.batch_max = batch_max
        self.calls: list[GenerationRequest] = []
        self.batches: list[list[str]] = []  # the prompts of each txt2img_batch, in order

    def describe(self) -> dict[str, str]:
        return {"device": "fake", "dtype": "none"}

    def txt2img(
        self,
        request: GenerationRequest,
        files: ModelFiles,
        progress: ProgressCallback,
        control_image: Image | None = None,
        *,
        preview: PreviewSink | None = None,
    ) -> list[Image]:
        self.calls.append(request)
        if request.prompt == self.FATAL_PROMPT:
            raise FatalEngineError("the fake device died")
        colours = [_colour(seed) for seed in request.seeds]
        for step in range(request.steps):
            time.sleep(self.step_s)
            progress(step + 1, request.steps)
            if preview is not None:  # the first picture so far: its colour, fading in
                preview(_fading(colours[0], (step + 1) / request.steps, request))
        if request.prompt == self.FAIL_PROMPT:
            raise EngineError("the fake engine was told to fail")
        if request.prompt == self.OOM_PROMPT:
            raise MemoryError("the fake host is out of memory")
        size = (request.width, request.height)
        if request.hires is not None:
            size = hires_size(request.width, request.height, request.hires.scale)
        return [PILImage.new("RGB", size, colour) for colour in colours]

    def batch_limit(self, request: GenerationRequest) -> int:
        return self.batch_max

    def txt2img_batch(
        self,
        requests: Sequence[GenerationRequest],
        files: ModelFiles,
        progress: Sequence[ProgressCallback],
        previews: Sequence[PreviewSink | None],
    ) -> list[list[Image] | None]:
        """Each request's txt2img images, its steps taken in lockstep with the others' (as
        one UNet batch would); a request whose progress raises TaskCancelled leaves."""
        self.batches.append([request.prompt for request in requests])
        left = [False] * len(requests)
        steps = requests[0].steps
        for step in range(steps):
            time.sleep(self.step_s)
            for i, report in enumerate(progress):
                left[i] = left[i] or _left(report, step + 1, steps)
            if all(left):
                raise TaskCancelled("every task of the batch was cancelled")
        quiet = [_quiet] * len(requests)
        made = one_by_one(self.txt2img, requests, files, quiet, [None] * len(requests))
        return [None if gone else images for gone, images in zip(left, made, strict=True)]

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
        """The txt2img images, each pasted over ``init_image`` where ``mask`` is white (at the
        init image's size when only the masked area is redrawn, as the real engine does)."""
        generated = self.txt2img(request.generation, files, progress, preview=preview)
        return [_pasted(image, init_image, mask, request) for image in generated]

    def upscale(
        self, request: UpscaleRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        progress(1, 1)
        return image.resize(scaled_size(image.size, request.rate), PILImage.Resampling.NEAREST)

    def annotate(
        self, request: DetectRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        progress(1, 1)
        return image.convert("L").convert("RGB")

    def interrogate(
        self,
        request: InterrogateRequest,
        image: Image,
        files: ModelFiles,
        progress: ProgressCallback,
    ) -> str:
        """``"<model> caption of a WxH image"``."""
        progress(1, 1)
        return f"{request.model} caption of a {image.width}x{image.height} image"


def _left(report: ProgressCallback, done: int, total: int) -> bool:
    """Whether ``report`` says its request leaves (raises TaskCancelled)."""
    try:
        report(done, total)
    except TaskCancelled:
        return True
    return False


def _quiet(done: int, total: int) -> None:
    pass


def _colour(seed: int) -> tuple[int, ...]:
    return tuple(random.Random(seed).randrange(256) for _ in range(3))


def _pasted(
    generated: Image, init_image: Image, mask: Image | None, request: Img2ImgRequest
) -> Image:
    inpaint = request.inpaint
    if inpaint is not None and inpaint.inpaint_area == InpaintArea.ONLY_MASKED:
        generated = generated.resize(init_image.size)
    if mask is None:
        return generated
    base = init_image.convert("RGB").resize(generated.size)
    return PILImage.composite(generated, base, mask.convert("L").resize(generated.size))


def _fading(
    colour: tuple[int, ...], share: float, request: GenerationRequest
) -> Callable[[], Image]:
    """A preview drawer: the request's colour at ``share`` of its strength, 1/8 of its size."""
    shade = tuple(int(c * share) for c in colour)
    size = (max(1, request.width // 8), max(1, request.height // 8))
    return lambda: PILImage.new("RGB", size, shade)
