"""SDXL single-file checkpoints: architecture, offline loading, prompts and every generation path,
on tiny SDXL-architecture checkpoints built at test time (tests/fixtures/tiny_sdxl.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image as PILImage
from PIL.Image import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dan.config import Settings
from dan.domain import (
    GenerationRequest,
    HiresFix,
    Img2ImgRequest,
    InpaintArea,
    InpaintSpec,
    InstalledModel,
    MaskMode,
    ModelFamily,
    ModelKind,
    ModelRef,
    ResizeMode,
    UpscalerChoice,
)
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.families import family_of_state_dict, load_checkpoint
from dan.engine.families.sdxl import encode_sdxl_prompts
from dan.engine.loading.architecture.sdxl import base_configs, read_sdxl_architecture
from dan.errors import UnsupportedCheckpoint
from tests.fixtures.tiny_sd import write_checkpoint
from tests.fixtures.tiny_sdxl import (
    TinySdxl,
    build_tiny_sdxl,
    sgm_state_dict,
    tiny_sdxl_configs,
)

pytestmark = pytest.mark.slow
SHA = "c" * 64


@pytest.fixture(scope="module")
def tiny_sdxl() -> TinySdxl:
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl: TinySdxl, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    return write_checkpoint(tiny_sdxl.state_dict, path, fmt="safetensors")


@pytest.fixture(scope="module")
def sdxl_pipeline(sdxl_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("sdxl-cache")
    pipeline, _, _ = load_checkpoint(
        sdxl_file, cache_dir=cache, dtype=torch.float32, device="cpu", allow_ckpt=False
    )
    return pipeline


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    data = tmp_path_factory.mktemp("sdxl-engine")
    return DiffusersEngine(Settings(data_dir=data, device="cpu", dtype="float32"))  # type: ignore[call-arg]


def files(path: Path, sha: str = SHA) -> dict[str, InstalledModel]:
    """What the worker passes; requests name ``SHA``, the engine caches by the file's sha."""
    model = InstalledModel(ModelKind.CHECKPOINT, path.stem, sha, path, path.stat().st_size)
    return {SHA: model}


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 1,
        "sampler_name": "Euler a",
        "steps": 3,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": ModelRef(SHA, "tiny-sdxl"),
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def no_progress(done: int, total: int) -> None:
    pass


def pixels(image: Image) -> np.ndarray[Any, Any]:
    return np.asarray(image, dtype=int)


# --- architecture and loading --------------------------------------------------------------


@pytest.mark.parametrize("in_channels, variant", [(4, "sdxl"), (9, "sdxl-inpaint")])
def test_tiny_architecture_is_read_from_the_tensors(in_channels: int, variant: str) -> None:
    with torch.device("meta"):
        tiny = build_tiny_sdxl(in_channels=in_channels)
    architecture = read_sdxl_architecture(tiny.state_dict)
    expected = tiny_sdxl_configs(in_channels=in_channels)
    assert architecture.variant == variant
    assert architecture.unet == expected["unet"]
    assert architecture.vae == expected["vae"]
    assert architecture.text_encoder == expected["text_encoder"]
    assert architecture.text_encoder_2 == expected["text_encoder_2"]


def test_full_size_sdxl_reads_as_the_shipped_configs() -> None:
    # The real layout at full size, on meta tensors: what a 6.9 GB file's keys and shapes say.
    configs = base_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        clip_l = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
        open_clip = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
        state_dict = sgm_state_dict(unet, vae, clip_l, open_clip)
    architecture = read_sdxl_architecture(state_dict)
    assert architecture.variant == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(architecture, name) == configs[name], name
    assert family_of_state_dict(state_dict).name == ModelFamily.SDXL


