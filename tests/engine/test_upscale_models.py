"""Model upscalers on tiny random-weight ESRGANs: detection, passes, tiling, cache, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL.Image import Image

from dan.domain import InstalledModel
from dan.engine.upscaling.upscale import upscale_image
from dan.engine.upscaling.upscale_models import UnsupportedUpscaler, UpscalerModels, load_upscaler
from dan.errors import EngineError
from tests.engine.conftest import CPU, installed, model_choice, pixels, record_into
from tests.fixtures.tiny_upscaler import esrgan_state_dict, real_esrgan_state_dict, write_upscaler


@pytest.fixture(scope="module")
def real_esrgan_4x(upscaler_dir: Path) -> InstalledModel:
    """Real-ESRGAN layout (params_ema), 4x, like RealESRGAN_x4plus.pth."""
    path = write_upscaler(real_esrgan_state_dict(seed=1), upscaler_dir / "r4.pth")
    return installed(path, "2" * 64)


# --- model upscalers -------------------------------------------------------------------------


def test_fixtures_are_what_spandrel_detects(
    esrgan_4x: InstalledModel, real_esrgan_4x: InstalledModel, esrgan_2x: InstalledModel
) -> None:
    for model_file, scale in ((esrgan_4x, 4), (real_esrgan_4x, 4), (esrgan_2x, 2)):
        model = load_upscaler(model_file.path, CPU)
        assert (model.architecture.id, model.purpose, model.scale) == ("ESRGAN", "SR", scale)


@pytest.mark.parametrize("rate", [2, 4])
@pytest.mark.parametrize("fixture", ["esrgan_4x", "real_esrgan_4x", "esrgan_2x"])
def test_model_upscaler_gives_the_requested_size(
    fixture: str,
    rate: int,
    image: Image,
    models: UpscalerModels,
    request: pytest.FixtureRequest,
) -> None:
    model_file: InstalledModel = request.getfixturevalue(fixture)
    result = upscale_image(image, rate, model_choice(model_file), model_file, models=models)
    assert result.size == (32 * rate, 32 * rate)
    assert pixels(result).std() > 10  # a picture, not a flat or clipped field


def test_a_4x_model_asked_for_2x_is_lanczos_downscaled(
    esrgan_4x: InstalledModel, image: Image, models: UpscalerModels
) -> None:
    choice = model_choice(esrgan_4x)
    at_4x = upscale_image(image, 4, choice, esrgan_4x, models=models)
    at_2x = upscale_image(image, 2, choice, esrgan_4x, models=models)
    assert (pixels(at_2x) == pixels(at_4x.resize((64, 64), PILImage.Resampling.LANCZOS))).all()
    assert models.loads == 1  # the model stayed loaded


def test_a_2x_model_runs_twice_for_4x(
    esrgan_2x: InstalledModel, image: Image, models: UpscalerModels
) -> None:
    choice = model_choice(esrgan_2x)
    once = upscale_image(image, 2, choice, esrgan_2x, models=models)
    twice = upscale_image(image, 4, choice, esrgan_2x, models=models)
    assert (pixels(twice) == pixels(upscale_image(once, 2, choice, esrgan_2x, models=models))).all()


def test_tiles_with_margin_match_the_untiled_result(
    esrgan_4x: InstalledModel, image: Image, models: UpscalerModels
) -> None:
    choice = model_choice(esrgan_4x)
    whole = pixels(upscale_image(image, 4, choice, esrgan_4x, models=models))
    tiled_models = UpscalerModels(CPU, tile_size=12, tile_overlap=16)
    seen: list[tuple[int, int]] = []
    tiled = upscale_image(
        image, 4, choice, esrgan_4x, models=tiled_models, progress=record_into(seen)
    )
    assert np.abs(pixels(tiled) - whole).max() <= 1
    assert seen == [(done, 9) for done in range(1, 10)]  # 3 x 3 tiles of at most 12 px
    # Without a margin the tile borders show: the margin is what makes tiling seamless.
    seams = UpscalerModels(CPU, tile_size=12, tile_overlap=0)
    assert (
        np.abs(pixels(upscale_image(image, 4, choice, esrgan_4x, models=seams)) - whole).max() > 8
    )


def test_cache_keeps_at_most_capacity_models(
    esrgan_4x: InstalledModel, esrgan_2x: InstalledModel, image: Image
) -> None:
    models = UpscalerModels(CPU, capacity=1)
    upscale_image(image, 2, model_choice(esrgan_4x), esrgan_4x, models=models)
    upscale_image(image, 2, model_choice(esrgan_2x), esrgan_2x, models=models)
    assert models.loaded() == [esrgan_2x.sha256] and models.loads == 2


# --- errors ----------------------------------------------------------------------------------


def bad_files(directory: Path) -> list[tuple[Path, str]]:
    """(file, what the error says) for files that must not load as upscalers."""
    garbage = directory / "garbage.pth"
    garbage.write_bytes(b"\x80\x04 not a pickle at all" * 10)
    text = directory / "notes.safetensors"
    text.write_text("these are not tensors")
    unknown = write_upscaler({"encoder.weight": torch.zeros(4, 4)}, directory / "unknown.pth")
    restorer = write_upscaler(esrgan_state_dict(scale=1), directory / "restorer.pth")
    good = write_upscaler(esrgan_state_dict(scale=4), directory / "good.pth").read_bytes()
    truncated = directory / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 2])
    damaged_state = esrgan_state_dict(scale=4)
    damaged_state["model.0.weight"] = torch.zeros(16, 3, 5, 5)  # kernel of the wrong size
    damaged = write_upscaler(damaged_state, directory / "damaged.pth")
    return [
        (garbage, "cannot read"),
        (text, "cannot read"),
        (truncated, "cannot read"),
        (unknown, "not a model architecture"),
        (restorer, "not a super-resolution upscaler"),
        (damaged, "damaged"),
    ]


def test_files_that_are_no_upscaler_are_engine_errors(tmp_path: Path, image: Image) -> None:
    for path, message in bad_files(tmp_path):
        model_file = installed(path, "9" * 64)
        with pytest.raises(UnsupportedUpscaler, match=message) as caught:
            upscale_image(
                image, 2, model_choice(model_file), model_file, models=UpscalerModels(CPU)
            )
        assert isinstance(caught.value, EngineError) and path.name in caught.value.message
