"""img2img and inpainting: A1111 geometry, masks, strength, and the untouched-pixels guarantee."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from dan.domain import (
    GenerationRequest,
    Img2ImgRequest,
    InpaintArea,
    InpaintSpec,
    MaskedContent,
    MaskMode,
    ModelRef,
    ResizeMode,
)
from dan.engine.generation.img2img import run_img2img
from dan.engine.generation.masks import (
    crop_region,
    fill_masked,
    fit_image,
    paste_back,
    prepare_mask,
    to_rgb,
)
from dan.engine.generation.prompts import encode_prompts
from dan.engine.generation.samplers import make_scheduler
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.errors import EngineError
from dan.samplers import SAMPLER_INFO, SAMPLERS, choose

slow = pytest.mark.slow
RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)
MODES = list(ResizeMode)
MASKED, UNMASKED = MaskMode.REGENERATE_MASKED, MaskMode.REGENERATE_UNMASKED


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def noise_image(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(values)


def square_mask(
    size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (20, 16, 44, 40)
) -> Image.Image:
    """Black, with a white rectangle at ``box``."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def striped(width: int, height: int) -> Image.Image:
    """Grey, with a red band on the left and a blue band on the right (10 px each)."""
    image = Image.new("RGB", (width, height), GREY)
    image.paste(RED, (0, 0, 10, height))
    image.paste(BLUE, (width - 10, 0, width, height))
    return image


# --- fit_image ------------------------------------------------------------------------------


def test_just_resize_stretches_the_whole_image() -> None:
    out = pixels(fit_image(striped(100, 50), 64, 64, ResizeMode.JUST_RESIZE))
    assert out.shape == (64, 64, 3)
    assert np.abs(out[:, 0] - RED).max() <= 8 and np.abs(out[:, 63] - BLUE).max() <= 8


def test_crop_and_resize_covers_then_crops_the_centre() -> None:
    # 100x50 scaled to 128x64 covers 64x64; 32 px (25 source px) go on each side: the bands.
    out = pixels(fit_image(striped(100, 50), 64, 64, ResizeMode.CROP_AND_RESIZE))
    assert out.shape == (64, 64, 3)
    assert np.abs(out - GREY).max() <= 2


def test_resize_and_fill_fits_then_repeats_the_edge_rows() -> None:
    # 100x50 scaled to 64x32, centred at rows 16-47; rows above and below repeat rows 16, 47.
    out = pixels(fit_image(striped(100, 50), 64, 64, ResizeMode.RESIZE_AND_FILL))
    assert out.shape == (64, 64, 3)
    assert (out[:16] == out[16]).all() and (out[48:] == out[47]).all()
    assert np.abs(out[16, 0] - RED).max() <= 8 and np.abs(out[16, 63] - BLUE).max() <= 8
    # A tall image gets bands on the left and right that repeat its edge columns.
    tall = pixels(
        fit_image(
            striped(100, 50).transpose(Image.Transpose.TRANSPOSE),
            64,
            64,
            ResizeMode.RESIZE_AND_FILL,
        )
    )
    assert (tall[:, :16] == tall[:, 16:17]).all() and (tall[:, 48:] == tall[:, 47:48]).all()


@pytest.mark.parametrize("mode", MODES)
def test_an_image_of_the_right_size_is_not_resampled(mode: ResizeMode) -> None:
    image = noise_image(0)
    assert (pixels(fit_image(image, 64, 64, mode)) == pixels(image)).all()


def test_transparent_init_images_are_flattened_onto_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(image)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == RED and out.getpixel((1, 1)) == (255,) * 3


# --- masks ----------------------------------------------------------------------------------


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50)
    return Image.open(io.BytesIO(buffer.getvalue()))


def mask_variants(binary: Image.Image) -> dict[str, Image.Image]:
    """The same mask as a client may send it."""
    # Colours contradict the alpha on purpose: a mask with transparency is read by its alpha.
    alpha = Image.merge("RGBA", [*Image.new("RGB", binary.size, "white").split(), binary])
    opaque = binary.convert("RGBA")
    wide = Image.fromarray(np.asarray(binary, dtype=np.uint16) * 257)
    return {
        "grayscale": binary,
        "rgb": binary.convert("RGB"),
        "rgba-alpha": alpha,
        "la-alpha": Image.merge("LA", [Image.new("L", binary.size, 0), binary]),
        "rgba-opaque": opaque,
        "jpeg-rgb": jpeg(binary.convert("RGB")),
        "jpeg-grayscale": jpeg(binary),
        "16-bit": wide,
    }


def test_every_mask_format_gives_the_same_thresholded_mask() -> None:
    binary = square_mask()
    for name, variant in mask_variants(binary).items():
        out = prepare_mask(variant, 64, 64, ResizeMode.JUST_RESIZE, 0, MASKED)
        assert out.mode == "L" and (pixels(out) == pixels(binary)).all(), name


