"""Session-wide tiny SD1.x checkpoints for the engine tests (built once, a fraction of a second)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.tiny_sd import TinySd, build_tiny_sd, write_checkpoint


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
