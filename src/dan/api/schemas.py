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
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from dan.domain import SAMPLERS, SEED_MAX

MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MIN_CFG, MAX_CFG = 1.0, 30.0

_SAMPLER_BY_LOWER = {name.lower(): name for name in SAMPLERS}


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
    name = _SAMPLER_BY_LOWER.get(value.strip().lower()) if isinstance(value, str) else None
    if name is None:
        raise _fail(f"must be one of {', '.join(SAMPLERS)}; got {value!r}")
    return name


Text = Annotated[str, BeforeValidator(_text)]
ModelName = Annotated[str | None, BeforeValidator(_optional_name)]
SamplerName = Annotated[str, BeforeValidator(_sampler)]

# Fields of the reference that later work will implement. Until then a request that uses them
# is refused, never silently served without them.
NOT_YET_SUPPORTED = {
    "loras": "LoRAs",
    "upscale": "hires-fix upscaling",
    "control_net": "ControlNet",
}


class Txt2ImgBody(BaseModel):
    """Body of ``POST /api/sd/txt2img`` (and its async and v0 forms)."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text = ""
    negative_prompt: Text = ""
    seed: integer(0, SEED_MAX, also=-1) = -1  # type: ignore[valid-type]
    sampler_name: SamplerName = "Euler a"
    steps: integer(1, MAX_STEPS) = 20  # type: ignore[valid-type]
    cfg_scale: real(MIN_CFG, MAX_CFG) = 7.0  # type: ignore[valid-type]
    width: integer(MIN_SIZE, MAX_SIZE, multiple_of=8) = 512  # type: ignore[valid-type]
    height: integer(MIN_SIZE, MAX_SIZE, multiple_of=8) = 512  # type: ignore[valid-type]
    model: ModelName = None
    loras: Any = None
    upscale: Any = None
    control_net: Any = None

    @field_validator(*NOT_YET_SUPPORTED)
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, [], {}):
            feature = NOT_YET_SUPPORTED[str(info.field_name)]
            raise _fail(
                f"this server does not support {feature} yet; remove the '{info.field_name}' field"
            )
        return None


class TaskIdBody(BaseModel):
    """Body of ``POST /api/sd/task/status`` and ``/api/sd/task/cancel``."""

    model_config = ConfigDict(extra="ignore")

    taskId: Annotated[str, Field(min_length=1, max_length=64)]
