"""ControlNet on SDXL: a tiny SDXL ControlNet in diffusers' single-file layout (as
``diffusers_xl_canny_full`` and xinsir's openpose ship), built at test time from the tiny SDXL
UNet, run through the engine and compared with diffusers' own SDXL ControlNet pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    EulerAncestralDiscreteScheduler,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image as PILImage
from PIL.Image import Image

from dan.config import Settings
from dan.domain import (
    ControlNetSpec,
    GenerationRequest,
    HiresFix,
    Img2ImgRequest,
    InstalledModel,
    ModelFamily,
    ModelKind,
    ModelRef,
    ResizeMode,
    UpscalerChoice,
)
from dan.engine.control.controlnet import load_controlnet
from dan.engine.control.layout import read_controlnet_config, to_diffusers_names
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.families import load_checkpoint
from dan.errors import EngineError
from dan.models.families import family_of_file
from tests.fixtures.tiny_controlnet import build_tiny_controlnet, write_diffusers
from tests.fixtures.tiny_sd import TinySd, write_checkpoint
from tests.fixtures.tiny_sdxl import TinySdxl, build_tiny_sdxl

pytestmark = pytest.mark.slow
XL, CONTROL, SD1_CONTROL, SD1 = "c" * 64, "d" * 64, "e" * 64, "f" * 64


@pytest.fixture(scope="module")
def tiny_sdxl() -> TinySdxl:
    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def xl_controlnet(tiny_sdxl: TinySdxl) -> ControlNetModel:
    return build_tiny_controlnet(tiny_sdxl.unet)


@pytest.fixture(scope="module")
def installed(
    tiny_sdxl: TinySdxl,
    xl_controlnet: ControlNetModel,
    tiny_sd: TinySd,
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, InstalledModel]:
    """What the worker passes: the SDXL and SD1 checkpoints and a ControlNet for each."""
    folder = tmp_path_factory.mktemp("sdxl-controlnet")
    paths = {
        XL: write_checkpoint(tiny_sdxl.state_dict, folder / "xl.safetensors", fmt="safetensors"),
        CONTROL: write_diffusers(xl_controlnet, folder / "control_sdxl_canny.safetensors"),
        SD1_CONTROL: write_diffusers(
            build_tiny_controlnet(tiny_sd.unet), folder / "control_sd15_canny.safetensors"
        ),
        SD1: tiny_checkpoint,
    }
    kinds = {CONTROL: ModelKind.CONTROLNET, SD1_CONTROL: ModelKind.CONTROLNET}
    return {
        sha: InstalledModel(kinds.get(sha, ModelKind.CHECKPOINT), p.stem, sha, p, p.stat().st_size)
        for sha, p in paths.items()
    }


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    data = tmp_path_factory.mktemp("sdxl-controlnet-engine")
    return DiffusersEngine(Settings(data_dir=data, device="cpu", dtype="float32"))  # type: ignore[call-arg]


def control_image(width: int = 96, height: int = 64) -> Image:
    """A black image with a white ring: what a canny map looks like."""
    ring = np.zeros((height, width, 3), dtype=np.uint8)
    y, x = np.ogrid[:height, :width]
    radius = np.hypot(x - width / 2, y - height / 2)
    ring[(radius > 14) & (radius < 20)] = 255
    return PILImage.fromarray(ring)


def unit(weight: float = 1.0, model: str = CONTROL) -> ControlNetSpec:
    return ControlNetSpec("control", "none", ModelRef(model, "control"), weight=weight)


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 42,
        "sampler_name": "Euler a",
        "steps": 3,
        "cfg_scale": 7.0,
        "width": 96,  # not square: a swapped size would show
        "height": 64,
        "model": ModelRef(XL, "xl"),
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def no_progress(done: int, total: int) -> None:
    pass


def pixels(image: Image) -> np.ndarray[Any, Any]:
    return np.asarray(image, dtype=int)


def txt2img(
    engine: DiffusersEngine, files: dict[str, InstalledModel], **fields: object
) -> list[Image]:
    return engine.txt2img(request(**fields), files, no_progress, control_image())


# --- the file ------------------------------------------------------------------------------


def test_the_sdxl_controlnet_loads_for_its_unet_with_every_tensor(
    tiny_sdxl: TinySdxl, xl_controlnet: ControlNetModel, installed: dict[str, InstalledModel]
) -> None:
    path = installed[CONTROL].path
    assert family_of_file(ModelKind.CONTROLNET, path) == ModelFamily.SDXL
    assert family_of_file(ModelKind.CONTROLNET, installed[SD1_CONTROL].path) == ModelFamily.SD15
    loaded = load_controlnet(path, dtype=torch.float32, device="cpu", unet=tiny_sdxl.unet.config)
    expected, got = xl_controlnet.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for key in (
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "cross_attention_dim",
        "use_linear_projection",
    ):
        assert list(np.atleast_1d(loaded.config[key])) == list(
            np.atleast_1d(xl_controlnet.config[key])
        ), key


def test_the_original_layout_names_sdxls_size_embedding() -> None:
    original = {
        "control_model.label_emb.0.0.weight": torch.zeros(64, 80),
        "control_model.label_emb.0.2.weight": torch.zeros(64, 64),
        "control_model.input_hint_block.0.weight": torch.zeros(8, 3, 3, 3),
        "control_model.input_blocks.3.0.op.weight": torch.zeros(32, 32, 3, 3),
    }
    renamed = to_diffusers_names(original)
    assert renamed.keys() >= {"add_embedding.linear_1.weight", "add_embedding.linear_2.weight"}


def test_shapes_alone_give_sdxls_own_values() -> None:
    config = read_controlnet_config(
        _meta_state_dict(build_tiny_controlnet(build_tiny_sdxl(seed=1).unet))
    )
    assert config["addition_embed_type"] == "text_time"
    assert config["addition_time_embed_dim"] == 256  # SDXL's: no tensor holds it
    assert config["transformer_layers_per_block"] == [1, 2]


def _meta_state_dict(model: ControlNetModel) -> dict[str, torch.Tensor]:
    return {k: v.to("meta") for k, v in model.state_dict().items()}


# --- generation ----------------------------------------------------------------------------


def test_txt2img_equals_a_direct_sdxl_controlnet_pipeline_call(
    engine: DiffusersEngine,
    installed: dict[str, InstalledModel],
    xl_controlnet: ControlNetModel,
    tmp_path: Path,
) -> None:
    [ours] = txt2img(engine, installed, control_net=unit())
    base, _, _ = load_checkpoint(
        installed[XL].path, cache_dir=tmp_path, dtype=torch.float32, device="cpu", allow_ckpt=False
    )
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        base.scheduler.config, timestep_spacing="linspace"
    )
    components = {**base.components, "scheduler": scheduler, "controlnet": xl_controlnet}
    direct = StableDiffusionXLControlNetPipeline(**components)
    direct.set_progress_bar_config(disable=True)
    expected = direct(
        "a red fox",
        negative_prompt=None,  # zeros, as A1111 does for an empty negative prompt
        image=control_image(),
        num_inference_steps=3,
        width=96,
        height=64,
        guidance_scale=7.0,
        controlnet_conditioning_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(42),
    ).images[0]
    assert ours.size == (96, 64)
    assert np.abs(pixels(ours) - pixels(expected)).max() <= 1
    [plain] = txt2img(engine, installed)
    assert np.abs(pixels(ours) - pixels(plain)).mean() > 1  # the ControlNet matters


def test_weight_0_is_plain_sdxl_txt2img(
    engine: DiffusersEngine, installed: dict[str, InstalledModel]
) -> None:
    [controlled] = txt2img(engine, installed, control_net=unit(weight=0.0))
    [plain] = txt2img(engine, installed)
    assert np.array_equal(pixels(controlled), pixels(plain))


def test_a_batch_of_two_equals_two_single_images(
    engine: DiffusersEngine, installed: dict[str, InstalledModel]
) -> None:
    batch = txt2img(engine, installed, control_net=unit(), seed=5, batch_size=2)
    alone = [txt2img(engine, installed, control_net=unit(), seed=s)[0] for s in (5, 6)]
    assert len(batch) == 2
    for got, expected in zip(batch, alone, strict=True):
        assert np.abs(pixels(got) - pixels(expected)).max() <= 1


def test_img2img_with_an_sdxl_controlnet_follows_the_weight(
    engine: DiffusersEngine, installed: dict[str, InstalledModel]
) -> None:
    init = PILImage.new("RGB", (96, 64), (200, 40, 40))

    def img2img(**fields: object) -> np.ndarray[Any, Any]:
        task = Img2ImgRequest(request(steps=4, **fields), "init", ResizeMode.JUST_RESIZE, 0.5)
        [image] = engine.img2img(task, init, None, installed, no_progress, control_image())
        assert image.size == (96, 64)
        return pixels(image)

    controlled = img2img(control_net=unit())
    assert np.array_equal(img2img(control_net=unit()), controlled)  # deterministic
    assert np.array_equal(img2img(control_net=unit(weight=0.0)), img2img())
    assert np.abs(controlled - img2img()).mean() > 1


def test_hires_fix_with_an_sdxl_controlnet_runs_both_passes(
    engine: DiffusersEngine, installed: dict[str, InstalledModel]
) -> None:
    hires = HiresFix(1.5, 0.5, UpscalerChoice("Latent"))
    [image] = txt2img(engine, installed, control_net=unit(), hires=hires)
    [plain] = txt2img(engine, installed, control_net=unit(weight=0.0), hires=hires)
    assert image.size == (144, 96)
    assert np.abs(pixels(image) - pixels(plain)).mean() > 1


def test_a_controlnet_of_the_other_family_is_refused_naming_both(
    engine: DiffusersEngine, installed: dict[str, InstalledModel]
) -> None:
    with pytest.raises(EngineError, match=r"control_sd15_canny\.safetensors is an sd15 ControlNet"):
        txt2img(engine, installed, control_net=unit(model=SD1_CONTROL))
    sd1 = {"model": ModelRef(SD1, "tiny"), "width": 64, "height": 64}
    with pytest.raises(EngineError, match=r"is an sdxl ControlNet .* the checkpoint an sd15"):
        txt2img(engine, installed, control_net=unit(), **sd1)