def test_mask_mode_1_inverts_the_mask() -> None:
    normal = prepare_mask(square_mask(), 64, 64, ResizeMode.JUST_RESIZE, 0, MASKED)
    inverted = prepare_mask(square_mask(), 64, 64, ResizeMode.JUST_RESIZE, 0, UNMASKED)
    assert (pixels(inverted) == 255 - pixels(normal)).all()


def test_mask_is_fitted_like_the_image() -> None:
    mask = square_mask((100, 50), (40, 0, 60, 50))
    for mode in MODES:
        out = prepare_mask(mask, 64, 64, mode, 0, MASKED)
        expected = fit_image(mask, 64, 64, mode).point(lambda v: 255 if v > 128 else 0)
        assert out.size == (64, 64) and (pixels(out) == pixels(expected)).all()


def test_mask_blur_feathers_the_edge_only() -> None:
    out = pixels(prepare_mask(square_mask(), 64, 64, ResizeMode.JUST_RESIZE, 4, MASKED))
    assert out[28, 32] == 255 and out[0, 0] == 0 and 0 < out[16, 32] < 255
    assert ((out > 0) & (out < 255)).any()


def test_mask_errors_teach() -> None:
    with pytest.raises(EngineError, match="mask_blur must be between 0 and 64"):
        prepare_mask(square_mask(), 64, 64, ResizeMode.JUST_RESIZE, 65, MASKED)
    with pytest.raises(EngineError, match="no white"):
        prepare_mask(Image.new("L", (64, 64), 0), 64, 64, ResizeMode.JUST_RESIZE, 0, MASKED)
    with pytest.raises(EngineError, match="white \\(or opaque\\) everywhere"):
        prepare_mask(Image.new("L", (64, 64), 255), 64, 64, ResizeMode.JUST_RESIZE, 0, UNMASKED)


# --- crop_region and paste_back ------------------------------------------------------------


def test_crop_region_pads_and_takes_the_target_aspect_ratio() -> None:
    mask = square_mask((256, 128), (100, 50, 110, 60))
    assert crop_region(mask, 0, 64, 64) == (100, 50, 110, 60)
    # Padded to 26x26, then widened about its centre to 52x26 for a 64x32 target.
    assert crop_region(mask, 8, 64, 32) == (79, 42, 131, 68)
    # Taller target: the box grows vertically instead.
    assert crop_region(mask, 8, 32, 64) == (92, 29, 118, 81)


def test_crop_region_is_shifted_inside_the_image_then_clipped() -> None:
    at_edge = square_mask((256, 128), (0, 50, 10, 60))
    assert crop_region(at_edge, 8, 64, 32) == (0, 42, 52, 68)  # shifted right, ratio kept
    big = square_mask((64, 64), (10, 10, 50, 50))
    assert crop_region(big, 32, 128, 64) == (0, 0, 64, 64)  # the whole image: clipped
    with pytest.raises(EngineError, match="empty"):
        crop_region(Image.new("L", (64, 64), 0), 8, 64, 64)


def test_fill_spreads_the_surrounding_colours_into_the_mask() -> None:
    """A1111's "fill": a red square on blue, masked, starts out blue; the rest is untouched."""
    image = Image.new("RGB", (64, 64), BLUE)
    image.paste(RED, (20, 16, 44, 40))
    mask = square_mask()
    filled = pixels(fill_masked(image, mask))
    white = np.asarray(mask) == 255
    assert (filled[~white] == pixels(image)[~white]).all()
    assert np.abs(filled[white] - np.array(BLUE)).max() <= 8


def test_paste_back_keeps_unmasked_pixels_byte_identical() -> None:
    original, generated = noise_image(1), noise_image(2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(128, (0, 32, 64, 64))
    mask.paste(255, (0, 48, 64, 64))
    out = pixels(paste_back(original, generated, mask))
    assert (out[:32] == pixels(original)[:32]).all()
    assert (out[48:] == pixels(generated)[48:]).all()
    halfway = (pixels(original)[32:48] * 127 + pixels(generated)[32:48] * 128 + 127) // 255
    assert (out[32:48] == halfway).all()


def test_paste_back_puts_the_crop_in_its_box() -> None:
    original, crop = noise_image(1, 96, 80), noise_image(2, 24, 24)
    mask = square_mask((96, 80), (30, 20, 54, 44))
    out = pixels(paste_back(original, crop, mask, (30, 20, 54, 44)))
    assert out.shape == (80, 96, 3)
    assert (out[20:44, 30:54] == pixels(crop)).all()
    assert (out[np.asarray(mask) == 0] == pixels(original)[np.asarray(mask) == 0]).all()


# --- generation on the tiny checkpoints ----------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(
    tiny_checkpoint: Path, tiny_inpaint_checkpoint: Path, engine_cache_dir: Path
) -> dict[int, StableDiffusionPipeline]:
    """The base pipelines by UNet input channels: 4 (ordinary) and 9 (inpainting)."""
    paths = {4: tiny_checkpoint, 9: tiny_inpaint_checkpoint}
    return {
        channels: load_sd_pipeline(
            path, cache_dir=engine_cache_dir, dtype=torch.float32, device="cpu", allow_ckpt=False
        )[0]
        for channels, path in paths.items()
    }


