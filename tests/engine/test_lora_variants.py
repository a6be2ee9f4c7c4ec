"""SDXL kohya LoRAs and the LyCORIS variants (LoHa, LoKr) on both families: each changes the
image as A1111 computes it, scales with its weight, and leaves the base bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dan.domain import InstalledModel
from dan.engine.families import load_checkpoint
from dan.engine.loading.lora.files import LoraCache, LoraError
from dan.engine.loading.lora.lycoris import delta_size, lycoris_delta
from dan.engine.loading.lora.stack import LoraStack
from tests.engine.test_lora import RANK, assert_exact, base_weights, installed
from tests.fixtures.tiny_lora import (
    LoraLayers,
    Variant,
    kohya_name,
    lora_targets,
    random_layers,
    sdxl_kohya_name,
    sdxl_lora_targets,
    write_variant,
)
from tests.fixtures.tiny_sd import write_checkpoint
from tests.fixtures.tiny_sdxl import build_tiny_sdxl

MiB = 2**20
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def test_loha_and_lokr_deltas_are_a1111s() -> None:
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in [(6, 2), (2, 4), (6, 2), (2, 4)])
    loha = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    got = lycoris_delta("LoHa", {**loha, "alpha": torch.tensor(1.0)})
    torch.testing.assert_close(got, (w1a @ w1b) * (w2a @ w2b) / 2)
    w1, a, b = torch.randn(2, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(2, 4)
    lokr = lycoris_delta(
        "LoKr", {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "alpha": 4.0 * torch.ones(())}
    )
    expected = torch.kron(w1, a @ b) * 4.0 / 2
    assert lokr.shape == (6, 8)
    torch.testing.assert_close(lokr, expected)
    assert lokr[3, 4] == pytest.approx(float(w1[1, 1] * (a @ b)[0, 0] * 2), rel=1e-5)
    full = lycoris_delta("LoKr", {"lokr_w1": w1, "lokr_w2": a, "alpha": torch.tensor(9.0)})
    torch.testing.assert_close(full, torch.kron(w1, a))  # no rank: scale 1, as in A1111


def test_a_delta_size_comes_from_the_factor_shapes_alone() -> None:
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in [(6, 2), (2, 4), (6, 2), (2, 4)])
    loha = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    assert delta_size("LoHa", loha) == lycoris_delta("LoHa", loha).numel() == 24
    lokr = {
        "lokr_w1": torch.ones(2, 2),
        "lokr_w2_a": torch.ones(3, 2),
        "lokr_w2_b": torch.ones(2, 4),
    }
    assert delta_size("LoKr", lokr) == lycoris_delta("LoKr", lokr).numel() == 48
    # A hostile file: 800 kB of factors asking for 10^10 values (40 GB) is sized, not computed.
    column, row = torch.ones(100_000, 1), torch.ones(1, 100_000)
    huge = {"hada_w1_a": column, "hada_w1_b": row, "hada_w2_a": column, "hada_w2_b": row}
    assert delta_size("LoHa", huge) == 10**10
    assert delta_size("LoHa", {**loha, "hada_w2_b": torch.ones(3, 4)}) == -1


def generate(pipeline: Any) -> np.ndarray:
    result = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(result.images[0])


class Family:
    """One loaded tiny checkpoint, its untouched weights and image, and a way to write LoRAs
    for it in its family's kohya layout."""

    def __init__(self, pipeline: Any, layers: LoraLayers, name: Callable[[str], str]) -> None:
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline, self.layers, self.name = pipeline, layers, name
        self.image = generate(pipeline)
        self.weights = {c: _weights(pipeline, c) for c in COMPONENTS if hasattr(pipeline, c)}

    def lora(self, path: Path, variant: Variant, alpha: float = RANK) -> InstalledModel:
        write_variant(path, self.layers, variant=variant, alpha=alpha, name=self.name)
        return installed(path)

    def assert_clean(self) -> None:
        for component, weights in self.weights.items():
            assert_exact(_weights(self.pipeline, component), weights)
        assert np.array_equal(generate(self.pipeline), self.image)


def _weights(pipeline: Any, component: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in base_weights(getattr(pipeline, component)).items()}


