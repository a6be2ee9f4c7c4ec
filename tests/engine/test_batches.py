"""Several images per request: a batch of ``batch_size`` x ``n_iter`` images is, image for
image, what single requests with the seeds ``seed + i`` give, on every path of the engine.

Batched arithmetic is not bit-identical to one image at a time (GEMMs over a larger batch may
round differently in the last bits), so images are compared within TOLERANCE: the largest
difference of one 8-bit channel of one pixel, measured here in float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dan.config import Settings
from dan.domain import (
    ControlNetSpec,
    GenerationRequest,
    HiresFix,
    Img2ImgRequest,
    InpaintArea,
    InpaintSpec,
    InstalledModel,
    MaskMode,
    ModelFiles,
    ModelKind,
    ModelRef,
    ResizeMode,
    UpscalerChoice,
)
from dan.engine.diffusers_engine import DiffusersEngine
from tests.fixtures.tiny_controlnet import (
    build_tiny_controlnet,
    original_state_dict,
    write_original,
)
from tests.fixtures.tiny_sd import TinySd

pytestmark = pytest.mark.slow

TOLERANCE = 1  # of 255: batched and one-by-one images differ by float rounding at most
CHECKPOINT, CONTROLNET = "a" * 64, "c" * 64


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 1000,
        "sampler_name": "Euler a",
        "steps": 2,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": ModelRef(CHECKPOINT, "tiny"),
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def installed(kind: ModelKind, sha: str, path: Path) -> InstalledModel:
    return InstalledModel(kind, path.stem, sha, path, path.stat().st_size)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    data = tmp_path_factory.mktemp("data")
    return DiffusersEngine(Settings(data_dir=data, device="cpu", dtype="float32"))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def files(
    tiny_sd: TinySd, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> ModelFiles:
    """The tiny checkpoint and a tiny ControlNet, as the worker passes them."""
    controlnet = build_tiny_controlnet(tiny_sd.unet)
    path = tmp_path_factory.mktemp("controlnet") / "control_tiny.safetensors"
    write_original(original_state_dict(controlnet, tiny_sd.unet.config), path)
    return {
        CHECKPOINT: installed(ModelKind.CHECKPOINT, CHECKPOINT, tiny_checkpoint),
        CONTROLNET: installed(ModelKind.CONTROLNET, CONTROLNET, path),
    }


def no_progress(done: int, total: int) -> None:
    pass


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def noise_image(seed: int) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(values)


def ring() -> Image.Image:
    """A white ring on black: what a canny map looks like."""
    y, x = np.ogrid[:64, :64]
    radius = np.hypot(x - 32, y - 32)
    return Image.fromarray((((radius > 14) & (radius < 18)) * 255).astype(np.uint8)).convert("RGB")


def assert_batch_is_its_seeds(
    run: Callable[[GenerationRequest], list[Image.Image]], batched: GenerationRequest
) -> None:
    """``run(batched)`` gives ``batched.images`` images, each within TOLERANCE of ``run`` of a
    single request with its seed, and no two the same."""
    images = run(batched)
    single = replace(batched, batch_size=1, n_iter=1)
    alone = [run(replace(single, seed=seed)) for seed in batched.seeds]
    assert len(images) == batched.images and all(len(one) == 1 for one in alone)
    for image, [expected] in zip(images, alone, strict=True):
        assert image.size == expected.size
        assert np.abs(pixels(image) - pixels(expected)).max() <= TOLERANCE
    first = pixels(images[0])
    assert all(np.abs(pixels(other) - first).mean() > 1 for other in images[1:])


# -- txt2img ---------------------------------------------------------------------------------
# Every sampler that draws noise after the first step (the others only draw the initial
# latents), and a deterministic one.
STOCHASTIC = [
    "Euler a",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE",
    "DPM++ 3M SDE",
    "DPM2 a",
    "DDPM",
    "LCM",
]


@pytest.mark.parametrize("sampler", ["DDIM", *STOCHASTIC])
def test_a_batch_of_three_is_three_single_requests(
    engine: DiffusersEngine, files: ModelFiles, sampler: str
) -> None:
    """Ancestral, SDE, DDPM and LCM samplers draw noise at every step (DPM++ SDE from a
    Brownian tree): each image's must come from its own seed, as its initial noise does."""

    def run(one: GenerationRequest) -> list[Image.Image]:
        return engine.txt2img(one, files, no_progress)

    assert_batch_is_its_seeds(run, request(sampler_name=sampler, batch_size=3))


