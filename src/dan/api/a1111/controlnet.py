"""ControlNet units of A1111 requests (``alwayson_scripts.ControlNet.args``, as the ControlNet
extension and webuiapi's ControlNetUnit write them) and ``/controlnet/detect`` -> DAN's orders.

DAN runs one unit per request, with the canny or openpose preprocessor (or none, for an image
that already is a control image) and a canny or openpose ControlNet: a model title of
/controlnet/model_list (or any model name saying canny or openpose) picks the file serving that
ControlNet, "None" the module's own; the checkpoint's family picks which file (an SDXL
checkpoint gets the SDXL canny or openpose ControlNet, whichever title names it).
``control_mode`` "Balanced" is DAN's ordinary conditioning, "ControlNet is more important" its
guess mode (control on the prompt's half of classifier-free guidance only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dan.api.a1111.errors import invalid
from dan.api.a1111.schemas import ControlNetUnitArgs, DetectRequest
from dan.errors import InvalidArgument
from dan.tasks.orders import ControlNetOrder, DetectOrder

CONTROLNET_SCRIPT = "controlnet"
CONTROLNET_ARGS = "alwayson_scripts.ControlNet.args"
CONTROLNET_MODULES = ("none", "canny", "openpose")  # none: the image is the control image
CONTROLNET_MODELS = {"canny": "sd15_canny", "openpose": "sd15_openpose"}
CONTROLNET_RESIZE_MODES = {
    "just resize": 0,
    "crop and resize": 1,
    "inner fit (scale to fit)": 1,
    "scale to fit (inner fit)": 1,
    "resize and fill": 2,
    "outer fit (shrink to fit)": 2,
    "envelope (outer fit)": 2,
}
BALANCED, CONTROL_MORE_IMPORTANT = "balanced", "controlnet is more important"
CONTROL_MODES = {"0": BALANCED, "2": CONTROL_MORE_IMPORTANT}
CANNY_DEFAULTS = (100, 200)
TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


@dataclass(frozen=True)
class IndexedUnit:
    index: int
    unit: ControlNetUnitArgs

    @property
    def field(self) -> str:
        return f"alwayson_scripts.ControlNet.args.{self.index}"


def control_unit(scripts: dict[str, Any], init_image: str | None) -> ControlNetOrder | None:
    """The ControlNet order of ``alwayson_scripts`` (at most one enabled unit; an empty args
    list is none), or None. An img2img unit without an image is given ``init_image``, as the
    ControlNet extension does."""
    units = enabled_units(controlnet_args(scripts))
    if not units:
        return None
    if len(units) > 1:
        raise invalid(
            "alwayson_scripts.ControlNet.args",
            f"DAN runs one ControlNet unit per request; {len(units)} are enabled",
        )
    return controlnet_order(units[0], init_image)


def controlnet_args(scripts: dict[str, Any]) -> list[Any]:
    """The ControlNet script's args; other always-on scripts are refused unless their args
    are empty (clients send ``{"args": []}`` for extensions they believe installed)."""
    found: list[Any] = []
    for name, value in scripts.items():
        args = value.get("args", []) if isinstance(value, dict) else value
        if not isinstance(args, list):
            raise invalid(f"alwayson_scripts.{name}", 'must be {"args": [...]}')
        if name.casefold() == CONTROLNET_SCRIPT:
            found = args
        elif args:
            raise invalid(
                "alwayson_scripts", f"DAN has no always-on script {name!r}; it has ControlNet"
            )
    return found


def enabled_units(args: list[Any]) -> list[IndexedUnit]:
    units = []
    for index, arg in enumerate(args):
        field = f"alwayson_scripts.ControlNet.args.{index}"
        if not isinstance(arg, dict):
            raise invalid(field, "must be a ControlNet unit object (module, model, image ...)")
        try:
            unit = ControlNetUnitArgs.model_validate(arg)
        except ValidationError as exc:
            raise validation_failure(field, exc) from exc
        if unit.enabled:
            units.append(IndexedUnit(index, unit))
    return units


def validation_failure(field: str, exc: ValidationError) -> InvalidArgument:
    first = exc.errors()[0]
    where = ".".join([field, *(str(part) for part in first.get("loc", ()))])
    return invalid(where, str(first.get("msg", "invalid value")))


def controlnet_order(indexed: IndexedUnit, init_image: str | None) -> ControlNetOrder:
    unit, field = indexed.unit, indexed.field
    module = controlnet_module(unit.module, f"{field}.module")
    image = unit.image_data or init_image
    if image is None:
        raise invalid(f"{field}.image", "a ControlNet unit needs a control image (base64)")
    if unit.mask_data:
        raise invalid(f"{field}.mask", "ControlNet unit masks are not supported")
    if unit.guidance_start > unit.guidance_end:
        raise invalid(f"{field}.guidance_start", "must not be after guidance_end")
    if unit.hr_option.casefold() != "both":
        raise invalid(f"{field}.hr_option", "DAN conditions both hires passes: use Both")
    low, high = thresholds(unit, module, field)
    return ControlNetOrder(
        image=image,
        preprocess=module,
        model=controlnet_model(unit.model, module, f"{field}.model"),
        weight=unit.weight,
        resize_mode=controlnet_resize_mode(unit.resize_mode, f"{field}.resize_mode"),
        guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end,
        guess_mode=controlnet_guess_mode(unit.control_mode, f"{field}.control_mode"),
        low_threshold=low,
        high_threshold=high,
    )


def controlnet_module(module: str, field: str) -> str:
    name = module.strip().casefold()
    if name not in CONTROLNET_MODULES:
        raise invalid(field, f"must be one of {', '.join(CONTROLNET_MODULES)}; got {module!r}")
    return name


def controlnet_model(title: str, module: str, field: str) -> str:
    """DAN's ControlNet (``sd15_canny``, ``sd15_openpose``) for a model title of
    /controlnet/model_list (or any name saying canny or openpose); "None" means the
    module's."""
    match = TITLE.match(title.strip())
    folded = (match["name"] if match else title.strip()).casefold()
    if folded in ("", "none") and module in CONTROLNET_MODELS:
        return CONTROLNET_MODELS[module]
    for kind, model in CONTROLNET_MODELS.items():
        if kind in folded:
            return model
    raise invalid(
        field,
        f"DAN serves canny and openpose ControlNets (see /controlnet/model_list); got {title!r}"
        + (" with module none, which needs one named" if module == "none" else ""),
    )


