"""Wire schemas: the request bodies of the DAN API, validated with messages that teach.

Unknown fields are ignored, as the original service did. Numbers may arrive as JSON numbers or
numeric strings (the original accepted both); anything else is a 400 that names the field and
the valid range. Nothing is clamped.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dan.domain import (
    CONTROLNET_MODELS,
    CONTROLNET_PREPROCESSORS,
    INTERROGATOR_PARTS,
    MAX_BATCH_SIZE,
    MAX_CLIP_SKIP,
    MAX_IMAGES,
    MAX_N_ITER,
    SEED_MAX,
)
from dan.samplers import AUTOMATIC, SamplerRefused, choose, schedule_type
from dan.webhooks.addresses import parse_callback_url

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MIN_CFG, MAX_CFG = 1.0, 30.0


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("dan_invalid", message)


def _as_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _fail(f"must be {what}, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _fail(f"must be {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise _fail(f"must be {what}, got {value!r}")
    return number


def integer(lo: int, hi: int, *, multiple_of: int = 1, also: int | None = None) -> Any:
    """An int field in [lo, hi] (or exactly ``also``), a multiple of ``multiple_of``."""
    what = f"an integer between {lo} and {hi}"
    if multiple_of > 1:
        what = f"a multiple of {multiple_of} between {lo} and {hi}"
    if also is not None:
        what = f"{also} or {what}"

    def check(value: Any) -> int:
        number = _as_number(value, what)
        ok = number.is_integer() and (
            number == also or (lo <= number <= hi and number % multiple_of == 0)
        )
        if not ok:
            raise _fail(f"must be {what}, got {value!r}")
        return int(number)

    return Annotated[int, BeforeValidator(check)]


def real(lo: float, hi: float) -> Any:
    """A float field in [lo, hi]."""
    what = f"a number between {lo:g} and {hi:g}"

    def check(value: Any) -> float:
        number = _as_number(value, what)
        if not lo <= number <= hi:
            raise _fail(f"must be {what}, got {value!r}")
        return number

    return Annotated[float, BeforeValidator(check)]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(f"must be a string, got {type(value).__name__}")
    return value


def _optional_name(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(f"must be a model sha256, short hash or name (a string), got {value!r}")
    return value.strip()


def _sampler(value: Any) -> str:
    """A sampler DAN knows, or an old combined name ("DPM++ 2M Karras"); the service splits
    it and checks it against ``scheduler``."""
    try:
        choose(value)
    except SamplerRefused as exc:
        raise _fail(exc.reason) from None
    return str(value).strip()


def _scheduler(value: Any) -> str:
    try:
        return schedule_type(value)
    except SamplerRefused as exc:
        raise _fail(exc.reason) from None


Text = Annotated[str, BeforeValidator(_text)]
ModelName = Annotated[str | None, BeforeValidator(_optional_name)]
SamplerName = Annotated[str, BeforeValidator(_sampler)]
SchedulerName = Annotated[str, BeforeValidator(_scheduler)]

MAX_LORAS = 8
LORA_WEIGHT = 4.0


def _loras(value: Any) -> tuple[tuple[str, float], ...]:
    """``[[hash, weight], ...]`` as the reference writes it."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _fail('must be a list of [hash, weight] pairs, e.g. [["62efe75048", 0.6]]')
    if len(value) > MAX_LORAS:
        raise _fail(f"at most {MAX_LORAS} LoRAs per request, got {len(value)}")
    return tuple(_lora_pair(i, pair) for i, pair in enumerate(value))


def _lora_pair(index: int, pair: Any) -> tuple[str, float]:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise _fail(f"entry {index} must be a [hash, weight] pair, got {pair!r}")
    ref, weight = pair
    if not isinstance(ref, str) or not ref.strip():
        raise _fail(f"entry {index}: the LoRA must be a sha256, short hash or name, got {ref!r}")
    what = f"a number between {-LORA_WEIGHT:g} and {LORA_WEIGHT:g}"
    try:
        number = _as_number(weight, what)
    except PydanticCustomError:
        number = math.nan
    if not -LORA_WEIGHT <= number <= LORA_WEIGHT:
        raise _fail(f"entry {index}: the weight must be {what}, got {weight!r}")
    return ref.strip(), number


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(f"must be a name (a string), got {value!r}")
    return value.strip()


