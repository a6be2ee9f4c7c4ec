"""ControlNet: offline loading of both file layouts, the cache, and generation with one unit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
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
    MaskedContent,
    MaskMode,
    ModelFiles,
    ModelKind,
    ModelRef,
    ResizeMode,
    UpscalerChoice,
    UpscaleRequest,
)
from dan.engine.control.controlnet import ControlNetCache, ControlNetError, load_controlnet
from dan.engine.control.layout import (
    base_controlnet_config,
    read_controlnet_config,
    to_diffusers_names,
)
from dan.engine.control.runs import ControlUnit, controlled_txt2img
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.hires import hires_fix, second_pass_steps
from dan.engine.generation.img2img import run_img2img
from dan.engine.generation.masks import fit_image, prepare_mask
from dan.engine.generation.prompts import PromptEmbeds, encode_prompts
from dan.engine.generation.samplers import make_scheduler
from dan.engine.loading.architecture.sd15 import base_configs
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.upscaling.upscale_models import UpscalerModels
from dan.errors import EngineError
from tests.fixtures.tiny_controlnet import (
    build_tiny_controlnet,
    original_state_dict,
    write_diffusers,
    write_original,
)
from tests.fixtures.tiny_sd import TinySd

slow = pytest.mark.slow
CPU = torch.device("cpu")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_sd: TinySd) -> ControlNetModel:
    return build_tiny_controlnet(tiny_sd.unet)


@pytest.fixture(scope="module")
def files(
    tiny_sd: TinySd, tiny_controlnet: ControlNetModel, tmp_path_factory: Any
) -> dict[str, Path]:
    """The tiny ControlNet in every layout; the .pth also carries an SD checkpoint, as v1.0."""
    folder = tmp_path_factory.mktemp("controlnets")
    original = original_state_dict(tiny_controlnet, tiny_sd.unet.config)
    return {
        "original-safetensors": write_original(original, folder / "control_tiny.safetensors"),
        "original-pth": write_original(
            {**tiny_sd.state_dict, **original}, folder / "control_tiny.pth"
        ),
        "diffusers": write_diffusers(
            tiny_controlnet, folder / "diffusion_pytorch_model.safetensors"
        ),
    }


@pytest.mark.parametrize("layout", ["original-safetensors", "original-pth", "diffusers"])
def test_loaded_weights_equal_the_written_ones(
    files: dict[str, Path], tiny_controlnet: ControlNetModel, layout: str
) -> None:
    loaded = load_controlnet(files[layout], dtype=torch.float32, device=CPU)
    expected, got = tiny_controlnet.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert list(loaded.config.conditioning_embedding_out_channels) == [8, 8, 16, 16]
    assert list(loaded.config.block_out_channels) == [32, 64]
    assert loaded.config.cross_attention_dim == 32


def test_sd15_layout_gives_the_shipped_config() -> None:
    """Shapes of a full-size ControlNet (meta tensors, original names) -> lllyasviel's config."""
    shipped = base_controlnet_config()
    with init_empty_weights():
        controlnet = ControlNetModel.from_config(shipped)
        unet = UNet2DConditionModel.from_config(base_configs()["unet"])
    tensors = to_diffusers_names(original_state_dict(controlnet, unet.config))
    assert tensors.keys() == controlnet.state_dict().keys()
    detected = read_controlnet_config(tensors)
    assert {k: detected[k] for k in shipped} == shipped
    assert detected["conditioning_channels"] == 3


def test_unusable_files_raise_controlnet_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    corrupt = tmp_path / "control_broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    pickle = tmp_path / "control_broken.pth"
    pickle.write_bytes(b"not a pickle at all")
    for path in (corrupt, pickle, tiny_checkpoint):
        with pytest.raises(ControlNetError, match=path.name):
            load_controlnet(path, dtype=torch.float32, device=CPU)
    with pytest.raises(ControlNetError, match="a Stable Diffusion checkpoint"):
        load_controlnet(tiny_checkpoint, dtype=torch.float32, device=CPU)
    unknown = tmp_path / "control.onnx"
    unknown.write_bytes(b"")
    with pytest.raises(ControlNetError, match="unknown ControlNet format"):
        load_controlnet(unknown, dtype=torch.float32, device=CPU)