def test_the_file_loads_offline_with_every_tensor(tiny_sdxl: TinySdxl, sdxl_pipeline: Any) -> None:
    assert isinstance(sdxl_pipeline, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded, built = getattr(sdxl_pipeline, name).state_dict(), getattr(tiny_sdxl, name)
        built = built.state_dict()
        assert loaded.keys() == built.keys(), name
        assert all(torch.equal(loaded[k], built[k]) for k in built), name
    # The second tokenizer is OpenCLIP's: CLIP's vocabulary, padding with "!" (id 0).
    assert sdxl_pipeline.tokenizer_2.pad_token_id == 0
    assert sdxl_pipeline.tokenizer.pad_token_id == sdxl_pipeline.tokenizer.eos_token_id


def test_refiner_and_incomplete_files_are_refused_by_what_they_hold(
    tiny_sdxl: TinySdxl,
) -> None:
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in tiny_sdxl.state_dict.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    with pytest.raises(UnsupportedCheckpoint, match="SDXL refiner"):
        read_sdxl_architecture(refiner)
    no_vae = {k: v for k, v in tiny_sdxl.state_dict.items() if not k.startswith("first_stage")}
    with pytest.raises(UnsupportedCheckpoint, match=r"no VAE \(first_stage_model"):
        read_sdxl_architecture(no_vae)


# --- prompts -------------------------------------------------------------------------------


def test_prompts_equal_diffusers_encoding(sdxl_pipeline: Any) -> None:
    ours = encode_sdxl_prompts(
        sdxl_pipeline, "a red fox", "blurry", device="cpu", dtype=torch.float32
    )
    theirs = sdxl_pipeline.encode_prompt("a red fox", negative_prompt="blurry", device="cpu")
    for got, expected in zip(
        (
            ours.prompt_embeds,
            ours.negative_prompt_embeds,
            ours.pooled_prompt_embeds,
            ours.negative_pooled_prompt_embeds,
        ),
        theirs,
        strict=True,
    ):
        assert got is not None
        torch.testing.assert_close(got, expected)


def test_an_empty_negative_prompt_is_zeros(sdxl_pipeline: Any) -> None:
    ours = encode_sdxl_prompts(sdxl_pipeline, "a red fox", "", device="cpu", dtype=torch.float32)
    assert ours.negative_pooled_prompt_embeds is not None
    assert not ours.negative_prompt_embeds.any()
    assert not ours.negative_pooled_prompt_embeds.any()
    assert ours.negative_prompt_embeds.shape == ours.prompt_embeds.shape


def test_long_prompts_are_chunked_on_both_encoders(sdxl_pipeline: Any) -> None:
    short = "a red fox, " * 10  # 30 tokens
    long = short + "BREAK " + short
    one = encode_sdxl_prompts(sdxl_pipeline, short, "", device="cpu", dtype=torch.float32)
    two = encode_sdxl_prompts(sdxl_pipeline, long, "blurry", device="cpu", dtype=torch.float32)
    assert one.prompt_embeds.shape == (1, 77, 64)
    assert two.prompt_embeds.shape == (1, 154, 64)
    assert two.negative_prompt_embeds.shape == (1, 154, 64)
    # Each chunk is encoded on its own: the first chunk is the short prompt's, both halves of
    # the width (CLIP ViT-L and OpenCLIP bigG); the pooled embedding is the first chunk's.
    torch.testing.assert_close(two.prompt_embeds[:, :77], one.prompt_embeds)
    torch.testing.assert_close(two.pooled_prompt_embeds, one.pooled_prompt_embeds)


def test_attention_weights_change_both_encoders_but_not_the_pooled_embedding(
    sdxl_pipeline: Any,
) -> None:
    plain = encode_sdxl_prompts(sdxl_pipeline, "a red fox", "", device="cpu", dtype=torch.float32)
    weighted = encode_sdxl_prompts(
        sdxl_pipeline, "a (red:1.5) fox", "", device="cpu", dtype=torch.float32
    )
    difference = (plain.prompt_embeds - weighted.prompt_embeds).abs()
    assert difference[..., :32].max() > 1e-3 and difference[..., 32:].max() > 1e-3
    torch.testing.assert_close(plain.pooled_prompt_embeds, weighted.pooled_prompt_embeds)


# --- generation ----------------------------------------------------------------------------


def test_txt2img_equals_a_direct_sdxl_pipeline_call(
    engine: DiffusersEngine, sdxl_file: Path, sdxl_pipeline: Any
) -> None:
    # Not square, so that a swapped (height, width) in the size conditioning would show.
    [ours] = engine.txt2img(request(seed=42, width=96), files(sdxl_file), no_progress)
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        sdxl_pipeline.scheduler.config, timestep_spacing="linspace"
    )
    direct = StableDiffusionXLPipeline(**{**sdxl_pipeline.components, "scheduler": scheduler})
    direct.set_progress_bar_config(disable=True)
    expected = direct(
        "a red fox",
        negative_prompt=None,  # zeros, as A1111 does for an empty negative prompt
        num_inference_steps=3,
        width=96,
        height=64,
        guidance_scale=7.0,
        original_size=(64, 96),  # A1111: original = target = (height, width), crop (0, 0)
        target_size=(64, 96),
        crops_coords_top_left=(0, 0),
        generator=torch.Generator("cpu").manual_seed(42),
    ).images[0]
    assert ours.size == (96, 64)
    assert np.abs(pixels(ours) - pixels(expected)).max() <= 1


