"""The Engine seam: what a worker asks of an image-generation backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from dan.domain import (
    DetectRequest,
    GenerationRequest,
    Img2ImgRequest,
    InterrogateRequest,
    ModelFiles,
    PreviewSink,
    ProgressCallback,
    UpscaleRequest,
)
from dan.errors import TaskCancelled

if TYPE_CHECKING:
    from PIL.Image import Image

    from dan.config import Settings


class Engine(Protocol):
    """Runs one task at a time on one device.

    ``files`` maps the sha256 of every model the request names (checkpoint, LoRAs, model
    upscalers, ControlNet, pose and interrogator weights) to its installed file.
    Implementations raise :class:`dan.errors.EngineError` for a task that cannot run (the worker
    fails that task and goes on),
    :class:`dan.errors.FatalEngineError` when the device is unusable (the worker exits), and let
    :class:`dan.errors.TaskCancelled` raised by ``progress`` propagate. A task never leaves
    state (LoRAs, schedulers) behind for the next one.
    """

    def txt2img(
        self,
        request: GenerationRequest,
        files: ModelFiles,
        progress: ProgressCallback,
        control_image: Image | None = None,
        *,
        preview: PreviewSink | None = None,
    ) -> list[Image]:
        """The ``request.images`` images of ``request`` (with its LoRAs, hires fix and
        ControlNet, whose input image is ``control_image``), in seed order: image i has the
        seed ``request.seed + i`` and is the image a single request with that seed gives; step
        previews (of the batch's first image) are offered to ``preview``."""
        ...

    def batch_limit(self, request: GenerationRequest) -> int:
        """How many images of ``request``'s size one :meth:`txt2img_batch` may make (the
        rows of its UNet batch); 1: this engine runs no batches across requests."""
        ...

    def txt2img_batch(
        self,
        requests: Sequence[GenerationRequest],
        files: ModelFiles,
        progress: Sequence[ProgressCallback],
        previews: Sequence[PreviewSink | None],
    ) -> list[list[Image] | None]:
        """The images of several plain txt2img requests of one batch key
        (dan.tasks.needs.batch_key: no hires fix, no ControlNet, one iteration), run
        together: item i is what :meth:`txt2img` gives ``requests[i]`` alone (within the
        rounding of batched arithmetic), or None if ``progress[i]`` raised TaskCancelled.
        Such a request has left the batch: its callbacks are not called again, and the others
        go on. Step previews of each request's first image go to its ``previews[i]``. Raises
        TaskCancelled once every request has left; an error fails the whole batch."""
        ...

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
        """The ``request.generation.images`` images made from ``init_image``, in seed order as
        txt2img's; with ``mask``, only the masked part is redrawn; step previews are offered
        to ``preview``."""
        ...

    def upscale(
        self, request: UpscaleRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        """``image`` enlarged ``request.rate`` times."""
        ...

    def annotate(
        self, request: DetectRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        """The control image a ControlNet preprocessor (canny, openpose, none) makes of ``image``;
        ``files`` holds the OpenPose body model when the request names one. (The API and task
        kind call this "detect", A1111's word; inside the engine it is annotating.)"""
        ...

    def interrogate(
        self,
        request: InterrogateRequest,
        image: Image,
        files: ModelFiles,
        progress: ProgressCallback,
    ) -> str:
        """A description of ``image``: a caption with ranked style terms (clip) or tags
        (deepdanbooru), made with the interrogator files in ``files``."""
        ...

    def describe(self) -> dict[str, str]:
        """Device, dtype and versions, for logs and node registration."""
        ...


class Txt2Img(Protocol):
    def __call__(
        self,
        request: GenerationRequest,
        files: ModelFiles,
        progress: ProgressCallback,
        control_image: Image | None = None,
        *,
        preview: PreviewSink | None = None,
    ) -> list[Image]: ...


def one_by_one(
    txt2img: Txt2Img,
    requests: Sequence[GenerationRequest],
    files: ModelFiles,
    progress: Sequence[ProgressCallback],
    previews: Sequence[PreviewSink | None],
) -> list[list[Image] | None]:
    """``Engine.txt2img_batch`` of an engine that runs the requests one after another with
    ``txt2img`` (same contract, no shared UNet batch)."""
    results: list[list[Image] | None] = []
    for request, report, preview in zip(requests, progress, previews, strict=True):
        try:
            results.append(txt2img(request, files, report, preview=preview))
        except TaskCancelled:
            results.append(None)
    if all(result is None for result in results):
        raise TaskCancelled("every task of the batch was cancelled")
    return results


def load_engine(settings: Settings) -> Engine:
    """The diffusers engine for ``settings`` (imports torch)."""
    from dan.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(settings)