Loras = Annotated[tuple[tuple[str, float], ...], BeforeValidator(_loras)]
Name = Annotated[str, BeforeValidator(_name)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _callback_url(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(f"must be an http:// or https:// URL (a string), got {value!r}")
    try:
        parse_callback_url(value)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return value


class Submission(Body):
    """What every submit may add: ``callback_url``, where DAN POSTs the task's final status,
    signed, when it ends (see dan.webhooks; the address is checked when the task is queued)."""

    callback_url: Annotated[str | None, BeforeValidator(_callback_url)] = None


class HiresBody(Body):
    """txt2img's ``upscale``: hires fix."""

    denoising_strength: real(0.0, 1.0) = 0.5  # type: ignore[valid-type]
    scale: real(1.0, 2.0) = 2.0  # type: ignore[valid-type]
    upscaler: Name = "Latent"

    @field_validator("scale")
    @classmethod
    def _above_one(cls, value: float) -> float:
        if value <= 1.0:
            raise _fail(f"must be above 1 and at most 2, got {value:g}")
        return value


class InpaintBody(Body):
    """img2img's ``inpaint``. White (or opaque) mask pixels are regenerated."""

    mask: str
    mask_blur: integer(0, 64) = 0  # type: ignore[valid-type]
    mask_mode: integer(0, 1) = 0  # type: ignore[valid-type]
    inpaint_area: integer(0, 1) = 0  # type: ignore[valid-type]


def _preprocess(value: Any) -> str:
    name = value.strip().lower() if isinstance(value, str) else None
    name = "openpose" if name == "openopse" else name  # the reference's spelling, once
    if name not in CONTROLNET_PREPROCESSORS:
        raise _fail(f"must be one of {', '.join(CONTROLNET_PREPROCESSORS)}; got {value!r}")
    return name


def _controlnet_model(value: Any) -> str:
    if value not in CONTROLNET_MODELS:
        raise _fail(f"must be one of {', '.join(CONTROLNET_MODELS)}; got {value!r}")
    return str(value)


class ControlNetBody(Body):
    """One unit of ``control_net`` (only the first is used, as the reference says)."""

    image: str
    preprocess: Annotated[str, BeforeValidator(_preprocess)]
    model: Annotated[str, BeforeValidator(_controlnet_model)]
    preprocess_param1: real(0, 255) | None = None  # type: ignore[valid-type]
    preprocess_param2: real(0, 255) | None = None  # type: ignore[valid-type]
    weight: real(0, 2) = 1.0  # type: ignore[valid-type]
    resize_mode: integer(0, 2) = 0  # type: ignore[valid-type]
    guidance_start: real(0, 1) = 0.0  # type: ignore[valid-type]
    guidance_end: real(0, 1) = 1.0  # type: ignore[valid-type]
    # The reference documents ``guessmode``; the original server read ``guess_mode``.
    guessmode: bool | None = None
    guess_mode: bool | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ControlNetBody:
        if self.guidance_start > self.guidance_end:
            raise _fail(
                f"guidance_start ({self.guidance_start:g}) must not be after guidance_end "
                f"({self.guidance_end:g})"
            )
        return self

    @property
    def thresholds(self) -> tuple[int, int]:
        low = 100 if self.preprocess_param1 is None else int(self.preprocess_param1)
        high = 200 if self.preprocess_param2 is None else int(self.preprocess_param2)
        return low, high

    @property
    def guess(self) -> bool:
        return bool(self.guessmode or self.guess_mode)


def _units(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class GenerationBody(Submission):
    """Fields txt2img and img2img share."""

    prompt: Text = ""
    negative_prompt: Text = ""
    seed: integer(0, SEED_MAX, also=-1) = -1  # type: ignore[valid-type]
    sampler_name: SamplerName = "Euler a"
    scheduler: SchedulerName = AUTOMATIC  # A1111 1.9+'s schedule type
    steps: integer(1, MAX_STEPS) = 20  # type: ignore[valid-type]
    cfg_scale: real(MIN_CFG, MAX_CFG) = 7.0  # type: ignore[valid-type]
    # Left out: the checkpoint family's native size (512 for SD 1.x, 1024 for SDXL).
    width: integer(MIN_SIZE, MAX_SIZE, multiple_of=8) | None = None  # type: ignore[valid-type]
    height: integer(MIN_SIZE, MAX_SIZE, multiple_of=8) | None = None  # type: ignore[valid-type]
    model: ModelName = None
    loras: Loras = ()
    control_net: Annotated[list[ControlNetBody] | None, BeforeValidator(_units)] = None
    # A1111's batches: batch_size images at once, n_iter batches one after another.
    batch_size: integer(1, MAX_BATCH_SIZE) = 1  # type: ignore[valid-type]
    n_iter: integer(1, MAX_N_ITER) = 1  # type: ignore[valid-type]
    # A1111's options: the text encoder layer prompts are read from, a VAE file instead of
    # the checkpoint's own (a name or hash from models/vaes; left out: the checkpoint's).
    clip_skip: integer(1, MAX_CLIP_SKIP) = 1  # type: ignore[valid-type]
    vae: ModelName = None

    @model_validator(mode="after")
    def _images(self) -> GenerationBody:
        if self.batch_size * self.n_iter > MAX_IMAGES:
            raise _fail(
                f"batch_size x n_iter: at most {MAX_IMAGES} images per request, got "
                f"{self.batch_size} x {self.n_iter} = {self.batch_size * self.n_iter}"
            )
        return self

    @property
    def control_unit(self) -> ControlNetBody | None:
        """The unit that is used: the first (the reference ignores the others)."""
        return self.control_net[0] if self.control_net else None

    @property
    def ignored_units(self) -> int:
        return max(0, len(self.control_net or []) - 1)


class Txt2ImgBody(GenerationBody):
    """Body of ``POST /api/sd/txt2img`` (and its async and v0 forms)."""

    upscale: HiresBody | None = None


class Img2ImgBody(GenerationBody):
    """Body of ``POST /api/sd/img2img`` (and its async and v0 forms)."""

    init_image: str
    resize_mode: integer(0, 2) = 0  # type: ignore[valid-type]
    denoising_strength: real(0.0, 1.0) = 0.5  # type: ignore[valid-type]
    inpaint: InpaintBody | None = None


class DetectBody(Submission):
    """Body of ``POST /api/sd/controlnet/detect``: what a ControlNet would be conditioned on."""

    image: str
    preprocess: Annotated[str, BeforeValidator(_preprocess)]
    preprocess_param1: real(0, 255) = 100  # type: ignore[valid-type]
    preprocess_param2: real(0, 255) = 200  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _ordered(self) -> DetectBody:
        if self.preprocess == "canny" and self.preprocess_param1 > self.preprocess_param2:
            raise _fail(
                "preprocess_param1: the low canny threshold must not exceed preprocess_param2"
            )
        return self


def _interrogator(value: Any) -> str:
    name = value.strip().lower() if isinstance(value, str) else None
    if name not in INTERROGATOR_PARTS:
        raise _fail(f"must be one of {', '.join(INTERROGATOR_PARTS)}; got {value!r}")
    return name


class InterrogateBody(Submission):
    """Body of ``POST /api/sd/interrogate``: describe an image."""

    image: str
    model: Annotated[str, BeforeValidator(_interrogator)] = "clip"


class UpscaleBody(Submission):
    """Body of ``POST /api/sd/upscale``, the original service's standalone upscaler."""

    image: str
    upscalingRate: real(1.0, 4.0) = 2.0  # type: ignore[valid-type]
    upscaler: Name = "Lanczos"
    upscaler2: str | None = None
    upscaler2_factor: real(0.0, 1.0) = 0.0  # type: ignore[valid-type]


class TaskIdBody(BaseModel):
    """Body of ``POST /api/sd/task/status`` and ``/api/sd/task/cancel``."""

    model_config = ConfigDict(extra="ignore")

    taskId: Annotated[str, Field(min_length=1, max_length=64)]