def test_a_batch_gives_each_seed_its_own_image(engine: DiffusersEngine, sdxl_file: Path) -> None:
    batch = engine.txt2img(request(seed=5, batch_size=2), files(sdxl_file), no_progress)
    alone = [engine.txt2img(request(seed=s), files(sdxl_file), no_progress)[0] for s in (5, 6)]
    assert len(batch) == 2
    for got, expected in zip(batch, alone, strict=True):
        assert np.abs(pixels(got) - pixels(expected)).max() <= 1


def test_requests_batched_together_each_get_their_image_alone(
    engine: DiffusersEngine, sdxl_file: Path
) -> None:
    """Batching across requests on SDXL: pooled embeddings stacked too, a CFG per request."""
    requests = [
        request(prompt="a red fox", seed=5, cfg_scale=7.0),
        request(prompt="a (blue:1.2) bird", negative_prompt="blurry", seed=9, cfg_scale=3.0),
    ]
    made = engine.txt2img_batch(requests, files(sdxl_file), [no_progress] * 2, [None] * 2)
    for one, images in zip(requests, made, strict=True):
        [expected] = engine.txt2img(one, files(sdxl_file), no_progress)
        assert images is not None and len(images) == 1
        assert np.abs(pixels(images[0]) - pixels(expected)).max() <= 1


def test_hires_fix_runs_both_passes_at_their_sizes(
    engine: DiffusersEngine, sdxl_file: Path
) -> None:
    hires = HiresFix(1.5, 0.5, UpscalerChoice("Latent"))
    seen: list[tuple[int, int]] = []
    [image] = engine.txt2img(
        request(hires=hires), files(sdxl_file), lambda d, t: seen.append((d, t))
    )
    assert image.size == (96, 96)
    assert seen[-1][0] == seen[-1][1]


def test_img2img_and_inpainting_on_sdxl(engine: DiffusersEngine, sdxl_file: Path) -> None:
    init = PILImage.new("RGB", (64, 64), (200, 40, 40))
    task = Img2ImgRequest(request(steps=4), "init", ResizeMode.JUST_RESIZE, 0.5)
    [first] = engine.img2img(task, init, None, files(sdxl_file), no_progress)
    [again] = engine.img2img(task, init, None, files(sdxl_file), no_progress)
    assert first.size == (64, 64) and pixels(first).tolist() == pixels(again).tolist()
    mask = PILImage.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    spec = InpaintSpec("mask", 0, MaskMode.REGENERATE_MASKED, InpaintArea.WHOLE_PICTURE)
    inpaint = Img2ImgRequest(request(steps=4), "init", ResizeMode.JUST_RESIZE, 0.75, spec)
    [painted] = engine.img2img(inpaint, init, mask, files(sdxl_file), no_progress)
    outside = np.asarray(mask) == 0
    assert (pixels(painted)[outside] == pixels(init)[outside]).all()
    assert (pixels(painted)[~outside] != pixels(init)[~outside]).any()


def test_nine_channel_sdxl_inpainting_checkpoints_inpaint(
    engine: DiffusersEngine, tmp_path: Path
) -> None:
    path = write_checkpoint(
        build_tiny_sdxl(in_channels=9).state_dict,
        tmp_path / "inpaint.safetensors",
        fmt="safetensors",
    )
    init = PILImage.new("RGB", (64, 64), (40, 40, 200))
    mask = PILImage.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    spec = InpaintSpec("mask", 0, MaskMode.REGENERATE_MASKED, InpaintArea.WHOLE_PICTURE)
    task = Img2ImgRequest(request(steps=4), "init", ResizeMode.JUST_RESIZE, 1.0, spec)
    [painted] = engine.img2img(task, init, mask, files(path, "e" * 64), no_progress)
    outside = np.asarray(mask) == 0
    assert (pixels(painted)[outside] == pixels(init)[outside]).all()
    loaded = engine.pipelines.get(files(path, "e" * 64)[SHA])
    assert loaded.pipeline.unet.config.in_channels == 9
