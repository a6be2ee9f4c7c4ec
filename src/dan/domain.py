"""Domain values shared by every layer: frozen dataclasses and enums, no I/O, no torch."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter

from dan.samplers import AUTOMATIC, choose

if TYPE_CHECKING:
    from PIL.Image import Image

SEED_MAX = 2**32 - 1

# Several images per request (A1111's batch_size x n_iter). A batch goes through the UNet at
# once, so it may hold at most the pixels of the largest single image (MAX_BATCH_PIXELS); the
# images of one request are capped so that one request cannot fill the queue.
MAX_BATCH_SIZE, MAX_N_ITER, MAX_IMAGES = 8, 16, 16
MAX_BATCH_PIXELS = 2048 * 2048
MAX_CLIP_SKIP = 12  # A1111's "Clip skip" slider: 1 (the last layer) to 12

# Upscalers that need no model file (AUTOMATIC1111 names). Latent modes only make sense inside
# hires fix, where the image is still a latent; model upscalers are files in models/upscalers.
LATENT_UPSCALERS: tuple[str, ...] = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
IMAGE_UPSCALERS: tuple[str, ...] = ("Lanczos", "Nearest")
# The interrogators of the reference, and the files each needs: role -> catalog name of an
# interrogator file. `clip` is A1111's: a BLIP caption (BLIP weights and its BERT vocabulary)
# followed by terms ranked by CLIP ViT-L/14.
INTERROGATOR_PARTS: dict[str, dict[str, str]] = {
    "clip": {
        "blip": "model_base_caption_capfilt_large",
        "blip_vocab": "bert-base-uncased-vocab",
        "clip": "ViT-L-14",
    },
    "deepdanbooru": {"tagger": "model-resnet_custom_v3"},
}
# The optional OpenPose body model (an annotator file): used instead of mediapipe when installed.
OPENPOSE_BODY_MODEL = "body_pose_model"
T = TypeVar("T")


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``scale`` x (``width``, ``height``), each side rounded to the nearest multiple of 8: the
    size of a hires-fixed txt2img result."""
    return (max(8, 8 * round(width * scale / 8)), max(8, 8 * round(height * scale / 8)))


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size`` times ``scale``, each side rounded half up (at least 1 pixel): the size of an
    upscaled image."""
    return (max(1, math.floor(size[0] * scale + 0.5)), max(1, math.floor(size[1] * scale + 0.5)))


# The embedded single-user account (requests without a key when keys are optional), and the
# anonymous account behind the public key (lowest priority).
LOCAL_ACCOUNT = "local"
PUBLIC_ACCOUNT = "public"
LOCAL_NODE_NAME = "local"  # the embedded worker's node, owned by the local account


@dataclass(frozen=True)
class Account:
    """Who a request or a node belongs to. ``honor`` is the ledger's sum when read."""

    id: str
    nickname: str
    is_admin: bool = False
    can_run_nodes: bool = False
    honor: float = 0.0


class TaskStatus(IntEnum):
    """Where a task stands. 0-3 are the reference's status numbers; a cancelled task is an
    outcome of its own here, and a failure (3) on the wire: use ``wire`` for what a client sees.
    """

    PENDING = 0
    PROCESSING = 1
    SUCCESS = 2
    FAILURE = 3
    CANCELLED = 4

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED)

    @property
    def wire(self) -> int:
        """The reference's status number (a cancelled task is a failure there)."""
        return int(TaskStatus.FAILURE if self == TaskStatus.CANCELLED else self)


