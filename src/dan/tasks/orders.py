"""Orders: what a client asked for, and how each becomes a domain request.

An order carries the client's values after type and range checks. Turning it into a request
resolves every model it names (checkpoint, LoRAs, model upscalers) to the sha256 of an installed
file, picks the seed, and decodes the input images, so that every mistake a client can make is
reported at submission, naming the field, and never as a failed task.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from dan.config import Settings
from dan.domain import (
    IMAGE_UPSCALERS,
    INTERROGATOR_PARTS,
    LATENT_UPSCALERS,
    OPENPOSE_BODY_MODEL,
    SEED_MAX,
    ControlNetSpec,
    DetectRequest,
    GenerationRequest,
    HiresFix,
    Img2ImgRequest,
    InpaintArea,
    InpaintSpec,
    InstalledModel,
    InterrogateRequest,
    LoraSpec,
    MaskedContent,
    MaskMode,
    ModelFamily,
    ModelKind,
    ModelRef,
    ResizeMode,
    UpscalerChoice,
    UpscaleRequest,
    family_of,
    hires_size,
    scaled_size,
)
from dan.errors import InvalidArgument, ModelNotFound, ResourceUnavailable
from dan.imaging import decode_image, encode_input_png
from dan.prompt_tags import extract_lora_tags
from dan.samplers import AUTOMATIC, check_steps, choose
from dan.tasks.base import Expected
from dan.tasks.needs import (
    BASE_PIXELS,
    INTERROGATE_COST,
    MIN_COST,
    Needs,
    batch_key,
    generation_needs,
)
from dan.tasks.order_checks import (
    Lora,
    check_batch,
    check_batch_pixels,
    check_clip_skip,
    check_controlnet_family,
    check_denoising_steps,
    check_families,
    check_seeds,
    is_none,
    mask_image,
    pull_name,
    uses_word,
)

MAX_UPSCALED_SIDE = 8192
CHECKPOINT_VAE = ("", "automatic", "none")  # A1111's sd_vae values for the checkpoint's own


class ModelLookup(Protocol):
    """What orders need of the model registry."""

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel: ...

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None: ...

    def list(self, kind: ModelKind) -> list[InstalledModel]: ...


class OrderModels(ModelLookup, Protocol):
    """What building orders needs beyond lookups: the models installed on this server."""

    def installed_here(self, kind: ModelKind) -> list[InstalledModel]:
        """The models of ``kind`` in this server's own models folder (none a node reports)."""
        ...


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


@dataclass(frozen=True)
class Prepared:
    """A request ready to queue, the input images to store with it (blob key -> PNG), and
    what it needs to run."""

    params: dict[str, object]
    inputs: dict[str, bytes]
    needs: Needs = field(default_factory=Needs)


