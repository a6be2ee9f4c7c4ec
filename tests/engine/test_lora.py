"""kohya LoRAs on the tiny SD1 checkpoint: effect, both key layouts, scaling, exact restoration,
the file cache, and refusals that leave the pipeline clean."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from dan.domain import InstalledModel, ModelKind
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.loading.lora.files import LoraCache, LoraError, adapter_name
from dan.engine.loading.lora.stack import LoraStack
from tests.fixtures.tiny_lora import (
    kohya_state_dict,
    random_lora,
    tiny_modules,
    write_lora,
    write_tiny_lora,
)
from tests.fixtures.tiny_sd import build_models, tiny_configs

slow = pytest.mark.slow
RANK = 4
MiB = 2**20


def installed(path: Path) -> InstalledModel:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return InstalledModel(ModelKind.LORA, path.stem, sha, path, path.stat().st_size)


def load(
    checkpoint: Path, cache_dir: Path, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    pipeline, _ = load_sd_pipeline(
        checkpoint, cache_dir=cache_dir, dtype=dtype, device="cpu", allow_ckpt=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline: StableDiffusionPipeline) -> np.ndarray:
    result = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(result.images[0])


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights, whether or not LoRA layers wrap them."""
    state = module.state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert not [k for k in want if not torch.equal(got[k], want[k])]


@dataclass(frozen=True)
class Base:
    """What the untouched tiny pipeline computes and holds."""

    image: np.ndarray
    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]


def write(path: Path, tensors: dict[str, torch.Tensor]) -> InstalledModel:
    save_file(tensors, path)
    return installed(path)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, InstalledModel]:
    """Tiny LoRAs: ``a`` in both layouts from the same tensors, ``b``, and ``a`` at half alpha."""
    folder = tmp_path_factory.mktemp("loras")
    unet, text_encoder = tiny_modules()
    layers_a = random_lora(unet, text_encoder, rank=RANK, seed=1)
    paths = {
        "a": write_lora(folder / "a.safetensors", layers_a, alpha=RANK),
        "a_ldm": write_lora(folder / "a_ldm.safetensors", layers_a, alpha=RANK, layout="ldm"),
        "a_half_alpha": write_lora(folder / "a_half.safetensors", layers_a, alpha=RANK / 2),
        "b": write_tiny_lora(folder / "b.safetensors", rank=RANK, seed=2),
    }
    return {key: installed(path) for key, path in paths.items()}


@pytest.fixture
def pipeline(tiny_checkpoint: Path, engine_cache_dir: Path) -> StableDiffusionPipeline:
    """A freshly loaded tiny pipeline (LoRA tests change its modules)."""
    return load(tiny_checkpoint, engine_cache_dir)


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path, engine_cache_dir: Path) -> Base:
    fresh = load(tiny_checkpoint, engine_cache_dir)
    return Base(
        image=generate(fresh),
        unet={k: v.clone() for k, v in fresh.unet.state_dict().items()},
        text_encoder={k: v.clone() for k, v in fresh.text_encoder.state_dict().items()},
    )


@pytest.fixture
def stack() -> LoraStack:
    return LoraStack(LoraCache(64 * MiB))


def image_with(
    stack: LoraStack, pipeline: StableDiffusionPipeline, *loras: tuple[InstalledModel, float]
) -> np.ndarray:
    with stack.applied(pipeline, loras):
        return generate(pipeline)


def assert_clean(pipeline: StableDiffusionPipeline, base: Base) -> None:
    """Base weights bit-exact and the base image exactly, adapters or not."""
    assert_exact(base_weights(pipeline.unet), base.unet)
    assert_exact(base_weights(pipeline.text_encoder), base.text_encoder)
    assert np.array_equal(generate(pipeline), base.image)


def tiny_kohya(**renames: str) -> dict[str, torch.Tensor]:
    unet, text_encoder = tiny_modules()
    layers = random_lora(unet, text_encoder, rank=RANK, seed=3)
    state = kohya_state_dict(layers, alpha=RANK, layout="diffusers", unet_config=unet.config)
    for old, new in renames.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    return state


def without(word: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if word not in k}


# --- effect and restoration ----------------------------------------------------------------


@slow
def test_lora_changes_the_image_and_leaving_restores_the_base_exactly(
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
) -> None:
    with stack.applied(pipeline, [(loras["a"], 1.0)]) as applied:
        image = generate(pipeline)
    assert [spec.model.sha256 for spec in applied] == [loras["a"].sha256]
    assert np.abs(image - base.image).mean() > 0.01
    assert_clean(pipeline, base)
    stack.unload_all(pipeline)  # and without the (disabled) LoRA layers: the same modules
    assert_exact(pipeline.unet.state_dict(), base.unet)
    assert_exact(pipeline.text_encoder.state_dict(), base.text_encoder)
    assert not any("lora" in type(m).__module__ for m in pipeline.unet.modules())


@slow
def test_an_error_inside_the_block_still_restores_the_base(
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
) -> None:
    with pytest.raises(KeyboardInterrupt), stack.applied(pipeline, [(loras["a"], 1.0)]):
        raise KeyboardInterrupt  # what a cancellation looks like from here
    assert_clean(pipeline, base)