def _load(path: Path, cache: Path) -> Any:
    pipeline, _, _ = load_checkpoint(
        path, cache_dir=cache, dtype=torch.float32, device="cpu", allow_ckpt=False
    )
    return pipeline


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint: Path, engine_cache_dir: Path) -> Family:
    pipeline = _load(tiny_checkpoint, engine_cache_dir)
    layers = random_layers(lora_targets(pipeline.unet, pipeline.text_encoder), rank=RANK, seed=5)
    config = pipeline.unet.config
    return Family(pipeline, layers, lambda m: kohya_name(m, layout="ldm", unet_config=config))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Family:
    folder = tmp_path_factory.mktemp("sdxl-lora")
    path = write_checkpoint(
        build_tiny_sdxl(seed=0).state_dict, folder / "xl.safetensors", fmt="safetensors"
    )
    pipeline = _load(path, folder / "cache")
    targets = sdxl_lora_targets(pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2)
    layers = random_layers(targets, rank=RANK, seed=6)
    config = pipeline.unet.config
    return Family(pipeline, layers, lambda m: sdxl_kohya_name(m, unet_config=config))


@pytest.fixture(params=["sd1", "sdxl"])
def family(request: pytest.FixtureRequest) -> Family:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def image_with(family: Family, *loras: tuple[InstalledModel, float]) -> np.ndarray:
    stack = LoraStack(LoraCache(64 * MiB))
    try:
        with stack.applied(family.pipeline, loras):
            return generate(family.pipeline)
    finally:
        stack.unload_all(family.pipeline)


@pytest.mark.slow
def test_plain_loras_change_the_image_scale_with_weight_and_leave_no_trace(
    family: Family, tmp_path: Path
) -> None:
    lora = family.lora(tmp_path / "plain.safetensors", "lora")
    half_alpha = family.lora(tmp_path / "half.safetensors", "lora", alpha=RANK / 2)
    full = image_with(family, (lora, 1.0))
    assert np.abs(full - family.image).max() > 0.05
    family.assert_clean()
    np.testing.assert_allclose(
        image_with(family, (lora, 0.5)), image_with(family, (half_alpha, 1.0)), atol=1e-4
    )
    assert np.array_equal(image_with(family, (lora, 0.0)), family.image)
    family.assert_clean()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_lycoris_computes_what_the_same_plain_lora_does(
    family: Family, variant: Variant, tmp_path: Path
) -> None:
    plain = family.lora(tmp_path / "plain.safetensors", "lora")
    lycoris = family.lora(tmp_path / f"{variant}.safetensors", variant)
    expected = image_with(family, (plain, 0.7))
    got = image_with(family, (lycoris, 0.7))
    assert np.abs(got - family.image).max() > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-4)
    family.assert_clean()
    both = image_with(family, (plain, 0.35), (lycoris, 0.35))  # PEFT adapter + weight change
    np.testing.assert_allclose(both, expected, atol=1e-4)
    family.assert_clean()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "loha"])
def test_a_lora_of_the_other_family_is_refused_and_changes_nothing(
    sd1: Family, sdxl: Family, variant: Variant, tmp_path: Path
) -> None:
    for mine, other, expected in ((sd1, sdxl, "sd15 LoRA"), (sdxl, sd1, "sdxl LoRA")):
        foreign = mine.lora(tmp_path / f"{expected[:4]}.safetensors", variant)
        with pytest.raises(LoraError, match=f"{foreign.name}.* is an {expected} and this"):
            image_with(other, (foreign, 1.0))
        other.assert_clean()


@pytest.mark.slow
def test_a_lycoris_layer_that_does_not_fit_is_refused_before_any_change(
    sd1: Family, tmp_path: Path
) -> None:
    layers = dict(sd1.layers)
    first = next(iter(layers))
    layers[first] = type(layers[first])(down=layers[first].down[:, :-1], up=layers[first].up)
    path = tmp_path / "misfit.safetensors"
    write_variant(path, layers, variant="loha", alpha=RANK, name=sd1.name)
    with pytest.raises(LoraError, match=r"do not fit this checkpoint: 1 of \d+ differ"):
        image_with(sd1, (installed(path), 1.0))
    sd1.assert_clean()