def controlnet_resize_mode(value: str | int, field: str) -> int:
    mode = CONTROLNET_RESIZE_MODES.get(str(value).strip().casefold())
    if mode is None and str(value).strip() in ("0", "1", "2"):
        mode = int(str(value).strip())
    if mode is None:
        raise invalid(
            field, f"must be Just Resize, Crop and Resize or Resize and Fill; got {value!r}"
        )
    return mode


def controlnet_guess_mode(value: str | int, field: str) -> bool:
    mode = CONTROL_MODES.get(str(value).strip(), str(value).strip().casefold())
    if mode not in (BALANCED, CONTROL_MORE_IMPORTANT):
        raise invalid(field, f"must be Balanced or ControlNet is more important; got {value!r}")
    return mode == CONTROL_MORE_IMPORTANT


def thresholds(unit: ControlNetUnitArgs, module: str, field: str) -> tuple[int, int]:
    """Canny's low and high thresholds (``threshold_a``/``_b``; -1 means the default)."""
    if module != "canny":
        return CANNY_DEFAULTS
    low = canny_threshold(unit.threshold_a, CANNY_DEFAULTS[0], f"{field}.threshold_a")
    high = canny_threshold(unit.threshold_b, CANNY_DEFAULTS[1], f"{field}.threshold_b")
    if low > high:
        raise invalid(f"{field}.threshold_a", f"the low threshold {low} is above the high {high}")
    return low, high


def canny_threshold(value: float, default: int, field: str) -> int:
    if value == -1:
        return default
    if not 0 <= value <= 255:
        raise invalid(field, f"must be -1 (the default) or between 0 and 255, got {value:g}")
    return int(value)


def detect_orders(body: DetectRequest) -> list[DetectOrder]:
    module = controlnet_module(body.controlnet_module, "controlnet_module")
    if not body.images:
        raise invalid("controlnet_input_images", "send at least one base64 image")
    unit = ControlNetUnitArgs(
        threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b
    )
    low, high = thresholds(unit, module, "controlnet")
    return [DetectOrder(image, module, low, high) for image in body.images]
