"""The Engine seam: what a worker asks of an image-generation backend."""

from __future__ import annotations

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


def load_engine(settings: Settings) -> Engine:
    """The diffusers engine for ``settings`` (imports torch)."""
    from dan.engine.diffusers_engine import DiffusersEngine

    return DiffusersEngine(settings)