def test_a_truncated_controlnet_names_what_is_missing(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(files["original-safetensors"])
    del tensors["control_model.zero_convs.3.0.weight"]
    path = tmp_path / "control_cut.safetensors"
    save_file(tensors, path)
    with pytest.raises(ControlNetError, match=r"control_cut.*controlnet_down_blocks\.3\.weight"):
        load_controlnet(path, dtype=torch.float32, device=CPU)


def test_cache_loads_once_per_sha_and_keeps_a_bounded_number(files: dict[str, Path]) -> None:
    cache = ControlNetCache(CPU, torch.float32, max_models=2)
    models = [
        InstalledModel(ModelKind.CONTROLNET, path.stem, str(i) * 64, path, path.stat().st_size)
        for i, path in enumerate(files.values())
    ]
    first = cache.get(models[0])
    assert cache.get(models[0]) is first and cache.loads == 1
    cache.get(models[1])
    cache.get(models[2])
    assert cache.loaded() == [models[1].sha256, models[2].sha256] and cache.loads == 3


# --- generation on the tiny checkpoint --------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path, engine_cache_dir: Path) -> StableDiffusionPipeline:
    pipeline, _ = load_sd_pipeline(
        tiny_checkpoint,
        cache_dir=engine_cache_dir,
        dtype=torch.float32,
        device="cpu",
        allow_ckpt=False,
    )
    return pipeline


@pytest.fixture(scope="module")
def controlnet(files: dict[str, Path]) -> Any:
    return load_controlnet(files["original-pth"], dtype=torch.float32, device=CPU)


def control_image(width: int = 64, height: int = 64) -> Image.Image:
    """A black image with a white ring: what a canny map looks like."""
    ring = np.zeros((height, width, 3), dtype=np.uint8)
    y, x = np.ogrid[:height, :width]
    radius = np.hypot(x - width / 2, y - height / 2)
    ring[(radius > 14) & (radius < 18)] = 255
    return Image.fromarray(ring)


def generation(steps: int = 3) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red fox",
        negative_prompt="",
        seed=3,
        sampler_name="Euler a",
        steps=steps,
        cfg_scale=7.0,
        width=64,
        height=64,
        model=ModelRef("a" * 64, "tiny"),
    )


def run_args(base: StableDiffusionPipeline, request: GenerationRequest) -> dict[str, Any]:
    """What DiffusersEngine passes besides the request and the unit."""
    embeds, negative = encode_prompts(
        base.tokenizer, base.text_encoder, request.prompt, "", device="cpu", dtype=torch.float32
    )
    return {
        "scheduler": make_scheduler(request.sampler_name, base.scheduler.config, seed=request.seed),
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "generator": [torch.Generator("cpu").manual_seed(request.seed)],
        "callback_on_step_end": None,
    }


def txt2img(base: StableDiffusionPipeline, unit: ControlUnit) -> np.ndarray:
    request = generation()
    [image] = controlled_txt2img(base, request, unit, **run_args(base, request))
    assert image.size == (64, 64)
    return pixels(image)


def plain_txt2img(base: StableDiffusionPipeline) -> np.ndarray:
    request, args = generation(), run_args(base, generation())
    pipeline = StableDiffusionPipeline(**{**base.components, "scheduler": args.pop("scheduler")})
    pipeline.set_progress_bar_config(disable=True)
    output = pipeline(
        width=64,
        height=64,
        num_inference_steps=request.steps,
        guidance_scale=request.cfg_scale,
        **args,
    )
    return pixels(output.images[0])


@slow
def test_weight_0_reproduces_the_plain_image_exactly(
    base: StableDiffusionPipeline, controlnet: Any
) -> None:
    assert np.array_equal(
        txt2img(base, ControlUnit(controlnet, control_image(), weight=0.0)), plain_txt2img(base)
    )


@slow
def test_weight_window_and_guess_mode_each_change_the_image(
    base: StableDiffusionPipeline, controlnet: Any
) -> None:
    unit = ControlUnit(controlnet, control_image(), weight=1.0)
    full = txt2img(base, unit)
    assert np.abs(full - plain_txt2img(base)).mean() > 1
    assert np.array_equal(txt2img(base, unit), full)  # deterministic
    for changed in (
        ControlUnit(controlnet, control_image(), weight=1.0, guidance_start=0.5),
        ControlUnit(controlnet, control_image(), weight=1.0, guess_mode=True),
        ControlUnit(controlnet, Image.new("RGB", (64, 64)), weight=1.0),  # the image matters
    ):
        assert np.abs(txt2img(base, changed) - full).mean() > 0.5, changed


