"""Engine test fixtures: tiny SD1.x checkpoints, tiny upscaler models and their helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL.Image import Image

from dan.domain import InstalledModel, ModelKind, ModelRef, ProgressCallback, UpscalerChoice
from dan.engine.upscaling.upscale_models import UpscalerModels
from tests.fixtures.tiny_sd import TinySd, build_tiny_sd, write_checkpoint
from tests.fixtures.tiny_upscaler import esrgan_state_dict, write_upscaler


@pytest.fixture(scope="session")
def engine_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory shared by the session (config folders, tokenizer)."""
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="session")
def tiny_sd() -> TinySd:
    """The tiny 4-channel models (seed 0) and their A1111 state dict. Do not modify them."""
    return build_tiny_sd(in_channels=4, seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_sd() -> TinySd:
    """The tiny 9-channel (inpainting) models (seed 0) and their A1111 state dict."""
    return build_tiny_sd(in_channels=9, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_sd: TinySd, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sd`` written as an A1111 ``.safetensors`` file."""
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sd1.safetensors"
    return write_checkpoint(tiny_sd.state_dict, path, fmt="safetensors")


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(
    tiny_inpaint_sd: TinySd, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """``tiny_inpaint_sd`` written as an A1111 ``.safetensors`` file."""
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-sd1-inpainting.safetensors"
    return write_checkpoint(tiny_inpaint_sd.state_dict, path, fmt="safetensors")


# --- upscalers (test_upscale.py, test_upscale_models.py) -------------------------------------

CPU = torch.device("cpu")


def installed(path: Path, sha: str, kind: ModelKind = ModelKind.UPSCALER) -> InstalledModel:
    return InstalledModel(kind, path.stem, sha, path, path.stat().st_size)


def model_choice(model: InstalledModel, name: str = "ESRGAN 4x") -> UpscalerChoice:
    return UpscalerChoice(name, ModelRef(model.sha256, model.name))


def record_into(seen: list[tuple[int, int]]) -> ProgressCallback:
    return lambda done, total: seen.append((done, total))


def pixels(image: Image) -> np.ndarray:
    return np.asarray(image, dtype=int)


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upscalers")


@pytest.fixture(scope="module")
def esrgan_4x(upscaler_dir: Path) -> InstalledModel:
    """Original ESRGAN layout, 4x, pickled like ESRGAN_4x.pth."""
    return installed(write_upscaler(esrgan_state_dict(scale=4), upscaler_dir / "e4.pth"), "1" * 64)


@pytest.fixture(scope="module")
def esrgan_2x(upscaler_dir: Path) -> InstalledModel:
    """Original ESRGAN layout, 2x, as safetensors."""
    path = write_upscaler(esrgan_state_dict(scale=2, seed=2), upscaler_dir / "e2.safetensors")
    return installed(path, "3" * 64)


@pytest.fixture
def models() -> UpscalerModels:
    """Untiled upscaler models on the CPU."""
    return UpscalerModels(CPU, tile_size=0)


@pytest.fixture
def image() -> Image:
    """A 32 x 32 RGB noise image (seed 0)."""
    rng = np.random.default_rng(0)
    return PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
