"""Orders: what a client asked for.

An order carries the client's values after type and range checks, nothing resolved yet: the
models it names are names, its images base64. dan.tasks.requests turns each into a domain
request, reporting every mistake a client can make at submission, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from dan.samplers import AUTOMATIC


@dataclass(frozen=True)
class ControlNetOrder:
    image: str  # base64
    preprocess: str
    # An API name (CONTROLNET_MODELS): it says the kind of control, canny or openpose; the
    # checkpoint's family says which ControlNet (sd15_canny on an SDXL checkpoint: SDXL's canny).
    model: str
    weight: float = 1.0
    resize_mode: int = 0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False
    low_threshold: int = 100
    high_threshold: int = 200


@dataclass(frozen=True)
class GenerationOrder:
    prompt: str
    negative_prompt: str
    seed: int  # -1: pick one
    sampler_name: str
    steps: int
    cfg_scale: float
    width: int | None  # None: the checkpoint family's native size (512 SD 1.x, 1024 SDXL)
    height: int | None
    model: str | None
    loras: tuple[tuple[str, float], ...] = ()
    control_net: ControlNetOrder | None = None
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int = 1
    vae: str | None = None  # a VAE file's name or hash; None (or Automatic/None): the checkpoint's
    scheduler: str = AUTOMATIC  # A1111 1.9+'s schedule type (dan.samplers)


@dataclass(frozen=True)
class HiresOrder:
    scale: float
    denoising_strength: float
    upscaler: str
    steps: int = 0  # of the second pass; 0: as many as the first


@dataclass(frozen=True)
class Txt2ImgOrder:
    generation: GenerationOrder
    hires: HiresOrder | None = None


@dataclass(frozen=True)
class InpaintOrder:
    mask: str  # base64
    mask_blur: int
    mask_mode: int
    inpaint_area: int
    padding: int = 32  # pixels around the mask's box, for inpaint_area ONLY_MASKED
    fill: int = 1  # a MaskedContent: what the masked part starts from


@dataclass(frozen=True)
class Img2ImgOrder:
    generation: GenerationOrder
    init_image: str  # base64
    resize_mode: int
    denoising_strength: float
    inpaint: InpaintOrder | None = None


@dataclass(frozen=True)
class UpscaleOrder:
    image: str  # base64
    rate: float
    upscaler: str
    upscaler2: str | None
    upscaler2_factor: float


@dataclass(frozen=True)
class DetectOrder:
    image: str  # base64
    preprocess: str
    low: int = 100
    high: int = 200


@dataclass(frozen=True)
class InterrogateOrder:
    image: str  # base64
    model: str  # a key of INTERROGATOR_PARTS
