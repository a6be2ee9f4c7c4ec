"""Model families below the API: what a file's tensor names say, and what a request on a
checkpoint of each family gets (default size, cost, LoRA and ControlNet checks)."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from pathlib import Path

import pytest
from PIL import Image as PILImage

from dan.config import Settings
from dan.domain import GenerationRequest, ModelFamily, ModelKind
from dan.errors import InvalidArgument
from dan.models.families import family_of_file
from dan.models.registry import ModelRegistry
from dan.tasks.orders import ControlNetOrder, GenerationOrder, Txt2ImgOrder
from dan.tasks.requests import RequestBuilder

SDXL_CHECKPOINT = (
    "model.diffusion_model.label_emb.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.text_projection",
)
SD15_CHECKPOINT = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
)
SDXL_LORA = ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "lora_te2_x.alpha")
SDXL_CN = ("add_embedding.linear_1.weight", "controlnet_cond_embedding.conv_in.weight")
SD15_LORA = ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_te_x.alpha")
# A UNet-only SDXL LoRA: only the transformer depth (blocks 1 and deeper) tells SDXL apart.
SDXL_UNET_LOHA = (
    "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q.hada_w1_a",
    "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q.alpha",
)
SD15_LOKR = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1",)
DORA = (
    "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
    "lora_unet_input_blocks_4_1_proj_in.dora_scale",
)
TUCKER_LOHA = (
    "lora_unet_input_blocks_4_1_proj_in.hada_w1_a",
    "lora_unet_input_blocks_4_1_proj_in.hada_t1",
)


def write_header(path: Path, names: tuple[str, ...]) -> Path:
    """A .safetensors file holding one-element float32 tensors named ``names``."""
    header = {
        name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i, name in enumerate(names)
    }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(names)))
    return path


@pytest.mark.parametrize(
    "kind, names, family",
    [
        (ModelKind.CHECKPOINT, SDXL_CHECKPOINT, ModelFamily.SDXL),
        (ModelKind.CHECKPOINT, SD15_CHECKPOINT, ModelFamily.SD15),
        (ModelKind.LORA, SDXL_LORA, ModelFamily.SDXL),
        (ModelKind.LORA, SD15_LORA, ModelFamily.SD15),
        (ModelKind.LORA, SDXL_UNET_LOHA, ModelFamily.SDXL),
        (ModelKind.LORA, SD15_LOKR, ModelFamily.SD15),
        (ModelKind.CONTROLNET, ("add_embedding.linear_1.weight",), ModelFamily.SDXL),
        (ModelKind.UPSCALER, SDXL_CHECKPOINT, None),
    ],
)
def test_family_is_read_from_the_tensor_names(
    tmp_path: Path, kind: ModelKind, names: tuple[str, ...], family: ModelFamily | None
) -> None:
    assert family_of_file(kind, write_header(tmp_path / "m.safetensors", names)) == family


def test_unreadable_and_pickled_files_count_as_sd15(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"not read")
    assert family_of_file(ModelKind.CHECKPOINT, garbage) == ModelFamily.SD15
    assert family_of_file(ModelKind.CHECKPOINT, pickled) == ModelFamily.SD15


@pytest.fixture
def builder(tmp_path: Path) -> RequestBuilder:
    models = tmp_path / "models"
    write_header(models / "checkpoints" / "xl.safetensors", SDXL_CHECKPOINT)
    write_header(models / "checkpoints" / "one.safetensors", SD15_CHECKPOINT)
    write_header(models / "loras" / "xl_style.safetensors", SDXL_LORA)
    write_header(models / "loras" / "sd_style.safetensors", SD15_LORA)
    write_header(models / "loras" / "xl_loha.safetensors", SDXL_UNET_LOHA)
    write_header(models / "loras" / "sd_lokr.safetensors", SD15_LOKR)
    write_header(models / "loras" / "sd_dora.safetensors", DORA)
    write_header(models / "loras" / "sd_tucker.safetensors", TUCKER_LOHA)
    write_header(models / "controlnet" / "control_sd15_canny.safetensors", ("control_model.x",))
    registry = ModelRegistry(models, tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    settings = Settings(data_dir=tmp_path / "data")  # type: ignore[call-arg]
    return RequestBuilder(registry, settings, random_seed=lambda: 1)


def order(**fields: object) -> Txt2ImgOrder:
    values: dict[str, object] = {
        "prompt": "a fox",
        "negative_prompt": "",
        "seed": 7,
        "sampler_name": "Euler a",
        "steps": 20,
        "cfg_scale": 7.0,
        "width": None,
        "height": None,
        "model": "xl",
    }
    values.update(fields)
    return Txt2ImgOrder(GenerationOrder(**values))  # type: ignore[arg-type]


def test_the_registry_knows_each_files_family(builder: RequestBuilder, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    families = {m.name: m.family for m in registry.list(ModelKind.CHECKPOINT)}
    assert families == {"one": ModelFamily.SD15, "xl": ModelFamily.SDXL}
    assert registry.resolve(ModelKind.LORA, "xl_style").family == ModelFamily.SDXL


def test_sizes_default_to_the_familys_native_size(builder: RequestBuilder) -> None:
    xl = builder.txt2img(order(), "t1").params
    one = builder.txt2img(order(model="one"), "t2").params
    given = builder.txt2img(order(width=832, height=1216), "t3").params
    assert (xl["width"], xl["height"]) == (1024, 1024)
    assert (one["width"], one["height"]) == (512, 512)
    assert (given["width"], given["height"]) == (832, 1216)


def test_an_sdxl_step_costs_more_per_pixel(builder: RequestBuilder) -> None:
    xl = builder.txt2img(order(width=512, height=512), "t1").needs
    one = builder.txt2img(order(model="one", width=512, height=512), "t2").needs
    assert one.cost == pytest.approx(1.0)
    assert xl.cost > one.cost


def test_loras_of_another_family_are_refused_by_name(builder: RequestBuilder) -> None:
    builder.txt2img(order(model="one", loras=(("sd_style", 0.8),)), "t1")
    with pytest.raises(InvalidArgument, match="sd_style is an sd15 LoRA and xl an sdxl"):
        builder.txt2img(order(loras=(("sd_style", 0.8),)), "t2")
    with pytest.raises(InvalidArgument, match="xl_style is an sdxl LoRA and one an sd15"):
        builder.txt2img(order(model="one", prompt="a fox <lora:xl_style:1>"), "t3")


def test_sdxl_loras_and_lycoris_of_the_checkpoints_family_are_taken(
    builder: RequestBuilder,
) -> None:
    xl = builder.txt2img(order(loras=(("xl_style", 0.8), ("xl_loha", 1.0))), "t1").params
    one = builder.txt2img(order(model="one", prompt="a fox <lora:sd_lokr:0.5>"), "t2").params
    assert [lora["weight"] for lora in xl["loras"]] == [0.8, 1.0]  # type: ignore[attr-defined]
    assert len(one["loras"]) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, variant", [("sd_dora", "DoRA (dora_scale)"), ("sd_tucker", "LoHa with Tucker")]
)
def test_lora_variants_the_engine_cannot_apply_are_refused_by_file_and_variant(
    builder: RequestBuilder, name: str, variant: str
) -> None:
    with pytest.raises(
        InvalidArgument,
        match=rf"Invalid loras: {name} \({name}\.safetensors\) holds {re.escape(variant)}",
    ):
        builder.txt2img(order(model="one", loras=((name, 1.0),)), "t1")


def control(model: str, preprocess: str = "canny") -> ControlNetOrder:
    image = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(image, format="PNG")
    return ControlNetOrder(base64.b64encode(image.getvalue()).decode(), preprocess, model)


def controlnet_of(builder: RequestBuilder, **fields: object) -> str:
    """The name of the ControlNet file a txt2img order with ``fields`` resolves to."""
    params = builder.txt2img(order(**fields), "t1").params
    spec = GenerationRequest.from_params(params).control_net
    assert spec is not None
    return spec.model.name


def test_controlnet_on_sdxl_without_an_sdxl_controlnet_says_what_to_pull(
    builder: RequestBuilder,
) -> None:
    with pytest.raises(InvalidArgument, match=r"needs the sdxl_canny .*dan models pull sdxl_canny"):
        builder.txt2img(order(control_net=control("sd15_canny")), "t1")


def test_the_checkpoints_family_picks_the_controlnet_of_the_named_kind(
    builder: RequestBuilder, tmp_path: Path
) -> None:
    write_header(tmp_path / "models" / "controlnet" / "control_sdxl_canny.safetensors", SDXL_CN)
    for name in ("sd15_canny", "sdxl_canny"):
        assert controlnet_of(builder, control_net=control(name)) == "control_sdxl_canny"
        sd15 = controlnet_of(builder, model="one", control_net=control(name))
        assert sd15 == "control_sd15_canny"


def test_a_controlnet_of_the_other_family_is_refused_naming_both_files(
    builder: RequestBuilder, tmp_path: Path
) -> None:
    folder = tmp_path / "models" / "controlnet"
    write_header(folder / "control_sdxl_openpose.safetensors", ("control_model.x",))
    write_header(folder / "control_sd15_openpose.safetensors", SDXL_CN)
    with pytest.raises(
        InvalidArgument,
        match=r"control_sdxl_openpose\.safetensors is an sd15 ControlNet and xl\.safetensors an "
        r"sdxl checkpoint.*`dan models pull sdxl_openpose`",
    ):
        builder.txt2img(order(control_net=control("sdxl_openpose", "openpose")), "t1")
    with pytest.raises(
        InvalidArgument,
        match=r"control_sd15_openpose\.safetensors is an sdxl ControlNet and one\.safetensors",
    ):
        builder.txt2img(order(model="one", control_net=control("sd15_openpose", "none")), "t1")