@slow
def test_each_resize_mode_fits_the_control_image_differently(
    base: StableDiffusionPipeline, controlnet: Any
) -> None:
    wide = control_image(96, 48)
    results = [
        txt2img(base, ControlUnit(controlnet, wide, resize_mode=mode)) for mode in ResizeMode
    ]
    for i, first in enumerate(results):
        for second in results[i + 1 :]:
            assert np.abs(first - second).mean() > 0.5


def img2img_request(inpaint: InpaintSpec | None = None) -> Img2ImgRequest:
    return Img2ImgRequest(generation(steps=4), "init", ResizeMode.JUST_RESIZE, 0.75, inpaint)


def controlled(
    base: StableDiffusionPipeline,
    request: Img2ImgRequest,
    unit: ControlUnit,
    init: Image.Image,
    mask: Image.Image | None,
) -> Image.Image:
    [image] = run_img2img(
        base, request, init, mask, unit=unit, **run_args(base, request.generation)
    )
    return image


def init_image(width: int = 64, height: int = 64) -> Image.Image:
    values = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(values)


@slow
def test_img2img_with_a_controlnet_runs_and_follows_the_weight(
    base: StableDiffusionPipeline, controlnet: Any
) -> None:
    request, init = img2img_request(), init_image(96, 80)
    with_control = controlled(
        base, request, ControlUnit(controlnet, control_image(), weight=1.5), init, None
    )
    without = controlled(
        base, request, ControlUnit(controlnet, control_image(), weight=0.0), init, None
    )
    assert with_control.size == (64, 64)
    assert np.abs(pixels(with_control) - pixels(without)).mean() > 1


@slow
@pytest.mark.parametrize("area", list(InpaintArea))
def test_inpaint_with_a_controlnet_keeps_unmasked_pixels(
    base: StableDiffusionPipeline, controlnet: Any, area: InpaintArea
) -> None:
    init = init_image(96, 80) if area == InpaintArea.ONLY_MASKED else init_image()
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (20, 16, 44, 40))
    spec = InpaintSpec("mask", 0, MaskMode.REGENERATE_MASKED, area, padding=8)
    unit = ControlUnit(controlnet, control_image(), weight=1.0)
    image = controlled(base, img2img_request(spec), unit, init, mask)
    assert image.size == init.size
    kept = (
        pixels(
            prepare_mask(mask, *init.size, ResizeMode.JUST_RESIZE, 0, MaskMode.REGENERATE_MASKED)
        )
        == 0
    )
    original = pixels(fit_image(init, *init.size, ResizeMode.JUST_RESIZE))
    assert np.array_equal(pixels(image)[kept], original[kept])
    assert not np.array_equal(pixels(image)[~kept], original[~kept])


@slow
@pytest.mark.parametrize("area", list(InpaintArea))
def test_inpaint_with_a_zero_weight_controlnet_is_plain_inpaint_for_each_fill(
    base: StableDiffusionPipeline, controlnet: Any, area: InpaintArea
) -> None:
    """The masked part starts from what ``fill`` says, with a ControlNet as without one."""
    init = init_image(96, 80) if area == InpaintArea.ONLY_MASKED else init_image()
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (20, 16, 44, 40))
    unit = ControlUnit(controlnet, control_image(), weight=0.0)
    results = []
    for fill in MaskedContent:
        spec = InpaintSpec("mask", 0, MaskMode.REGENERATE_MASKED, area, padding=8, fill=fill)
        request = img2img_request(spec)
        [plain] = run_img2img(base, request, init, mask, **run_args(base, request.generation))
        with_unit = controlled(base, request, unit, init, mask)
        assert np.array_equal(pixels(with_unit), pixels(plain)), fill
        results.append(pixels(plain))
    white = np.asarray(mask) == 255
    assert np.abs(results[0] - results[1]).max(axis=-1)[white].mean() > 1  # the fill mattered


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"weight": 2.5}, "weight must be between 0 and 2"),
        ({"guidance_start": 0.6, "guidance_end": 0.4}, "start <= end"),
    ],
)
def test_invalid_units_are_rejected(
    base: StableDiffusionPipeline, values: dict[str, Any], message: str
) -> None:
    unit = ControlUnit(object(), control_image(), **values)
    with pytest.raises(EngineError, match=message):
        controlled_txt2img(base, generation(), unit, **run_args(base, generation()))


