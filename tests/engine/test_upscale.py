"""Upscalers by name and hires fix on tiny models: sizes, equivalences, errors, progress."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image as PILImage
from PIL.Image import Image

from dan import domain
from dan.config import Settings
from dan.domain import (
    GenerationRequest,
    HiresFix,
    InstalledModel,
    ModelKind,
    ModelRef,
    ProgressCallback,
    UpscalerChoice,
    UpscaleRequest,
    hires_size,
)
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.hires import (
    decode_latents,
    denoising_calls,
    hires_fix,
    second_pass_steps,
)
from dan.engine.generation.prompts import PromptEmbeds, encode_prompts
from dan.engine.generation.samplers import make_scheduler
from dan.engine.upscaling.upscale import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALE_MODES,
    LATENT_UPSCALERS,
    MODEL_UPSCALERS,
    UPSCALER_NAMES,
    upscale,
    upscale_image,
    upscale_latents,
)
from dan.engine.upscaling.upscale_models import UpscalerModels
from dan.errors import EngineError, TaskCancelled
from dan.models.catalog import load_catalog
from tests.engine.conftest import CPU, installed, model_choice, pixels, record_into

LANCZOS = UpscalerChoice("Lanczos")
NEAREST = UpscalerChoice("Nearest")


# --- names -----------------------------------------------------------------------------------


def test_names_cover_a1111_and_the_catalog_aliases() -> None:
    # The torch-free layers keep copies of the built-in names.
    assert (domain.LATENT_UPSCALERS, domain.IMAGE_UPSCALERS) == (LATENT_UPSCALERS, IMAGE_UPSCALERS)
    assert len(set(UPSCALER_NAMES)) == len(UPSCALER_NAMES)
    assert set(LATENT_UPSCALERS) == set(LATENT_UPSCALE_MODES)
    assert {"Latent", "Latent (nearest-exact)", "Lanczos", "Nearest"} <= set(UPSCALER_NAMES)
    aliases = {
        alias
        for entry in load_catalog().of_kind(ModelKind.UPSCALER)
        if entry.file_name.endswith(".pth")
        for alias in entry.aliases
    }
    assert aliases == set(MODEL_UPSCALERS)


# --- image upscalers -------------------------------------------------------------------------


@pytest.mark.parametrize("choice", [LANCZOS, NEAREST])
@pytest.mark.parametrize(("rate", "size"), [(1.5, (48, 48)), (2, (64, 64)), (4, (128, 128))])
def test_resize_upscalers_give_rate_times_size(
    choice: UpscalerChoice, rate: float, size: tuple[int, int], image: Image, models: UpscalerModels
) -> None:
    result = upscale_image(image, rate, choice, None, models=models)
    assert result.size == size and result.mode == "RGB"


def test_nearest_repeats_pixels(image: Image, models: UpscalerModels) -> None:
    result = upscale_image(image, 2, NEAREST, None, models=models)
    assert (pixels(result) == pixels(image).repeat(2, axis=0).repeat(2, axis=1)).all()


# --- standalone upscaling with a blend -------------------------------------------------------


def test_blend_factor_weighs_the_second_upscaler(
    esrgan_4x: InstalledModel, image: Image, models: UpscalerModels
) -> None:
    files = {esrgan_4x.sha256: esrgan_4x}
    second = model_choice(esrgan_4x)
    lanczos = upscale_image(image, 2, LANCZOS, None, models=models)
    model = upscale_image(image, 2, second, esrgan_4x, models=models)

    def blended(factor: float) -> Image:
        request = UpscaleRequest("key", 2, LANCZOS, second, upscaler2_factor=factor)
        return upscale(request, image, files, models=models)

    assert blended(0).tobytes() == lanczos.tobytes()
    assert blended(1).tobytes() == model.tobytes()
    assert blended(0.5).tobytes() == PILImage.blend(lanczos, model, 0.5).tobytes()
    alone = upscale(UpscaleRequest("key", 2, NEAREST), image, files, models=models)
    assert alone.size == (64, 64)


def test_blend_progress_rises_to_one(
    esrgan_4x: InstalledModel, esrgan_2x: InstalledModel, image: Image
) -> None:
    files = {m.sha256: m for m in (esrgan_4x, esrgan_2x)}
    request = UpscaleRequest(
        "key", 4, model_choice(esrgan_4x), model_choice(esrgan_2x), upscaler2_factor=0.3
    )
    seen: list[tuple[int, int]] = []
    upscale(
        request, image, files, models=UpscalerModels(CPU, tile_size=16), progress=record_into(seen)
    )
    ratios = [done / total for done, total in seen]
    assert ratios == sorted(ratios) and ratios[-1] == 1 and len(seen) > 3


def test_misused_upscaler_names_are_engine_errors(image: Image, models: UpscalerModels) -> None:
    with pytest.raises(EngineError, match="hires fix only"):
        upscale_image(image, 2, UpscalerChoice("Latent"), None, models=models)
    with pytest.raises(EngineError, match="needs its model file"):
        upscale_image(image, 2, UpscalerChoice("ESRGAN 4x"), None, models=models)
    missing = UpscaleRequest("key", 2, UpscalerChoice("x", ModelRef("7" * 64, "x")))
    with pytest.raises(EngineError, match="not given"):
        upscale(missing, image, {}, models=models)


# --- latents ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LATENT_UPSCALERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_modes_give_the_target_shape(mode: str, dtype: torch.dtype) -> None:
    latents = torch.randn(1, 4, 8, 8).to(dtype)
    result = upscale_latents(latents, 96, 128, mode)
    assert result.shape == (1, 4, 16, 12) and result.dtype == dtype


def test_nearest_latents_repeat_and_unknown_modes_fail() -> None:
    latents = torch.randn(1, 4, 8, 8)
    doubled = upscale_latents(latents, 128, 128, "Latent (nearest)")
    assert torch.equal(doubled, latents.repeat_interleave(2, 2).repeat_interleave(2, 3))
    with pytest.raises(EngineError, match="not a latent upscaler"):
        upscale_latents(latents, 128, 128, "Lanczos")


# --- hires fix: sizes and step counts --------------------------------------------------------


def test_hires_size_rounds_to_multiples_of_8() -> None:
    assert hires_size(64, 64, 1.5) == (96, 96)
    assert hires_size(64, 64, 2) == (128, 128)
    assert hires_size(100, 60, 1.5) == (152, 88)


def test_second_pass_runs_the_requested_steps() -> None:
    for steps in range(1, 41):
        for strength in (0.05, 0.1, 0.3, 1 / 3, 0.5, 0.7, 0.75, 0.99, 1.0):
            count = second_pass_steps(steps, strength)
            assert int(count * strength) == steps and int((count - 1) * strength) < steps
    assert second_pass_steps(20, 0) == 0
    # Capped below the 1000 training timesteps: a tiny strength runs fewer steps, or none.
    assert second_pass_steps(20, 0.01) == 999
    assert second_pass_steps(20, 0.0005) == 0


# --- hires fix on the tiny checkpoint --------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    data = tmp_path_factory.mktemp("data")
    return DiffusersEngine(Settings(data_dir=data, device="cpu", dtype="float32"))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> InstalledModel:
    return installed(tiny_checkpoint, "a" * 64, ModelKind.CHECKPOINT)


def generation(hires: HiresFix | None, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "seed": 3,
        "sampler_name": "Euler a",
        "steps": 2,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": ModelRef("a" * 64, "tiny"),
        "hires": hires,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def run_hires(
    engine: DiffusersEngine,
    checkpoint: InstalledModel,
    request: GenerationRequest,
    *,
    upscaler_file: InstalledModel | None = None,
    progress: ProgressCallback = lambda done, total: None,
) -> Image:
    """Hires fix wired the way DiffusersEngine.txt2img wires it."""
    base = engine.pipelines.get(checkpoint).pipeline
    prompt_embeds, negative_embeds = encode_prompts(
        base.tokenizer,
        base.text_encoder,
        request.prompt,
        request.negative_prompt,
        device=engine.device,
        dtype=engine.dtype,
    )
    files = {checkpoint.sha256: checkpoint}
    if upscaler_file is not None:
        files[upscaler_file.sha256] = upscaler_file
    [image] = hires_fix(
        base,
        request,
        PromptEmbeds(prompt_embeds, negative_embeds),
        new_scheduler=lambda: make_scheduler(
            request.sampler_name, base.scheduler.config, seed=request.seed
        ),
        new_generators=lambda: [torch.Generator("cpu").manual_seed(request.seed)],
        files=files,
        upscalers=UpscalerModels(engine.device, engine.dtype, tile_size=32),
        progress=progress,
    )
    return image


def hires(
    upscaler: str | UpscalerChoice, scale: float = 2, strength: float = 0.5, steps: int = 0
) -> HiresFix:
    choice = upscaler if isinstance(upscaler, UpscalerChoice) else UpscalerChoice(upscaler)
    return HiresFix(scale=scale, denoising_strength=strength, upscaler=choice, steps=steps)


@pytest.mark.slow
@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
@pytest.mark.parametrize(("scale", "side"), [(1.5, 96), (2, 128)])
def test_hires_output_is_scale_times_the_size(
    engine: DiffusersEngine, checkpoint: InstalledModel, upscaler: str, scale: float, side: int
) -> None:
    image = run_hires(engine, checkpoint, generation(hires(upscaler, scale)))
    assert image.size == (side, side)


@pytest.mark.slow
def test_hires_with_a_model_upscaler(
    engine: DiffusersEngine, checkpoint: InstalledModel, esrgan_4x: InstalledModel
) -> None:
    request = generation(hires(model_choice(esrgan_4x), 1.5))
    image = run_hires(engine, checkpoint, request, upscaler_file=esrgan_4x)
    again = run_hires(engine, checkpoint, request, upscaler_file=esrgan_4x)
    assert image.size == (96, 96) and image.tobytes() == again.tobytes()


@pytest.mark.slow
def test_denoising_zero_returns_the_upscaled_first_pass(
    engine: DiffusersEngine, checkpoint: InstalledModel
) -> None:
    files = {checkpoint.sha256: checkpoint}
    [plain] = engine.txt2img(generation(None), files, lambda done, total: None)
    image = run_hires(engine, checkpoint, generation(hires("Lanczos", 1.5, strength=0)))
    expected = plain.resize((96, 96), PILImage.Resampling.LANCZOS)
    assert image.tobytes() == expected.tobytes()
    denoised = run_hires(engine, checkpoint, generation(hires("Lanczos", 1.5, strength=0.5)))
    assert denoised.size == (96, 96) and denoised.tobytes() != image.tobytes()


@pytest.mark.slow
def test_denoising_zero_in_latent_mode_decodes_the_interpolated_latents(
    engine: DiffusersEngine, checkpoint: InstalledModel
) -> None:
    request = generation(hires("Latent (nearest)", 2, strength=0))
    image = run_hires(engine, checkpoint, request)
    # The first pass by hand: a txt2img pipeline on the same weights, returning latents.
    base = engine.pipelines.get(checkpoint).pipeline
    scheduler = make_scheduler(request.sampler_name, base.scheduler.config, seed=request.seed)
    pipeline = StableDiffusionPipeline(
        **{**base.components, "scheduler": scheduler}, requires_safety_checker=False
    )
    embeds, negative = encode_prompts(
        base.tokenizer, base.text_encoder, "a red fox", "blurry", device=CPU, dtype=torch.float32
    )
    latents = pipeline(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent",
    ).images
    [expected] = decode_latents(base, upscale_latents(latents, 128, 128, "Latent (nearest)"))
    assert image.size == (128, 128) and image.tobytes() == expected.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "upscaler"), [("Euler a", "Latent"), ("DPM++ SDE", "Nearest")])
def test_progress_spans_both_passes(
    engine: DiffusersEngine, checkpoint: InstalledModel, sampler: str, upscaler: str
) -> None:
    seen: list[tuple[int, int]] = []
    request = generation(hires(upscaler, 2, strength=0.5), sampler_name=sampler)
    run_hires(engine, checkpoint, request, progress=record_into(seen))
    done = [d for d, _ in seen]
    [total] = {t for _, t in seen}
    assert done == sorted(done) and seen[-1] == (total, total)
    # The report between the passes sits at the first pass's share, with steps on either side.
    base = engine.pipelines.get(checkpoint).pipeline
    first = denoising_calls(make_scheduler(sampler, base.scheduler.config, seed=3), 2)
    assert done.index(first) > 0 and done[-1] > first
    # Both passes run `steps` steps (A1111's hires steps 0); a first-order sampler calls back
    # once per step: 2 + 2.
    if sampler == "Euler a":
        assert total == 4 and set(done) == {1, 2, 3, 4}


@pytest.mark.slow
def test_hires_steps_set_the_second_passs_steps(
    engine: DiffusersEngine, checkpoint: InstalledModel
) -> None:
    """A1111's "hires steps": the second pass runs that many steps, the first its own."""
    seen: list[tuple[int, int]] = []
    request = generation(hires("Latent", 2, strength=0.5, steps=3))
    run_hires(engine, checkpoint, request, progress=record_into(seen))
    assert seen[-1] == (2 + 3, 2 + 3)  # Euler a calls back once per step


@pytest.mark.slow
def test_cancelling_in_the_second_pass_stops_the_task(
    engine: DiffusersEngine, checkpoint: InstalledModel
) -> None:
    def cancel_at_three(done: int, total: int) -> None:
        if done == 3:
            raise TaskCancelled()

    with pytest.raises(TaskCancelled):
        run_hires(engine, checkpoint, generation(hires("Latent")), progress=cancel_at_three)
