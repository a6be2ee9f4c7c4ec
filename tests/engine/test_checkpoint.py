"""Loading SD1.x single-file checkpoints: architecture, key mapping, pipelines, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

from dan.engine.loading.architecture.sd15 import (
    CONFIG_FILES,
    UNET,
    base_configs,
    read_sd1_architecture,
)
from dan.engine.loading.checkpoint import load_sd_pipeline, read_state_dict, write_config_folder
from dan.errors import UnsupportedCheckpoint
from tests.fixtures.tiny_sd import (
    CLIP,
    TinySd,
    a1111_state_dict,
    build_models,
    tiny_configs,
    write_checkpoint,
    write_tiny_checkpoint,
)


def load(
    path: Path, cache_dir: Path, *, dtype: torch.dtype = torch.float32, allow_ckpt: bool = False
) -> StableDiffusionPipeline:
    pipeline, _ = load_sd_pipeline(
        path, cache_dir=cache_dir, dtype=dtype, device="cpu", allow_ckpt=allow_ckpt
    )
    return pipeline


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


def generate(pipeline: StableDiffusionPipeline, seed: int) -> np.ndarray:
    result = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.asarray(result.images[0])


# --- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize(("in_channels", "variant"), [(4, "sd1"), (9, "sd1-inpaint")])
def test_reads_the_tiny_architectures(tmp_path: Path, in_channels: int, variant: str) -> None:
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", in_channels=in_channels)
    architecture = read_sd1_architecture(read_state_dict(path, allow_ckpt=False))
    expected = tiny_configs(in_channels=in_channels)
    assert architecture.variant == variant
    assert architecture.unet == expected["unet"]
    assert architecture.vae == expected["vae"]
    assert architecture.text_encoder == expected["text_encoder"]
    assert architecture.text_encoder["num_attention_heads"] == 4
    assert architecture.vae["layers_per_block"] == 1


@pytest.fixture(scope="module")
def sd15_shaped_state_dict() -> dict[str, torch.Tensor]:
    """The full SD1.5 layout on the meta device: real shapes and names, no weights."""
    with torch.device("meta"):
        unet, vae, text_encoder = build_models(base_configs())
    return a1111_state_dict(unet, vae, text_encoder)


def test_real_sd15_shapes_yield_exactly_the_shipped_configs(
    sd15_shaped_state_dict: dict[str, torch.Tensor],
) -> None:
    architecture = read_sd1_architecture(sd15_shaped_state_dict)
    base = base_configs()
    assert architecture.variant == "sd1"
    assert architecture.unet == base["unet"]
    assert architecture.vae == base["vae"]
    assert architecture.text_encoder == base["text_encoder"]
    assert architecture.config_files() == base


def test_real_sd15_inpainting_shapes_give_the_inpaint_variant(
    sd15_shaped_state_dict: dict[str, torch.Tensor],
) -> None:
    state_dict = dict(sd15_shaped_state_dict)
    state_dict[UNET + "input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    architecture = read_sd1_architecture(state_dict)
    assert architecture.variant == "sd1-inpaint"
    assert architecture.unet == {**base_configs()["unet"], "in_channels": 9}


def sdxl_like(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` dressed as SDXL: two text encoders, a label embedding, 2048-wide context."""
    fake: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith(CLIP):
            key = key.replace("cond_stage_model.", "conditioner.embedders.0.", 1)
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            tensor = torch.zeros(tensor.shape[0], 2048)
        fake[key] = tensor
    fake["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 64)
    fake[UNET + "label_emb.0.0.weight"] = torch.zeros(128, 2816)
    return fake


def test_sdxl_like_checkpoint_is_rejected_naming_what_was_found(
    tiny_sd: TinySd, tmp_path: Path, engine_cache_dir: Path
) -> None:
    path = write_checkpoint(
        sdxl_like(tiny_sd.state_dict), tmp_path / "xl.safetensors", fmt="safetensors"
    )
    with pytest.raises(UnsupportedCheckpoint) as caught:
        load(path, engine_cache_dir)
    message = caught.value.message
    assert message.startswith("xl.safetensors: not a Stable Diffusion 1.x checkpoint")
    assert "SDXL" in message and "cross-attention width 2048" in message


def test_context_width_that_does_not_match_the_text_encoder_is_rejected(tiny_sd: TinySd) -> None:
    state_dict = {
        key: torch.zeros(tensor.shape[0], 1024) if key.endswith("attn2.to_k.weight") else tensor
        for key, tensor in tiny_sd.state_dict.items()
    }
    with pytest.raises(UnsupportedCheckpoint, match="cross-attention width 1024 does not match"):
        read_sd1_architecture(state_dict)


@pytest.mark.parametrize(
    ("key", "found"),
    [
        ("cond_stage_model.model.token_embedding.weight", "OpenCLIP text encoder"),
        ("control_model.time_embed.0.weight", "ControlNet"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ],
)
def test_other_model_families_are_rejected(tiny_sd: TinySd, key: str, found: str) -> None:
    with pytest.raises(UnsupportedCheckpoint, match=found):
        read_sd1_architecture({**tiny_sd.state_dict, key: torch.zeros(1)})


def test_a_checkpoint_without_vae_is_rejected(tiny_sd: TinySd) -> None:
    state_dict = {
        k: v for k, v in tiny_sd.state_dict.items() if not k.startswith("first_stage_model.")
    }
    with pytest.raises(UnsupportedCheckpoint, match=r"no VAE \(first_stage_model"):
        read_sd1_architecture(state_dict)


# --- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "inpaint"])
def test_loaded_weights_are_the_fixture_weights(
    request: pytest.FixtureRequest, engine_cache_dir: Path, which: str
) -> None:
    name = {"tiny": "tiny", "inpaint": "tiny_inpaint"}[which]
    tiny: TinySd = request.getfixturevalue(f"{name}_sd")
    pipeline = load(request.getfixturevalue(f"{name}_checkpoint"), engine_cache_dir)
    assert_same_weights(pipeline.unet, tiny.unet)
    assert_same_weights(pipeline.vae, tiny.vae)
    assert_same_weights(pipeline.text_encoder, tiny.text_encoder)
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None
    assert not pipeline.unet.training and not pipeline.text_encoder.training
    assert not any(p.requires_grad for p in pipeline.unet.parameters())


def test_loads_in_the_requested_dtype(tiny_checkpoint: Path, engine_cache_dir: Path) -> None:
    pipeline = load(tiny_checkpoint, engine_cache_dir, dtype=torch.bfloat16)
    for model in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_txt2img_gives_a_64px_image_deterministic_for_a_seed(
    tiny_checkpoint: Path, engine_cache_dir: Path
) -> None:
    pipeline = load(tiny_checkpoint, engine_cache_dir)
    first, again, other = generate(pipeline, 0), generate(pipeline, 0), generate(pipeline, 1)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.slow
def test_the_inpainting_variant_runs_an_inpaint_pipeline(
    tiny_inpaint_checkpoint: Path, engine_cache_dir: Path
) -> None:
    pipeline, architecture = load_sd_pipeline(
        tiny_inpaint_checkpoint,
        cache_dir=engine_cache_dir,
        dtype=torch.float32,
        device="cpu",
        allow_ckpt=False,
    )
    assert architecture.variant == "sd1-inpaint"
    inpaint = StableDiffusionInpaintPipeline(**pipeline.components)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    image = inpaint(
        "a photo of a cat",
        image=Image.new("RGB", (64, 64), (120, 80, 40)),
        mask_image=mask,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_text_encoder_saved_without_the_text_model_level_loads(
    tiny_sd: TinySd, tmp_path: Path, engine_cache_dir: Path
) -> None:
    old = "cond_stage_model.transformer."
    state_dict = {k.replace(CLIP, old, 1): v for k, v in tiny_sd.state_dict.items()}
    path = write_checkpoint(state_dict, tmp_path / "old.safetensors", fmt="safetensors")
    assert_same_weights(load(path, engine_cache_dir).text_encoder, tiny_sd.text_encoder)


def test_ckpt_is_refused_unless_allowed(
    tiny_sd: TinySd, tmp_path: Path, engine_cache_dir: Path
) -> None:
    path = write_checkpoint(tiny_sd.state_dict, tmp_path / "tiny.ckpt", fmt="ckpt")
    with pytest.raises(UnsupportedCheckpoint, match="DAN_ALLOW_CKPT=1"):
        load(path, engine_cache_dir)
    pipeline = load(path, engine_cache_dir, allow_ckpt=True)
    assert_same_weights(pipeline.unet, tiny_sd.unet)
    assert_same_weights(pipeline.text_encoder, tiny_sd.text_encoder)


def truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("truncated.safetensors", None),
        ("garbage.safetensors", b"\x00\x01not a safetensors file" * 100),
        ("empty.safetensors", b""),
        ("garbage.ckpt", b"this is not a pickle" * 100),
        ("tiny.bin", b"whatever"),
    ],
)
def test_unreadable_files_raise_unsupported_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path, engine_cache_dir: Path, name: str, content: bytes | None
) -> None:
    path = tmp_path / name
    if content is None:
        truncated(tiny_checkpoint, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UnsupportedCheckpoint, match=name):
        load(path, engine_cache_dir, allow_ckpt=True)


