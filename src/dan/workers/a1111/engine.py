"""A1111Engine: DAN's Engine over an AUTOMATIC1111 instance's HTTP API (no torch here).

Each task is one blocking request to the instance (``/sdapi/v1/txt2img`` and the like), sent
from a helper thread while the calling thread polls ``GET /sdapi/v1/progress`` every
``poll_s``: the fraction done goes to the progress callback and a new ``current_image`` is
offered to the preview sink. When the callback raises TaskCancelled (the task was cancelled,
or its lease lost), the engine asks the instance to stop (``POST /sdapi/v1/interrupt``),
waits up to ``interrupt_wait_s`` for the request to end, and lets the cancellation propagate;
whatever the instance answers then is dropped. An instance runs one request at a time, so a
node on one has one slot, and an interrupt stops whatever the instance runs: give DAN an
instance of its own.

What the instance answers is checked before it is used: the number of images and their size
must be what the task asked for, or the task fails with an EngineError (a lying or confused
instance produces no result). The instance being down raises A1111Unreachable (see
:mod:`dan.workers.a1111.client`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

from PIL.Image import Image, Resampling

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
from dan.engine.base import one_by_one
from dan.errors import DanError, EngineError, InvalidArgument, TaskCancelled
from dan.imaging import decode_image
from dan.nodes.protocol import MAX_CAPTION_CHARS
from dan.workers.a1111 import payloads
from dan.workers.a1111.client import GENERATION_TIMEOUT, A1111Client
from dan.workers.a1111.inventory import A1111Inventory

log = logging.getLogger(__name__)

POLL_S = 0.5
INTERRUPT_WAIT_S = 30.0
PROGRESS_STEPS = 1000  # the fraction done is reported as steps of this many
MAX_IMAGE_PIXELS = 8192 * 8192  # the largest answer image decoded (DAN's largest upscale)
ROUNDING_PX = 8  # how far A1111's rounding of an enlarged side may be from DAN's


class A1111Engine:
    """The Engine of a node serving through an AUTOMATIC1111 instance (see the module
    docstring). ``inventory`` names the task's models as the instance does."""

    def __init__(
        self,
        client: A1111Client,
        inventory: A1111Inventory,
        *,
        poll_s: float = POLL_S,
        interrupt_wait_s: float = INTERRUPT_WAIT_S,
    ) -> None:
        self._client, self._inventory = client, inventory
        self._poll_s, self._interrupt_wait_s = poll_s, interrupt_wait_s
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="a1111-call")
        self._loaded: str | None = None

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, str]:
        return {"device": "AUTOMATIC1111", "dtype": "instance's own", "backend": "a1111"}

    def loaded(self) -> list[str]:
        """The checkpoint the instance holds loaded (the last one a task used, or the one it
        had when the node started), for the server's affinity."""
        return [self._loaded] if self._loaded else []

    def read_loaded(self) -> None:
        """Learn which checkpoint the instance has loaded (``GET /sdapi/v1/options``)."""
        options = self._client.get("/sdapi/v1/options")
        title = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        if isinstance(title, str):
            self._loaded = self._inventory.checkpoint_titled(title)

    # -- Engine ------------------------------------------------------------------------------
    def txt2img(
        self,
        request: GenerationRequest,
        files: ModelFiles,
        progress: ProgressCallback,
        control_image: Image | None = None,
        *,
        preview: PreviewSink | None = None,
    ) -> list[Image]:
        body = payloads.txt2img(request, self._inventory.call_name, control_image)
        answer = self._run("/sdapi/v1/txt2img", body, progress, preview)
        size = payloads.txt2img_size(request)
        fit = partial(_fit if request.hires else _exactly, size=size)
        images = _images(answer, request.images, fit, extra_ok=control_image is not None)
        self._loaded = request.model.sha256
        return images

    def batch_limit(self, request: GenerationRequest) -> int:
        return 1  # the instance runs one request at a time

    def txt2img_batch(
        self,
        requests: Sequence[GenerationRequest],
        files: ModelFiles,
        progress: Sequence[ProgressCallback],
        previews: Sequence[PreviewSink | None],
    ) -> list[list[Image] | None]:
        return one_by_one(self.txt2img, requests, files, progress, previews)

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
        names = self._inventory.call_name
        body = payloads.img2img(request, init_image, mask, names, control_image)
        answer = self._run("/sdapi/v1/img2img", body, progress, preview)
        size = payloads.img2img_size(request, init_image)
        fit = partial(_exactly, size=size)
        if payloads.only_masked(request):
            asked = (request.generation.width, request.generation.height)
            fit = partial(_resized_back, size=size, asked=asked)
        count = request.generation.images
        images = _images(answer, count, fit, extra_ok=control_image is not None)
        self._loaded = request.generation.model.sha256
        return images

    def upscale(
        self, request: UpscaleRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        body = payloads.upscale(request, image, self._inventory.call_name)
        answer = self._run("/sdapi/v1/extra-single-image", body, progress, None)
        result = _decode(_field(answer, "image", str), "upscaled image")
        return _fit(result, payloads.upscale_size(request, image), "upscaled image")

    def annotate(
        self, request: DetectRequest, image: Image, files: ModelFiles, progress: ProgressCallback
    ) -> Image:
        if not self._inventory.has_controlnet:
            raise EngineError(
                "the AUTOMATIC1111 instance of this node has no ControlNet extension, which "
                "runs the preprocessors"
            )
        answer = self._run("/controlnet/detect", payloads.detect(request, image), progress, None)
        found = _field(answer, "images", list)
        if not found or not isinstance(found[0], str):
            raise EngineError(
                f"the instance's /controlnet/detect answered no image: {answer!r:.200}"
            )
        result = _decode(found[0], "control image").convert("RGB")
        # The preprocessor works at its own resolution (rounded); DAN's answer is the input's size.
        return (
            result if result.size == image.size else result.resize(image.size, Resampling.LANCZOS)
        )

    def interrogate(
        self,
        request: InterrogateRequest,
        image: Image,
        files: ModelFiles,
        progress: ProgressCallback,
    ) -> str:
        body = payloads.interrogate(request, image)
        caption: str = _field(
            self._run("/sdapi/v1/interrogate", body, progress, None), "caption", str
        )
        if len(caption) > MAX_CAPTION_CHARS:
            raise EngineError(
                f"the instance's caption has {len(caption)} characters; at most "
                f"{MAX_CAPTION_CHARS} are taken"
            )
        return caption.strip()

    # -- one request, with progress ----------------------------------------------------------
    def _run(
        self,
        path: str,
        body: dict[str, Any],
        progress: ProgressCallback,
        preview: PreviewSink | None,
    ) -> Any:
        """The instance's answer to ``POST path``, relaying its progress meanwhile."""
        call = self._calls.submit(self._client.post, path, body, timeout=GENERATION_TIMEOUT)
        relay = _Relay(progress, preview)
        while True:
            try:
                return call.result(timeout=self._poll_s)
            except FutureTimeout:
                pass
            try:
                relay.send(self._progress(with_image=preview is not None))
            except TaskCancelled:
                self._interrupt(call)
                raise

    def _progress(self, *, with_image: bool) -> dict[str, Any] | None:
        params = {"skip_current_image": "false" if with_image else "true"}
        try:
            state = self._client.get("/sdapi/v1/progress", params)
        except DanError as exc:  # the request itself will tell whether the instance is down
            log.debug("progress unknown: %s", exc.message)
            return None
        return state if isinstance(state, dict) else None

    def _interrupt(self, call: Future[Any]) -> None:
        try:
            self._client.post("/sdapi/v1/interrupt", {})
        except DanError as exc:
            log.warning("could not ask the instance to stop: %s", exc.message)
        try:
            call.result(timeout=self._interrupt_wait_s)
        except FutureTimeout:
            log.warning(
                "the instance did not stop within %.0f s of the interrupt; its answer will be "
                "dropped",
                self._interrupt_wait_s,
            )
        except Exception as exc:  # stopped: what it answered does not matter any more
            log.debug("the interrupted request ended with %r", exc)


class _Relay:
    """Passes the instance's progress to the task's callback and its new pictures to the
    preview sink. The callback is called at every poll (even when nothing is known), since
    it is where a cancel is noticed."""

    def __init__(self, progress: ProgressCallback, preview: PreviewSink | None) -> None:
        self._progress, self._preview = progress, preview
        self._done = 0.0
        self._image: str | None = None

    def send(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            fraction = state.get("progress")
            if isinstance(fraction, int | float):
                self._done = max(self._done, min(float(fraction), 1.0))
            image = state.get("current_image")
            if self._preview is not None and isinstance(image, str) and image != self._image:
                self._image = image
                self._preview(partial(_decode, image, "preview"))
        self._progress(round(self._done * PROGRESS_STEPS), PROGRESS_STEPS)


def _images(
    answer: Any, count: int, fit: Callable[[Image], Image], *, extra_ok: bool
) -> list[Image]:
    """The first ``count`` images of a generation answer, each passed through ``fit`` (which
    checks its size). More are allowed only with ControlNet (older extensions append their
    detected maps)."""
    found = _field(answer, "images", list)
    if len(found) < count or (len(found) > count and not extra_ok):
        raise EngineError(
            f"the instance answered {len(found)} image(s) where the task asks for {count}"
        )
    images = []
    for data in found[:count]:
        if not isinstance(data, str):
            raise EngineError("the instance answered an image that is not base64 text")
        images.append(fit(_decode(data, "image")))
    return images


def _field(answer: Any, key: str, kind: type) -> Any:
    value = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(value, kind):
        raise EngineError(f"the instance's answer has no {key}: {str(answer)[:200]}")
    return value


def _decode(data: str, what: str) -> Image:
    try:
        return decode_image(data, f"the instance's {what}", max_pixels=MAX_IMAGE_PIXELS)
    except InvalidArgument as exc:
        raise EngineError(exc.message) from exc


def _fit(image: Image, size: tuple[int, int], what: str = "image") -> Image:
    """``image`` at ``size``: A1111 rounds an enlarged side down (hires fix truncates, its
    upscalers go to a multiple of 8) where DAN rounds it to the nearest, so a side that is
    off by less than ROUNDING_PX is resized to DAN's; any other size is an EngineError."""
    if image.size != size and all(
        abs(got - want) < ROUNDING_PX for got, want in zip(image.size, size, strict=True)
    ):
        return image.resize(size, Resampling.LANCZOS)
    return _exactly(image, size, what)


def _resized_back(image: Image, size: tuple[int, int], asked: tuple[int, int]) -> Image:
    """Only-masked inpainting: DAN answers at the picture's ``size``; A1111 at the size
    ``asked`` (it fitted the picture to it first), which is resized back."""
    if image.size == asked != size:
        return image.resize(size, Resampling.LANCZOS)
    return _exactly(image, size)


def _exactly(image: Image, size: tuple[int, int], what: str = "image") -> Image:
    if image.size == size:
        return image
    raise EngineError(
        f"the instance's {what} is {image.width}x{image.height}; the task asks for "
        f"{size[0]}x{size[1]}"
    )