class RequestBuilder:
    def __init__(
        self,
        models: OrderModels,
        settings: Settings,
        *,
        random_seed: Callable[[], int] = lambda: secrets.randbelow(2**32),
    ) -> None:
        self._models = models
        self._settings = settings
        self._random_seed = random_seed

    def txt2img(self, order: Txt2ImgOrder, task_id: str) -> Prepared:
        inputs: dict[str, bytes] = {}
        request = self._generation(order.generation, task_id, inputs)
        if order.hires is not None:
            hires = order.hires
            upscaler = self._upscaler(hires.upscaler, "upscale.upscaler", latent=True)
            hires_fix = HiresFix(hires.scale, hires.denoising_strength, upscaler, hires.steps)
            check_steps(request.sampler_name, hires.steps, "upscale.steps")
            request = replace(request, hires=hires_fix)
            second = hires_size(request.width, request.height, hires.scale)
            check_batch_pixels(request.batch_size, *second, " in hires fix's second pass")
        needs = generation_needs(request, family=self._family(request))
        needs = replace(needs, batch_key=batch_key(request))
        return Prepared(request.to_params(), inputs, needs)

    def img2img(self, order: Img2ImgOrder, task_id: str) -> Prepared:
        inputs: dict[str, bytes] = {}
        generation = self._generation(order.generation, task_id, inputs)
        check_denoising_steps(generation.steps, order.denoising_strength)
        init = decode_image(order.init_image, "init_image")
        inputs[f"{task_id}/init.png"] = encode_input_png(init.convert("RGB"))
        inpaint = None
        if order.inpaint is not None:
            inpaint = _inpaint(order.inpaint, f"{task_id}/mask.png")
            mask = mask_image(order.inpaint.mask, init, MaskMode(order.inpaint.mask_mode))
            inputs[inpaint.mask_key] = encode_input_png(mask)
        request = Img2ImgRequest(
            generation=generation,
            init_image_key=f"{task_id}/init.png",
            resize_mode=ResizeMode(order.resize_mode),
            denoising_strength=order.denoising_strength,
            inpaint=inpaint,
        )
        # Only-masked inpainting pastes its crop back into the picture at its own size.
        only_masked = inpaint is not None and inpaint.inpaint_area == InpaintArea.ONLY_MASKED
        size = init.size if only_masked else None
        family = self._family(generation)
        needs = generation_needs(generation, order.denoising_strength, size, family)
        return Prepared(request.to_params(), inputs, needs)

    def upscale(self, order: UpscaleOrder, task_id: str) -> Prepared:
        image = decode_image(order.image, "image")
        longest = max(image.size) * order.rate
        if longest > MAX_UPSCALED_SIDE:
            raise InvalidArgument(
                f"Invalid upscalingRate: {image.width}x{image.height} x {order.rate:g} would be "
                f"{longest:.0f} pixels wide; at most {MAX_UPSCALED_SIDE} are produced"
            )
        second = order.upscaler2
        request = UpscaleRequest(
            image_key=f"{task_id}/input.png",
            rate=order.rate,
            upscaler=self._upscaler(order.upscaler, "upscaler", latent=False),
            upscaler2=None
            if second is None or is_none(second)
            else self._upscaler(second, "upscaler2", latent=False),
            upscaler2_factor=order.upscaler2_factor,
        )
        models = [c.model.sha256 for c in (request.upscaler, request.upscaler2) if c and c.model]
        megapixels = image.width * image.height * order.rate**2 / BASE_PIXELS
        output = Expected(1, *scaled_size(image.size, order.rate))
        needs = Needs(None, tuple(models), max(MIN_COST, megapixels / 4), output)
        return Prepared(
            request.to_params(), {request.image_key: encode_input_png(image.convert("RGB"))}, needs
        )

    def detect(self, order: DetectOrder, task_id: str) -> Prepared:
        image = decode_image(order.image, "image")
        request = DetectRequest(
            f"{task_id}/input.png",
            order.preprocess,
            order.low,
            order.high,
            pose_model=self._pose_model(order.preprocess),
        )
        pose = (request.pose_model.sha256,) if request.pose_model else ()
        return Prepared(
            request.to_params(),
            {request.image_key: encode_input_png(image.convert("RGB"))},
            Needs(None, pose, MIN_COST, Expected(1, image.width, image.height)),
        )

    def interrogate(self, order: InterrogateOrder, task_id: str) -> Prepared:
        """Raises InvalidArgument for an unknown model or a bad image, ResourceUnavailable
        when a file the interrogator needs is not installed (naming what to pull)."""
        parts = INTERROGATOR_PARTS.get(order.model)
        if parts is None:
            raise InvalidArgument(
                f"Invalid model: interrogate models are {', '.join(INTERROGATOR_PARTS)}, "
                f"got {order.model!r}"
            )
        image = decode_image(order.image, "image")
        files = {role: self._interrogator_file(order.model, name) for role, name in parts.items()}
        request = InterrogateRequest(f"{task_id}/input.png", order.model, files)
        required = tuple(ref.sha256 for ref in files.values())
        needs = Needs(None, required, INTERROGATE_COST, Expected(caption=True))
        return Prepared(
            request.to_params(), {request.image_key: encode_input_png(image.convert("RGB"))}, needs
        )

    # -- pieces ------------------------------------------------------------------------------
    def _interrogator_file(self, model: str, name: str) -> ModelRef:
        try:
            return self._models.resolve(ModelKind.INTERROGATOR, name).ref
        except ModelNotFound as exc:
            raise ResourceUnavailable(
                f"the {model} interrogator needs {name}, which is not installed on this server; "
                f"an administrator can download it with `dan models pull {name}`"
            ) from exc

    def _generation(
        self, order: GenerationOrder, task_id: str, inputs: dict[str, bytes]
    ) -> GenerationRequest:
        """The request; a control image is added to ``inputs``."""
        self._check_prompt("prompt", order.prompt)
        self._check_prompt("negative_prompt", order.negative_prompt)
        checkpoint = self._checkpoint(order.model)
        native = family_of(checkpoint).native_size
        width, height = order.width or native, order.height or native
        check_batch(order, width, height)
        check_seeds(order)
        loras = self._loras(order.loras) + self._prompt_loras(order.prompt)
        check_families(checkpoint, loras)
        check_clip_skip(order.clip_skip)
        # An old combined name ("DPM++ 2M Karras") is stored as its sampler and schedule type.
        sampler, schedule = choose(order.sampler_name, order.scheduler)
        check_steps(sampler, order.steps)
        return GenerationRequest(
            prompt=order.prompt,
            negative_prompt=order.negative_prompt,
            # Resolved now, so a task that is re-run after a crash makes the same images.
            seed=self._seed(order),
            sampler_name=sampler,
            scheduler=schedule,
            steps=order.steps,
            cfg_scale=order.cfg_scale,
            width=width,
            height=height,
            model=checkpoint.ref,
            loras=tuple(LoraSpec(lora.ref, weight) for lora, weight in loras),
            control_net=self._control_net(order.control_net, checkpoint, task_id, inputs),
            batch_size=order.batch_size,
            n_iter=order.n_iter,
            clip_skip=order.clip_skip,
            vae=self._vae(order.vae),
            embeddings=self._embeddings(order, family_of(checkpoint)),
        )

    def _vae(self, name: str | None) -> ModelRef | None:
        """The VAE file ``name`` names; None for the checkpoint's own (A1111's "Automatic"
        and "None" included)."""
        if name is None or name.strip().lower() in CHECKPOINT_VAE:
            return None
        try:
            return self._models.resolve(ModelKind.VAE, name).ref
        except ModelNotFound as exc:
            raise ModelNotFound(
                f"Invalid vae: {exc.message}; put VAE .safetensors files into models/vaes, or "
                "leave vae out for the checkpoint's own"
            ) from exc

    def _embeddings(self, order: GenerationOrder, family: ModelFamily) -> tuple[ModelRef, ...]:
        """The embeddings installed here, of the checkpoint's family, whose names either
        prompt uses as a word (A1111 matches embedding names in the prompt; case does not
        matter). Never one only a node reports: a node naming its file "cat" would otherwise
        make every prompt with that word need its file, so that only its own nodes could run
        them."""
        text = f"{order.prompt}\n{order.negative_prompt}".casefold()
        return tuple(
            model.ref
            for model in self._models.installed_here(ModelKind.EMBEDDING)
            if family_of(model) == family
            and model.name.casefold() in text  # cheap before the word match
            and uses_word(text, model.name)
        )

    def _family(self, request: GenerationRequest) -> ModelFamily:
        """The family of the request's checkpoint (resolved already: a lookup by sha256)."""
        checkpoint = self._models.resolve(ModelKind.CHECKPOINT, request.model.sha256)
        return family_of(checkpoint)

    def _seed(self, order: GenerationOrder) -> int:
        """The order's seed, or a random one whose images' seeds (``seed + i``) all stay
        within SEED_MAX, so each can be asked for again."""
        if order.seed >= 0:
            return order.seed
        return self._random_seed() % (SEED_MAX + 2 - order.batch_size * order.n_iter)

    def _control_net(
        self,
        order: ControlNetOrder | None,
        checkpoint: InstalledModel,
        task_id: str,
        inputs: dict[str, bytes],
    ) -> ControlNetSpec | None:
        if order is None:
            return None
        key = f"{task_id}/control.png"
        image = decode_image(order.image, "control_net.0.image")
        inputs[key] = encode_input_png(image.convert("RGB"))
        if order.preprocess == "canny" and order.low_threshold > order.high_threshold:
            raise InvalidArgument(
                "Invalid control_net.0.preprocess_param1: the low canny threshold "
                f"({order.low_threshold}) must not exceed the high one ({order.high_threshold})"
            )
        model = self._controlnet_file(order.model, checkpoint)
        return ControlNetSpec(
            image_key=key,
            preprocess=order.preprocess,
            model=model.ref,
            weight=order.weight,
            resize_mode=ResizeMode(order.resize_mode),
            guidance_start=order.guidance_start,
            guidance_end=order.guidance_end,
            guess_mode=order.guess_mode,
            low_threshold=order.low_threshold,
            high_threshold=order.high_threshold,
            pose_model=self._pose_model(order.preprocess),
        )

    def _pose_model(self, preprocess: str) -> ModelRef | None:
        """The OpenPose body model for an openpose preprocess, when installed (the worker
        falls back to mediapipe's bundled pose model without it)."""
        if preprocess != "openpose":
            return None
        try:
            return self._models.resolve(ModelKind.ANNOTATOR, OPENPOSE_BODY_MODEL).ref
        except ModelNotFound:
            return None

    def _controlnet_file(self, name: str, checkpoint: InstalledModel) -> InstalledModel:
        """The file serving the API ControlNet ``name`` on ``checkpoint``: the ControlNet of
        ``name``'s kind (canny, openpose) for the checkpoint's family, the catalog's file (alias
        ``<family>_<kind>``) else a file named ``control_<family>_<kind>.*`` (fine-tuned or
        converted files). Raises ModelNotFound when none is installed, InvalidArgument when the
        file found is of another family than the checkpoint's."""
        family = family_of(checkpoint)
        wanted = f"{family.value}_{name.partition('_')[2]}"  # sd15_canny, sdxl_canny, ...
        for ref in (wanted, f"control_{wanted}"):
            try:
                model = self._models.resolve(ModelKind.CONTROLNET, ref)
            except ModelNotFound:
                continue
            check_controlnet_family(model, checkpoint, wanted)
            return model
        raise ModelNotFound(
            f"Invalid control_net.0.model: no ControlNet file serves {name} on {checkpoint.name}"
            f", an {family.value} checkpoint; it needs the {wanted} ControlNet: put "
            f"control_{wanted}.safetensors into models/controlnet, or run "
            f"`dan models pull {pull_name(wanted)}`"
        )

    def _checkpoint(self, ref: str | None) -> InstalledModel:
        if ref is not None:
            try:
                return self._models.resolve(ModelKind.CHECKPOINT, ref)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid model: {exc.message}") from exc
        model = self._models.default_checkpoint(self._settings.default_model)
        if model is None:
            raise ResourceUnavailable(
                "no checkpoint is installed and no online node has a catalog checkpoint; name "
                "one with `model` (see /api/sd/supportedModelInfo), put a .safetensors file in "
                "the models/checkpoints folder, run `dan models pull chillout_mix`, or set "
                "DAN_DEFAULT_MODEL to a checkpoint's sha256"
            )
        return model

    def _loras(self, pairs: tuple[tuple[str, float], ...]) -> tuple[Lora, ...]:
        specs = []
        for index, (ref, weight) in enumerate(pairs):
            try:
                model = self._models.resolve(ModelKind.LORA, ref)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid loras: entry {index}: {exc.message}") from exc
            specs.append((model, weight))
        return tuple(specs)

    def _prompt_loras(self, prompt: str) -> tuple[Lora, ...]:
        try:
            _, tags = extract_lora_tags(prompt)
        except InvalidArgument as exc:
            raise InvalidArgument(f"Invalid prompt: {exc.message}") from exc
        specs = []
        for name, weight in tags:
            try:
                model = self._models.resolve(ModelKind.LORA, name)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid prompt: <lora:{name}>: {exc.message}") from exc
            specs.append((model, weight))
        return tuple(specs)

    def _upscaler(self, name: str, field: str, *, latent: bool) -> UpscalerChoice:
        builtin = IMAGE_UPSCALERS + (LATENT_UPSCALERS if latent else ())
        match = next((b for b in builtin if b.lower() == name.lower()), None)
        if match is not None:
            return UpscalerChoice(match)
        try:
            return UpscalerChoice(name, self._models.resolve(ModelKind.UPSCALER, name).ref)
        except ModelNotFound as exc:
            installed = [m.name for m in self._models.list(ModelKind.UPSCALER)]
            valid = ", ".join(builtin + tuple(installed))
            raise InvalidArgument(
                f"Invalid {field}: {name!r} is not available; use one of {valid}"
            ) from exc

    def _check_prompt(self, field: str, text: str) -> None:
        limit = self._settings.max_prompt_chars
        if len(text) > limit:
            raise InvalidArgument(
                f"Invalid {field}: at most {limit} characters are accepted, got {len(text)}"
            )


def _inpaint(order: InpaintOrder, mask_key: str) -> InpaintSpec:
    return InpaintSpec(
        mask_key=mask_key,
        mask_blur=order.mask_blur,
        mask_mode=MaskMode(order.mask_mode),
        inpaint_area=InpaintArea(order.inpaint_area),
        padding=order.padding,
        fill=MaskedContent(order.fill),
    )