def test_truncated_ckpt_raises_unsupported_checkpoint(tiny_sd: TinySd, tmp_path: Path) -> None:
    path = write_checkpoint(tiny_sd.state_dict, tmp_path / "whole.ckpt", fmt="ckpt")
    with pytest.raises(UnsupportedCheckpoint, match="cannot be unpickled"):
        read_state_dict(truncated(path, tmp_path / "half.ckpt"), allow_ckpt=True)


def test_a_missing_tensor_is_named(tiny_sd: TinySd, tmp_path: Path, engine_cache_dir: Path) -> None:
    state_dict = {k: v for k, v in tiny_sd.state_dict.items() if k != UNET + "out.2.bias"}
    path = write_checkpoint(state_dict, tmp_path / "holey.safetensors", fmt="safetensors")
    with pytest.raises(
        UnsupportedCheckpoint, match=r"UNet tensors .* \(1 missing, e.g. \['conv_out.bias'\]"
    ):
        load(path, engine_cache_dir)


# --- config folder -------------------------------------------------------------------------


def test_config_folder_is_written_once_per_architecture(
    tiny_sd: TinySd, tiny_inpaint_sd: TinySd, tmp_path: Path
) -> None:
    architecture = read_sd1_architecture(tiny_sd.state_dict)
    folder = write_config_folder(architecture, tmp_path)
    assert write_config_folder(architecture, tmp_path) == folder
    assert folder.parent == tmp_path / "configs"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging left
    assert json.loads((folder / CONFIG_FILES["unet"]).read_text()) == architecture.unet
    assert (folder / "tokenizer" / "vocab.json").is_file()
    inpaint = write_config_folder(read_sd1_architecture(tiny_inpaint_sd.state_dict), tmp_path)
    assert inpaint != folder


def test_diffusers_from_single_file_accepts_the_config_folder(
    tiny_sd: TinySd, tiny_checkpoint: Path, engine_cache_dir: Path
) -> None:
    # An independent check of the fixture's A1111 layout and of the folder: diffusers' own
    # loader reads the same weights from the file.
    architecture = read_sd1_architecture(tiny_sd.state_dict)
    folder = write_config_folder(architecture, engine_cache_dir)
    pipeline = StableDiffusionPipeline.from_single_file(
        str(tiny_checkpoint), config=str(folder), local_files_only=True
    )
    assert_same_weights(pipeline.unet, tiny_sd.unet)
    assert_same_weights(pipeline.vae, tiny_sd.vae)
    assert_same_weights(pipeline.text_encoder, tiny_sd.text_encoder)