@slow
def test_both_key_layouts_give_the_same_image(
    pipeline: StableDiffusionPipeline, stack: LoraStack, loras: dict[str, InstalledModel]
) -> None:
    # a_ldm names every block input_blocks / middle_block / output_blocks: all must map.
    diffusers_style = image_with(stack, pipeline, (loras["a"], 1.0))
    ldm_style = image_with(stack, pipeline, (loras["a_ldm"], 1.0))
    assert np.array_equal(diffusers_style, ldm_style)


@slow
def test_weight_zero_is_the_base(
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
) -> None:
    assert np.array_equal(image_with(stack, pipeline, (loras["a"], 0.0)), base.image)


@slow
def test_alpha_scales_like_the_weight(
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
) -> None:
    half_alpha = image_with(stack, pipeline, (loras["a_half_alpha"], 1.0))
    half_weight = image_with(stack, pipeline, (loras["a"], 0.5))
    full = image_with(stack, pipeline, (loras["a"], 1.0))
    np.testing.assert_allclose(half_alpha, half_weight, atol=1e-6)
    assert np.abs(half_alpha - full).mean() > 0.001
    assert np.abs(half_alpha - base.image).mean() > 0.001


@slow
def test_two_loras_at_once(
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
) -> None:
    a, b = (loras["a"], 0.7), (loras["b"], 0.6)
    only_a, only_b = image_with(stack, pipeline, a), image_with(stack, pipeline, b)
    both = image_with(stack, pipeline, a, b)
    for other in (only_a, only_b, base.image):
        assert np.abs(both - other).mean() > 0.001
    np.testing.assert_allclose(image_with(stack, pipeline, b, a), both, atol=1e-5)
    # The same file twice counts once with the weights summed, as two A1111 tags would.
    np.testing.assert_allclose(
        image_with(stack, pipeline, (loras["a"], 0.3), (loras["a"], 0.4), b), both, atol=1e-5
    )
    assert_clean(pipeline, base)


@slow
def test_unet_only_and_text_encoder_only_loras(
    tmp_path: Path, pipeline: StableDiffusionPipeline, stack: LoraStack, base: Base
) -> None:
    unet_only = write(tmp_path / "unet.safetensors", without("lora_te_", tiny_kohya()))
    text_only = write(tmp_path / "text.safetensors", without("lora_unet_", tiny_kohya()))
    images = [
        image_with(stack, pipeline, (unet_only, 1.0)),
        image_with(stack, pipeline, (text_only, 1.0)),
        image_with(stack, pipeline, (unet_only, 1.0), (text_only, 1.0)),
    ]
    assert all(np.abs(image - base.image).mean() > 0.001 for image in images)
    assert pipeline.get_list_adapters() == {
        "unet": [adapter_name(unet_only.sha256)],
        "text_encoder": [adapter_name(text_only.sha256)],
    }
    assert_clean(pipeline, base)


@slow
def test_fp16_file_on_a_bf16_pipeline_under_inference_mode(
    tmp_path: Path,
    tiny_checkpoint: Path,
    engine_cache_dir: Path,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
) -> None:
    # Real LoRA files are fp16, CPU workers run bf16, and the engine generates under
    # inference_mode: adapter weights made there must still work outside it later.
    pipeline = load(tiny_checkpoint, engine_cache_dir, torch.bfloat16)
    base_image = generate(pipeline)
    tensors = load_file(loras["a"].path)
    fp16 = write(tmp_path / "a16.safetensors", {k: v.half() for k, v in tensors.items()})
    with torch.inference_mode():
        first = image_with(stack, pipeline, (fp16, 1.0))
    assert np.abs(first - base_image).mean() > 0.01
    assert np.array_equal(image_with(stack, pipeline, (fp16, 1.0)), first)
    assert np.array_equal(generate(pipeline), base_image)


# --- cache and switching -------------------------------------------------------------------


@slow
def test_switching_reads_each_file_once_and_never_inherits(
    pipeline: StableDiffusionPipeline, stack: LoraStack, loras: dict[str, InstalledModel]
) -> None:
    first_a = image_with(stack, pipeline, (loras["a"], 1.0))
    first_b = image_with(stack, pipeline, (loras["b"], 1.0))
    for _ in range(2):
        assert np.array_equal(image_with(stack, pipeline, (loras["a"], 1.0)), first_a)
        assert np.array_equal(image_with(stack, pipeline, (loras["b"], 1.0)), first_b)
    assert stack.cache.reads == 2
    # The adapters stay loaded between tasks (that is what makes switching cheap) ...
    assert pipeline.get_list_adapters()["unet"] == [
        adapter_name(loras["a"].sha256),
        adapter_name(loras["b"].sha256),
    ]


