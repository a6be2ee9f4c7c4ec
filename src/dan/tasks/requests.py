"""How each order becomes a domain request, ready to queue.

Turning an order (dan.tasks.orders) into a request resolves every model it names to the
sha256 of an installed file (dan.tasks.order_models), picks the seed, decodes the input images
and checks the values together (dan.tasks.order_checks: sizes and batches, seeds, masks,
families), so that every mistake a client can make is reported at submission, naming the
field, and never as a failed task. The request comes with the input images to store and what
the task needs to run (dan.tasks.needs).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from dan.config import Settings
from dan.domain import (
    INTERROGATOR_PARTS,
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
    ResizeMode,
    UpscaleRequest,
    family_of,
    hires_size,
    scaled_size,
)
from dan.errors import InvalidArgument
from dan.imaging import decode_image, encode_input_png
from dan.samplers import check_steps, choose
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
    check_batch,
    check_batch_pixels,
    check_clip_skip,
    check_denoising_steps,
    check_families,
    check_seeds,
    is_none,
    mask_image,
)
from dan.tasks.order_models import ModelResolution, OrderModels
from dan.tasks.orders import (
    ControlNetOrder,
    DetectOrder,
    GenerationOrder,
    Img2ImgOrder,
    InpaintOrder,
    InterrogateOrder,
    Txt2ImgOrder,
    UpscaleOrder,
)

MAX_UPSCALED_SIDE = 8192


@dataclass(frozen=True)
class Prepared:
    """A request ready to queue, the input images to store with it (blob key -> PNG), and
    what it needs to run."""

    params: dict[str, object]
    inputs: dict[str, bytes]
    needs: Needs = field(default_factory=Needs)


class RequestBuilder(ModelResolution):
    """Each order as a request ready to queue (see the module docstring); the models it
    names are resolved by ModelResolution (dan.tasks.order_models)."""

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