class TaskKind(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    UPSCALE = "upscale"
    DETECT = "detect"  # a ControlNet preprocessor's output, to see what a model is given
    INTERROGATE = "interrogate"  # a caption of an image (clip) or its tags (deepdanbooru)


class ModelKind(StrEnum):
    CHECKPOINT = "checkpoint"
    LORA = "lora"
    CONTROLNET = "controlnet"
    UPSCALER = "upscaler"
    INTERROGATOR = "interrogator"  # the CLIP, BLIP and DeepDanbooru weights of interrogate
    ANNOTATOR = "annotator"  # preprocessor weights, e.g. the OpenPose body model
    VAE = "vae"  # a separate VAE, e.g. SDXL's fp16-fix
    EMBEDDING = "embedding"  # a textual-inversion embedding, used by its name in a prompt

    @property
    def folder(self) -> str:
        """Sub-folder of the models directory holding this kind."""
        return {"controlnet": "controlnet"}.get(self.value, f"{self.value}s")


class ModelFamily(StrEnum):
    """The Stable Diffusion generation a checkpoint, LoRA, ControlNet or VAE belongs to: files
    of one family only work with checkpoints of the same family."""

    SD15 = "sd15"  # Stable Diffusion 1.x
    SDXL = "sdxl"  # Stable Diffusion XL

    @property
    def native_size(self) -> int:
        """The side of the square images the family was trained on: the default size."""
        return 1024 if self is ModelFamily.SDXL else 512


@dataclass(frozen=True)
class ModelRef:
    """A model as a task names it: the sha256 of its file, and the name it had when resolved."""

    sha256: str
    name: str

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's short model hash: the first 10 hex digits of the sha256."""
        return self.sha256[:10]


@dataclass(frozen=True)
class InstalledModel:
    """A model file found in the models directory. On the API side a model only a node has is
    one too; its ``path`` then names no local file (it means something only where the file is).
    """

    kind: ModelKind
    name: str
    sha256: str
    path: Path
    size: int
    # Checkpoints, LoRAs and ControlNets: the family they work with (see dan.models.families);
    # None for other kinds, and where it is not known (taken as SD 1.x).
    family: ModelFamily | None = None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(sha256=self.sha256, name=self.name)


def family_of(model: InstalledModel) -> ModelFamily:
    """The family a checkpoint, LoRA or ControlNet works with; SD 1.x where it is not known."""
    return model.family or ModelFamily.SD15


class ResizeMode(IntEnum):
    """How an input image is fitted to the requested size (AUTOMATIC1111's modes)."""

    JUST_RESIZE = 0
    CROP_AND_RESIZE = 1
    RESIZE_AND_FILL = 2


class MaskMode(IntEnum):
    REGENERATE_MASKED = 0  # white (or opaque) mask pixels are regenerated
    REGENERATE_UNMASKED = 1


class MaskedContent(IntEnum):
    """What the masked part starts from before it is denoised (A1111's ``inpainting_fill``)."""

    FILL = 0  # the colours around the mask, spread into it
    ORIGINAL = 1  # the picture as it is


class InpaintArea(IntEnum):
    WHOLE_PICTURE = 0
    ONLY_MASKED = 1  # crop around the mask (with padding), regenerate the crop, paste it back


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA applied to a task, and its weight."""

    model: ModelRef
    weight: float


@dataclass(frozen=True)
class UpscalerChoice:
    """An upscaler by its A1111 name; ``model`` is the file of a model upscaler (ESRGAN...)."""

    name: str
    model: ModelRef | None = None


@dataclass(frozen=True)
class HiresFix:
    """txt2img's ``upscale``: generate, upscale by ``scale``, denoise again."""

    scale: float
    denoising_strength: float
    upscaler: UpscalerChoice
    steps: int = 0  # steps of the second pass (A1111's "hires steps"); 0: the first pass's

    def second_pass_steps(self, first_pass_steps: int) -> int:
        """How many steps the second pass runs."""
        return self.steps or first_pass_steps


# "none": the control image is used as it is (already an edge map or a drawn pose).
CONTROLNET_PREPROCESSORS: tuple[str, ...] = ("canny", "openpose", "none")
# Each names a kind of control; the checkpoint's family picks the ControlNet file (sd15_canny
# on an SDXL checkpoint is SDXL's canny ControlNet), see dan.tasks.order_models.
CONTROLNET_MODELS: tuple[str, ...] = ("sd15_canny", "sd15_openpose", "sdxl_canny", "sdxl_openpose")


@dataclass(frozen=True)
class ControlNetSpec:
    """The one ControlNet unit a request may carry (the reference uses only the first)."""

    image_key: str  # blob key of the control image (PNG, as uploaded)
    preprocess: str  # one of CONTROLNET_PREPROCESSORS
    model: ModelRef  # the ControlNet file
    weight: float = 1.0
    resize_mode: ResizeMode = ResizeMode.JUST_RESIZE
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False
    low_threshold: int = 100  # canny only
    high_threshold: int = 200
    pose_model: ModelRef | None = None  # openpose: the OpenPose body model, else mediapipe


@dataclass(frozen=True)
class GenerationRequest:
    """A txt2img request after validation: every value is explicit, the seed is resolved."""

    prompt: str
    negative_prompt: str
    seed: int
    sampler_name: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    model: ModelRef
    loras: tuple[LoraSpec, ...] = ()
    hires: HiresFix | None = None
    control_net: ControlNetSpec | None = None
    # A1111's batches: ``batch_size`` images go through the UNet together, ``n_iter`` batches
    # run one after another; image i has the seed ``seed + i``.
    batch_size: int = 1
    n_iter: int = 1
    # A1111's "Clip skip": SD 1.x prompts are encoded by the text encoder's layer -clip_skip
    # (1: the last). SDXL records it but ignores it, as A1111 does by default.
    clip_skip: int = 1
    vae: ModelRef | None = None  # a VAE file used instead of the checkpoint's own
    # The textual-inversion embeddings whose names the prompts use (resolved at submission).
    embeddings: tuple[ModelRef, ...] = ()
    # A1111 1.9+'s schedule type (see dan.samplers). A request stored before it existed has
    # none: Automatic, with the schedule in an old combined sampler name ("DPM++ SDE Karras").
    scheduler: str = AUTOMATIC

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def sampling(self) -> tuple[str, str]:
        """The sampler and schedule type that run, in today's names (an old combined name is
        split: "DPM++ SDE Karras" is DPM++ SDE on Karras)."""
        return choose(self.sampler_name, self.scheduler)

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of every image, in order: A1111's ``seed + i``."""
        return tuple(self.seed + i for i in range(self.images))

    def batch_seeds(self, iteration: int) -> tuple[int, ...]:
        """The seeds of batch ``iteration`` (0-based): ``seed + iteration * batch_size + j``."""
        first = self.seed + iteration * self.batch_size
        return tuple(range(first, first + self.batch_size))

    def to_params(self) -> dict[str, Any]:
        return _to_params(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerationRequest:
        return _from_params(cls, params)


@dataclass(frozen=True)
class InpaintSpec:
    mask_key: str  # blob key of the mask (grayscale PNG, as uploaded)
    mask_blur: int
    mask_mode: MaskMode
    inpaint_area: InpaintArea
    padding: int = 32  # A1111's "only masked padding", pixels around the mask's box
    fill: MaskedContent = MaskedContent.ORIGINAL  # what the masked part starts from


@dataclass(frozen=True)
class Img2ImgRequest:
    """An img2img (or inpaint) request: the generation, and the image it starts from."""

    generation: GenerationRequest  # width x height is the size of the result
    init_image_key: str  # blob key of the input image (PNG, as uploaded)
    resize_mode: ResizeMode
    denoising_strength: float
    inpaint: InpaintSpec | None = None

    def to_params(self) -> dict[str, Any]:
        return _to_params(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Img2ImgRequest:
        return _from_params(cls, params)


@dataclass(frozen=True)
class UpscaleRequest:
    """Standalone upscaling, as the original service's extras endpoint."""

    image_key: str
    rate: float
    upscaler: UpscalerChoice
    upscaler2: UpscalerChoice | None = None
    upscaler2_factor: float = 0.0  # how much of upscaler2's result is blended in

    def to_params(self) -> dict[str, Any]:
        return _to_params(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> UpscaleRequest:
        return _from_params(cls, params)


@dataclass(frozen=True)
class DetectRequest:
    """Run a ControlNet preprocessor on an image and return its control image."""

    image_key: str
    preprocess: str  # one of CONTROLNET_PREPROCESSORS
    low_threshold: int = 100
    high_threshold: int = 200
    pose_model: ModelRef | None = None  # openpose: the OpenPose body model, else mediapipe

    def to_params(self) -> dict[str, Any]:
        return _to_params(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DetectRequest:
        return _from_params(cls, params)


@dataclass(frozen=True)
class InterrogateRequest:
    """Describe an image: ``model`` is a key of INTERROGATOR_PARTS; ``files`` maps each of its
    roles to the interrogator file resolved when the task was submitted."""

    image_key: str
    model: str
    files: dict[str, ModelRef]

    def to_params(self) -> dict[str, Any]:
        return _to_params(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> InterrogateRequest:
        return _from_params(cls, params)


def _to_params(value: Any) -> dict[str, Any]:
    """JSON-ready dict of a request dataclass (what the task row stores)."""
    dumped: dict[str, Any] = _adapter(type(value)).dump_python(value, mode="json")
    return dumped


def _from_params(cls: type[T], params: dict[str, Any]) -> T:
    validated: T = _adapter(cls).validate_python(params)
    return validated


def _adapter(cls: Any) -> TypeAdapter[Any]:
    """One TypeAdapter per request type: building one costs milliseconds, using it microseconds."""
    return _ADAPTERS(cls)  # type: ignore[arg-type]


_ADAPTERS = functools.cache(TypeAdapter)


@dataclass(frozen=True)
class TaskResult:
    """What a finished task produced: keys of its images in the blob store and their seeds, or
    the caption of an interrogate task."""

    image_keys: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    caption: str | None = None


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored. ``queue_position`` is filled in only by reads that compute it."""

    id: str
    account: str
    kind: TaskKind
    status: TaskStatus
    params: dict[str, Any]
    created_at: float  # UNIX seconds
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    error: str | None = None
    result: TaskResult = field(default_factory=TaskResult)
    attempts: int = 0
    cancel_requested: bool = False
    expired: bool = False
    queue_position: int = 0
    warning: str | None = None  # set only on the record a submit returns
    preview: bytes | None = None  # the latest step preview (a small PNG) while it runs
    seq: int = 0  # its place among all tasks ever queued (history pages by it)


@dataclass(frozen=True)
class ClaimedTask:
    """A task a worker holds a lease on."""

    id: str
    kind: TaskKind
    params: dict[str, Any]
    attempt: int
    # What tasks it may share a UNet batch with (dan.tasks.needs.batch_key); None: none.
    batch_key: str | None = None


# The files a task names, by sha256: its checkpoint, LoRAs and model upscalers.
ModelFiles = Mapping[str, InstalledModel]

# Called by the engine after every denoising step with (steps done, steps in all).
# It raises dan.errors.TaskCancelled to stop the run.
ProgressCallback = Callable[[int, int], None]

# Offered a step preview by the engine, as a function that draws it: the sink draws it only
# when it wants one (a few times a second at most), so a preview costs nothing otherwise.
PreviewSink = Callable[[Callable[[], "Image"]], None]