@slow
def test_adapters_of_evicted_loras_are_deleted(
    pipeline: StableDiffusionPipeline, loras: dict[str, InstalledModel], base: Base
) -> None:
    stack = LoraStack(LoraCache(budget_bytes=1))  # room for one file
    image_with(stack, pipeline, (loras["a"], 1.0))
    image_with(stack, pipeline, (loras["b"], 1.0))
    assert stack.cache.cached() == [loras["b"].sha256]
    assert pipeline.get_list_adapters()["unet"] == [adapter_name(loras["b"].sha256)]
    image_with(stack, pipeline, (loras["a"], 1.0))  # read again, and b's adapter goes
    assert stack.cache.reads == 3
    assert pipeline.get_list_adapters()["unet"] == [adapter_name(loras["a"].sha256)]
    assert_clean(pipeline, base)


# --- refusals ------------------------------------------------------------------------------


def other_rank_ups() -> dict[str, torch.Tensor]:
    state = tiny_kohya()
    return {k: v[:, :-1].contiguous() if "lora_up" in k else v for k, v in state.items()}


def wider_model_lora() -> dict[str, torch.Tensor]:
    """A LoRA for a model with other widths (as an SD 2.x or SDXL LoRA is for SD1)."""
    configs = tiny_configs()
    configs["unet"] = {
        **configs["unet"],
        "block_out_channels": [64, 128],
        "cross_attention_dim": 64,
    }
    configs["text_encoder"] = {**configs["text_encoder"], "hidden_size": 64}
    with torch.device("meta"):
        unet, _, text_encoder = build_models(configs)
    layers = random_lora(unet, text_encoder, rank=RANK, seed=4)
    return kohya_state_dict(layers, alpha=RANK, layout="diffusers", unet_config=unet.config)


def corrupt(path: Path) -> InstalledModel:
    write_tiny_lora(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return installed(path)


def test_refuses_files_that_are_not_kohya_loras_it_applies(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    cache = LoraCache(64 * MiB)
    cases = {
        "truncated or corrupt": corrupt(tmp_path / "corrupt.safetensors"),
        "Stable Diffusion checkpoint": installed(tiny_checkpoint),
        "not a kohya LoRA": write(tmp_path / "other.safetensors", {"w": torch.zeros(2)}),
        "LoRA and LoHa": write(
            tmp_path / "mixed.safetensors", tiny_kohya(**{"lora_down.weight": "hada_w1_a"})
        ),
        "DoRA": write(tmp_path / "dora.safetensors", tiny_kohya(alpha="dora_scale")),
        "incomplete LoKr": write(
            tmp_path / "lokr.safetensors",
            tiny_kohya(**{"lora_down.weight": "lokr_w1", "lora_up.weight": "lokr_w1_b"}),
        ),
        "no lora_up": write(tmp_path / "half.safetensors", without("lora_up", tiny_kohya())),
        "mismatched shapes": write(tmp_path / "ranks.safetensors", other_rank_ups()),
    }
    for expected, model in cases.items():
        with pytest.raises(LoraError, match=expected) as raised:
            cache.get(model)
        assert model.name in raised.value.message
    assert cache.cached() == []


@slow
@pytest.mark.parametrize(
    ("case", "expected"),
    [("wider", r"unet layers do not fit .* 72 of 72 differ"), ("deeper", r"is an sdxl LoRA")],
)
def test_refuses_loras_for_another_base_and_stays_clean(
    case: str,
    expected: str,
    tmp_path: Path,
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
) -> None:
    # "deeper": also names modules the tiny model lacks (two transformer blocks, as SDXL has:
    # which makes it an SDXL LoRA).
    extra = tiny_kohya(transformer_blocks_0="transformer_blocks_1", layers_0="layers_5")
    tensors = wider_model_lora() if case == "wider" else {**tiny_kohya(), **extra}
    foreign = write(tmp_path / f"{case}.safetensors", tensors)
    with pytest.raises(LoraError, match=expected) as raised:
        image_with(stack, pipeline, (loras["a"], 1.0), (foreign, 1.0))
    assert foreign.name in raised.value.message
    # A LoRA of the other family is refused before anything loads; a misfit once ``a`` has.
    loaded = [] if case == "deeper" else [adapter_name(loras["a"].sha256)]
    assert pipeline.get_list_adapters().get("unet", []) == loaded
    assert_clean(pipeline, base)
    stack.unload_all(pipeline)
    assert_exact(pipeline.unet.state_dict(), base.unet)


def test_weight_must_be_finite(stack: LoraStack, loras: dict[str, InstalledModel]) -> None:
    with (
        pytest.raises(LoraError, match="finite"),
        stack.applied(None, [(loras["a"], float("nan"))]),
    ):
        pass


@slow
def test_a_loader_failure_midway_leaves_no_trace(
    pipeline: StableDiffusionPipeline,
    stack: LoraStack,
    loras: dict[str, InstalledModel],
    base: Base,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("size mismatch for encoder.layers.0 ...\n(and 100 more lines)")

    # The UNet part is loaded when the text encoder part fails.
    monkeypatch.setattr(pipeline, "load_lora_into_text_encoder", fail)
    with pytest.raises(LoraError, match=r"'a' .* does not fit this checkpoint: size mismatch"):
        image_with(stack, pipeline, (loras["a"], 1.0))
    assert pipeline.get_list_adapters() == {}
    assert_exact(pipeline.unet.state_dict(), base.unet)
    assert np.array_equal(generate(pipeline), base.image)