def img2img_request(
    strength: float = 0.6,
    inpaint: InpaintSpec | None = None,
    resize_mode: ResizeMode = ResizeMode.JUST_RESIZE,
    **generation: object,
) -> Img2ImgRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 1,
        "sampler_name": "Euler a",
        "steps": 4,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": ModelRef("a" * 64, "tiny"),
    }
    values.update(generation)
    request = GenerationRequest(**values)  # type: ignore[arg-type]
    return Img2ImgRequest(request, "init", resize_mode, strength, inpaint)


def inpaint_spec(
    blur: int = 0, mode: MaskMode = MASKED, area: InpaintArea = InpaintArea.WHOLE_PICTURE
) -> InpaintSpec:
    return InpaintSpec("mask", blur, mode, area, padding=8)


def generate(
    base: StableDiffusionPipeline,
    request: Img2ImgRequest,
    init: Image.Image,
    mask: Image.Image | None = None,
    steps_seen: list[int] | None = None,
) -> Image.Image:
    """What DiffusersEngine.img2img does around run_img2img."""
    generation = request.generation
    embeds, negative = encode_prompts(
        base.tokenizer, base.text_encoder, generation.prompt, "", device="cpu", dtype=torch.float32
    )

    def on_step_end(
        pipe: object, step: int, timestep: object, kwargs: dict[str, object]
    ) -> dict[str, object]:
        if steps_seen is not None:
            steps_seen.append(step)
        return kwargs

    [image] = run_img2img(
        base,
        request,
        init,
        mask,
        scheduler=make_scheduler(
            generation.sampler_name, base.scheduler.config, seed=generation.seed
        ),
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        generator=[torch.Generator("cpu").manual_seed(generation.seed)],
        callback_on_step_end=on_step_end,
    )
    return image


@slow
@pytest.mark.parametrize("channels", [4, 9])
def test_strength_0_returns_the_input_through_the_vae(
    pipelines: dict[int, StableDiffusionPipeline], channels: int
) -> None:
    base, init, seen = pipelines[channels], noise_image(3), list[int]()
    out = generate(base, img2img_request(0.0), init, steps_seen=seen)
    with torch.no_grad():
        x = torch.from_numpy(pixels(init)).permute(2, 0, 1)[None].float() / 127.5 - 1
        decoded = base.vae.decode(base.vae.encode(x).latent_dist.mean).sample
    expected = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().numpy()
    assert seen == []  # the UNet never ran
    assert np.abs(pixels(out) - expected).max() <= 1


@slow
@pytest.mark.parametrize("channels", [4, 9])
def test_strength_1_ignores_the_input(
    pipelines: dict[int, StableDiffusionPipeline], channels: int
) -> None:
    first = generate(pipelines[channels], img2img_request(1.0), noise_image(4))
    second = generate(pipelines[channels], img2img_request(1.0), Image.new("RGB", (64, 64)))
    assert (pixels(first) == pixels(second)).all()


@slow
def test_img2img_is_deterministic_and_has_the_requested_size(
    pipelines: dict[int, StableDiffusionPipeline],
) -> None:
    base, init = pipelines[4], striped(100, 50)
    request = img2img_request(0.5, resize_mode=ResizeMode.CROP_AND_RESIZE, width=64, height=32)
    first, again = generate(base, request, init), generate(base, request, init)
    other_seed = generate(base, img2img_request(0.5, seed=2, width=64, height=32), init)
    assert first.size == (64, 32)
    assert (pixels(first) == pixels(again)).all()
    assert (pixels(first) != pixels(other_seed)).any()


@slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_strength_times_steps(
    pipelines: dict[int, StableDiffusionPipeline], sampler: str
) -> None:
    seen: list[int] = []
    init, mask = noise_image(5), square_mask()
    request = img2img_request(0.5, inpaint_spec(), sampler_name=sampler)
    out = generate(pipelines[4], request, init, mask, steps_seen=seen)
    # int(4 * 0.5) = 2 steps; a second-order sampler evaluates the model 2 * 2 - 1 times.
    second_order = SAMPLER_INFO[choose(sampler)[0]].unet_calls == 2
    assert len(seen) == (3 if second_order else 2)
    keep = np.asarray(mask) == 0
    assert (pixels(out)[keep] == pixels(init)[keep]).all()