def test_n_iter_runs_batches_on_the_following_seeds_and_reports_all_steps(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    seen: list[tuple[int, int]] = []

    def run(one: GenerationRequest) -> list[Image.Image]:
        record = seen.append if one.n_iter > 1 else None
        progress = (lambda d, t: record((d, t))) if record else no_progress
        return engine.txt2img(one, files, progress)

    assert_batch_is_its_seeds(run, request(batch_size=2, n_iter=2))
    # Two batches of 2 steps: one progress bar over both, ending at 100 %.
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_batches_both_passes(
    engine: DiffusersEngine, files: ModelFiles, upscaler: str
) -> None:
    hires = HiresFix(1.5, 0.5, UpscalerChoice(upscaler))

    def run(one: GenerationRequest) -> list[Image.Image]:
        return engine.txt2img(one, files, no_progress)

    assert_batch_is_its_seeds(run, request(hires=hires, batch_size=2))


def test_a_controlnet_conditions_every_image_of_a_batch(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    spec = ControlNetSpec("ring", "canny", ModelRef(CONTROLNET, "control"))

    def run(one: GenerationRequest) -> list[Image.Image]:
        return engine.txt2img(one, files, no_progress, ring())

    assert_batch_is_its_seeds(run, request(control_net=spec, batch_size=2))


# -- img2img and inpainting ------------------------------------------------------------------
INPAINT = InpaintSpec("mask", 4, MaskMode.REGENERATE_MASKED, InpaintArea.WHOLE_PICTURE)
ONLY_MASKED = replace(INPAINT, inpaint_area=InpaintArea.ONLY_MASKED)


def square_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    return mask


@pytest.mark.parametrize(
    ("inpaint", "control"),
    [(None, False), (INPAINT, False), (ONLY_MASKED, False), (INPAINT, True)],
    ids=["img2img", "inpaint", "inpaint-only-masked", "inpaint-controlnet"],
)
def test_img2img_and_inpaint_batches_are_their_seeds(
    engine: DiffusersEngine, files: ModelFiles, inpaint: InpaintSpec | None, control: bool
) -> None:
    """Each image encodes the init image with its own generator, as a single request does."""
    init, mask = noise_image(1), square_mask() if inpaint else None
    spec = ControlNetSpec("ring", "canny", ModelRef(CONTROLNET, "control")) if control else None

    def run(one: GenerationRequest) -> list[Image.Image]:
        task = Img2ImgRequest(one, "init", ResizeMode.JUST_RESIZE, 0.75, inpaint)
        return engine.img2img(task, init, mask, files, no_progress, ring() if control else None)

    assert_batch_is_its_seeds(run, request(control_net=spec, steps=4, batch_size=2))


def test_a_9_channel_inpainting_batch_is_its_seeds(
    engine: DiffusersEngine, tiny_inpaint_checkpoint: Path
) -> None:
    """The masked image is encoded per image too (the inpainting UNet's extra input)."""
    model = {CHECKPOINT: installed(ModelKind.CHECKPOINT, CHECKPOINT, tiny_inpaint_checkpoint)}
    init, mask = noise_image(2), square_mask()

    def run(one: GenerationRequest) -> list[Image.Image]:
        task = Img2ImgRequest(one, "init", ResizeMode.JUST_RESIZE, 0.75, INPAINT)
        return engine.img2img(task, init, mask, model, no_progress)

    assert_batch_is_its_seeds(run, request(steps=4, batch_size=2))


def test_strength_0_returns_the_input_once_per_image(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    task = Img2ImgRequest(request(batch_size=2, n_iter=2), "init", ResizeMode.JUST_RESIZE, 0.0)
    images = engine.img2img(task, noise_image(3), None, files, no_progress)
    assert len(images) == 4 and all(
        pixels(i).tobytes() == pixels(images[0]).tobytes() for i in images
    )