def hires_image(
    base: StableDiffusionPipeline, unit: ControlUnit | None, upscaler: str = "Latent"
) -> np.ndarray:
    """Hires fix (x1.5, strength 0.5) wired as DiffusersEngine wires it, with ``unit``."""
    request = replace(generation(), hires=HiresFix(1.5, 0.5, UpscalerChoice(upscaler)))
    args = run_args(base, request)
    [image] = hires_fix(
        base,
        request,
        PromptEmbeds(args["prompt_embeds"], args["negative_prompt_embeds"]),
        new_scheduler=lambda: make_scheduler(
            request.sampler_name, base.scheduler.config, seed=request.seed
        ),
        new_generators=lambda: [torch.Generator("cpu").manual_seed(request.seed)],
        files={},
        upscalers=UpscalerModels(CPU, torch.float32),
        progress=lambda done, total: None,
        unit=unit,
    )
    assert image.size == (96, 96)
    return pixels(image)


@slow
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_with_a_zero_weight_controlnet_is_plain_hires_fix(
    base: StableDiffusionPipeline, controlnet: Any, upscaler: str
) -> None:
    unit = ControlUnit(controlnet, control_image(), weight=0.0)
    assert np.array_equal(hires_image(base, unit, upscaler), hires_image(base, None, upscaler))


def engine_files(checkpoint: Path, controlnet: Path) -> ModelFiles:
    """What the worker passes the engine: the request's checkpoint and ControlNet by sha256."""
    return {
        "a" * 64: InstalledModel(
            ModelKind.CHECKPOINT, "tiny", "a" * 64, checkpoint, checkpoint.stat().st_size
        ),
        "c" * 64: InstalledModel(
            ModelKind.CONTROLNET, "control", "c" * 64, controlnet, controlnet.stat().st_size
        ),
    }


@slow
def test_hires_fix_with_a_controlnet_conditions_its_second_pass(
    tmp_path: Path, tiny_checkpoint: Path, files: dict[str, Path]
) -> None:
    """Through DiffusersEngine: a hires request equals its passes run one by one through the
    same engine (txt2img, upscale, img2img, each with the control image), and differs from the
    same passes with the control image on the first pass only."""
    engine = DiffusersEngine(
        Settings(data_dir=tmp_path / "data", device="cpu", dtype="float32")  # type: ignore[call-arg]
    )
    models = engine_files(tiny_checkpoint, files["original-safetensors"])
    spec = ControlNetSpec("ring", "canny", ModelRef("c" * 64, "control"), weight=1.0)
    lanczos = UpscalerChoice("Lanczos")
    request = replace(generation(), control_net=spec, hires=HiresFix(1.5, 0.5, lanczos))
    ring = control_image()

    def no_progress(done: int, total: int) -> None:
        pass

    [hires] = engine.txt2img(request, models, no_progress, ring)
    assert hires.size == (96, 96)
    # 1. The first pass, 2. upscaled, 3. denoised again over the last half of a schedule
    # stretched so that it runs request.steps steps, as hires fix does.
    [first] = engine.txt2img(replace(request, hires=None), models, no_progress, ring)
    upscaled = engine.upscale(UpscaleRequest("first", 1.5, lanczos), first, models, no_progress)
    steps = second_pass_steps(request.steps, 0.5)
    again = replace(request, hires=None, width=96, height=96, steps=steps)
    second = Img2ImgRequest(again, "upscaled", ResizeMode.JUST_RESIZE, 0.5)
    [both] = engine.img2img(second, upscaled, None, models, no_progress, ring)
    unconditioned = replace(second, generation=replace(again, control_net=None))
    [first_only] = engine.img2img(unconditioned, upscaled, None, models, no_progress)
    assert np.array_equal(pixels(hires), pixels(both))
    assert np.abs(pixels(hires) - pixels(first_only)).mean() > 1