@slow
def test_too_few_denoising_steps_are_rejected(
    pipelines: dict[int, StableDiffusionPipeline],
) -> None:
    with pytest.raises(EngineError, match=r"int\(3 \* 0.25\) = 0 .* at least 4 steps"):
        generate(pipelines[4], img2img_request(0.25, steps=3), noise_image(0))


@slow
@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("area", list(InpaintArea))
@pytest.mark.parametrize("blur", [0, 4])
def test_inpaint_leaves_unmasked_pixels_byte_identical(
    pipelines: dict[int, StableDiffusionPipeline], channels: int, area: InpaintArea, blur: int
) -> None:
    init, mask = noise_image(6, 96, 96), square_mask((96, 96), (30, 40, 60, 70))
    request = img2img_request(0.75, inpaint_spec(blur, area=area))
    out = generate(pipelines[channels], request, init, mask)
    again = generate(pipelines[channels], request, init, mask)
    if area is InpaintArea.ONLY_MASKED:  # the original's size, regenerated at 64x64
        original, size = init, (96, 96)
    else:  # fitted to 64x64 first
        original, size = fit_image(init, 64, 64, ResizeMode.JUST_RESIZE), (64, 64)
    prepared = np.asarray(prepare_mask(mask, *size, ResizeMode.JUST_RESIZE, blur, MASKED))
    assert out.size == size and (pixels(out) == pixels(again)).all()
    assert (pixels(out)[prepared == 0] == pixels(original)[prepared == 0]).all()
    changed = np.abs(pixels(out) - pixels(original)).max(axis=-1)
    assert changed[prepared > 200].mean() > 20  # the masked part was really redrawn


@slow
@pytest.mark.parametrize("channels", [4, 9])
def test_fill_changes_what_the_masked_part_starts_from(
    pipelines: dict[int, StableDiffusionPipeline], channels: int
) -> None:
    init, mask = noise_image(9), square_mask()
    white = np.asarray(mask) == 255
    original = img2img_request(0.5, inpaint_spec())
    filled = img2img_request(0.5, replace(inpaint_spec(), fill=MaskedContent.FILL))
    kept = pixels(generate(pipelines[channels], original, init, mask))
    started_filled = pixels(generate(pipelines[channels], filled, init, mask))
    assert (started_filled[~white] == kept[~white]).all()  # outside: the picture, both times
    # Ignored, it would be the same image (runs are deterministic); the 9-channel model also
    # sees the masked picture, blanked under the mask either way, so it changes less.
    assert np.abs(started_filled - kept).max(axis=-1)[white].mean() > 2


@slow
def test_only_masked_keeps_the_init_size_for_any_target(
    pipelines: dict[int, StableDiffusionPipeline],
) -> None:
    # A mask in the corner of a 100x70 image, regenerated at 64x32: the box is shifted inside.
    init, mask = noise_image(8, 100, 70), square_mask((100, 70), (80, 0, 100, 20))
    spec = inpaint_spec(2, area=InpaintArea.ONLY_MASKED)
    out = pixels(
        generate(pipelines[4], img2img_request(0.75, spec, width=64, height=32), init, mask)
    )
    keep = np.asarray(prepare_mask(mask, 100, 70, ResizeMode.JUST_RESIZE, 2, MASKED)) == 0
    assert out.shape == (70, 100, 3) and (out[keep] == pixels(init)[keep]).all()
    assert np.abs(out - pixels(init)).max(axis=-1)[np.asarray(mask) == 255].mean() > 20


@slow
@pytest.mark.parametrize("channels", [4, 9])
def test_mask_mode_1_regenerates_the_other_part(
    pipelines: dict[int, StableDiffusionPipeline], channels: int
) -> None:
    init, mask = noise_image(7), square_mask()
    white = np.asarray(mask) == 255
    inverted = img2img_request(0.75, inpaint_spec(mode=UNMASKED))
    out = pixels(generate(pipelines[channels], inverted, init, mask))
    assert (out[white] == pixels(init)[white]).all()
    assert np.abs(out - pixels(init)).max(axis=-1)[~white].mean() > 20


@slow
def test_inconsistent_inputs_are_rejected(pipelines: dict[int, StableDiffusionPipeline]) -> None:
    base, init = pipelines[4], noise_image(0)
    with pytest.raises(EngineError, match="mask is 32x32 but the init image is 64x64"):
        generate(base, img2img_request(inpaint=inpaint_spec()), init, square_mask((32, 32)))
    with pytest.raises(EngineError, match="mask is required exactly when"):
        generate(base, img2img_request(), init, square_mask())
    with pytest.raises(EngineError, match="mask is required exactly when"):
        generate(base, img2img_request(inpaint=inpaint_spec()), init)
