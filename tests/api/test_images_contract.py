"""img2img, inpaint and upscale over HTTP: input images are checked before anything is queued."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.api.conftest import Api

IMG2IMG = "/api/sd/img2img"
UPSCALE = "/api/sd/upscale"


def png(
    size: tuple[int, int] = (64, 64),
    colour: object = (200, 30, 30),
    mode: str = "RGB",
    fmt: str = "PNG",
) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)  # type: ignore[arg-type]
    return base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> str:
    """A PNG whose header claims ``width`` x ``height``: a decompression bomb's first bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(data).decode()


def img2img(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "init_image": png(), **fields}


def upscale(**fields: Any) -> dict[str, Any]:
    return {"image": png((32, 16)), "upscalingRate": 2, "upscaler": "Lanczos", **fields}


BAD_IMG2IMG = [
    ({"init_image": None}, "Invalid init_image"),
    ({"init_image": png()[:-7]}, "Invalid init_image: not valid base64"),
    (
        {"init_image": base64.b64encode(b"just some text").decode()},
        "Invalid init_image: not a PNG, JPEG or WebP image",
    ),
    ({"init_image": png(fmt="BMP")}, "Invalid init_image: BMP images are not accepted"),
    (
        {"init_image": png_header_only(20000, 20000)},
        "Invalid init_image: the image is far too large",
    ),
    (
        {"init_image": png_header_only(5000, 5000)},
        "Invalid init_image: the image is 5000x5000; at most",
    ),
    ({"resize_mode": 3}, "Invalid resize_mode: must be an integer between 0 and 2, got 3"),
    ({"denoising_strength": 1.5}, "Invalid denoising_strength: must be a number between 0 and 1"),
    (
        {"denoising_strength": 0.1, "steps": 5},
        "Invalid denoising_strength: 0.1 x 5 steps runs no denoising step",
    ),
    (
        {"inpaint": {"mask": png((32, 32))}},
        "Invalid inpaint.mask: must be the same size as init_image (64x64), got 32x32",
    ),
    ({"inpaint": {"mask": "%%%"}}, "Invalid inpaint.mask: not valid base64"),
    ({"inpaint": {}}, "Invalid inpaint.mask: is required"),
    (
        {"inpaint": {"mask": png(), "mask_blur": 65}},
        "Invalid inpaint.mask_blur: must be an integer between 0 and 64",
    ),
    ({"inpaint": {"mask": png(), "mask_mode": 2}}, "Invalid inpaint.mask_mode"),
    ({"inpaint": {"mask": png(), "inpaint_area": -1}}, "Invalid inpaint.inpaint_area"),
    ({"loras": [["nope-nope-nope", 1]]}, "Invalid loras: entry 0"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_IMG2IMG)
def test_bad_img2img_input_is_a_400_naming_the_field(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    for path in (IMG2IMG, f"{IMG2IMG}/async", "/v0/img2img"):
        reply = api.post(path, img2img(**fields))
        assert reply["_http"] == 400, reply
        assert reply.get("message", reply.get("msg", "")).startswith(message), reply
    assert api.services.blobs.groups() == []  # nothing was kept of the refused tasks


BAD_UPSCALE = [
    ({"image": "abc"}, "Invalid image: not valid base64"),
    ({"upscalingRate": 5}, "Invalid upscalingRate: must be a number between 1 and 4"),
    ({"upscaler": "Latent"}, "Invalid upscaler: 'Latent' is not available"),
    (
        {"upscaler": "ESRGAN 4x"},
        "Invalid upscaler: 'ESRGAN 4x' is not available; use one of Lanczos, Nearest",
    ),
    ({"upscaler2": "Foo", "upscaler2_factor": 0.5}, "Invalid upscaler2"),
    ({"upscaler2_factor": 2}, "Invalid upscaler2_factor"),
    (
        {"image": png((3000, 100)), "upscalingRate": 4},
        "Invalid upscalingRate: 3000x100 x 4 would be 12000 pixels wide",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_UPSCALE)
def test_bad_upscale_input_is_a_400_naming_the_field(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    reply = api.post(UPSCALE, upscale(**fields))
    assert (reply["_http"], reply["code"]) == (400, 3000), reply
    assert reply["message"].startswith(message), reply["message"]


@pytest.mark.usefixtures("worker")
def test_img2img_returns_the_requested_size(api: Api) -> None:
    reply = api.post(IMG2IMG, img2img(init_image=png((100, 50)), width=96, height=64, seed=3))
    assert reply["_http"] == 200 and reply["data"]["seeds"] == [3]
    image = Image.open(io.BytesIO(base64.b64decode(reply["data"]["images"][0])))
    assert image.size == (96, 64)
    assert "Denoising strength: 0.5" in image.info["parameters"]


@pytest.mark.usefixtures("worker")
def test_inpaint_with_data_url_and_alpha_mask_is_queued_and_run(api: Api) -> None:
    mask = "data:image/png;base64," + png(colour=(255, 255, 255, 255), mode="RGBA")
    reply = api.post(
        f"{IMG2IMG}/async", img2img(inpaint={"mask": mask, "mask_blur": 4, "inpaint_area": 1})
    )
    assert reply["_http"] == 200
    params = api.services.tasks.get(reply["data"]["taskId"]).params
    mask = Image.open(io.BytesIO(api.services.blobs.get(params["inpaint"]["mask_key"])))
    assert mask.mode == "RGBA"  # the alpha channel reaches the engine
    assert params["inpaint"] == {**params["inpaint"], "mask_blur": 4, "inpaint_area": 1}


@pytest.mark.parametrize(
    "mask, mode, message",
    [
        (png(colour=(0, 0, 0)), 0, "Invalid inpaint.mask: it has no white (or opaque) pixel"),
        # Transparent everywhere: the alpha is the mask, and nothing is painted.
        (png(colour=(255, 255, 255, 0), mode="RGBA"), 0, "Invalid inpaint.mask: it has no"),
        (png(colour=(255, 255, 255)), 1, "Invalid inpaint.mask: it is white (or opaque)"),
    ],
)
def test_a_mask_that_regenerates_nothing_is_refused_at_submit(
    api: Api, mask: str, mode: int, message: str
) -> None:
    reply = api.post(f"{IMG2IMG}/async", img2img(inpaint={"mask": mask, "mask_mode": mode}))
    assert (reply["_http"], reply["code"]) == (400, 3000)
    assert reply["message"].startswith(message), reply["message"]


@pytest.mark.usefixtures("worker")
def test_upscale_returns_rate_times_size(api: Api) -> None:
    reply = api.post(UPSCALE, upscale(upscalingRate=2.5, upscaler2="None"))
    assert reply["_http"] == 200, reply
    image = Image.open(io.BytesIO(base64.b64decode(reply["data"]["images"][0])))
    assert image.size == (80, 40)
    assert reply["data"]["seeds"] == []


def test_supported_model_info_lists_upscalers(api: Api) -> None:
    data = api.client.get("/api/sd/supportedModelInfo").json()["data"]
    assert data["Upscalers"] == ["Lanczos", "Nearest"]
    assert data["HiresUpscalers"][:2] == ["Latent", "Latent (antialiased)"]


def unit(**fields: Any) -> dict[str, Any]:
    return {"image": png(), "preprocess": "canny", "model": "sd15_canny", **fields}


BAD_CONTROL_NET = [
    ({"image": None}, "Invalid control_net.0.image"),
    ({"image": "abc"}, "Invalid control_net.0.image: not valid base64"),
    ({"preprocess": "depth"}, "Invalid control_net.0.preprocess: must be one of canny, openpose"),
    (
        {"model": "sd15_depth"},
        "Invalid control_net.0.model: must be one of sd15_canny, sd15_openpose",
    ),
    (
        {"model": "sd15_openpose"},
        "Invalid control_net.0.model: no ControlNet file serves sd15_openpose",
    ),
    ({"weight": 2.5}, "Invalid control_net.0.weight: must be a number between 0 and 2"),
    ({"resize_mode": 3}, "Invalid control_net.0.resize_mode"),
    (
        {"guidance_start": 0.8, "guidance_end": 0.2},
        "Invalid control_net.0: guidance_start (0.8) must not be after",
    ),
    (
        {"preprocess_param1": 300},
        "Invalid control_net.0.preprocess_param1: must be a number between 0 and 255",
    ),
    (
        {"preprocess_param1": 200, "preprocess_param2": 100},
        "Invalid control_net.0.preprocess_param1: the low canny",
    ),
    ({"guessmode": "maybe"}, "Invalid control_net.0.guessmode"),
]


@pytest.mark.usefixtures("controlnet_installed")
def test_hires_fix_with_control_net_is_queued_with_both(api: Api) -> None:
    body = {"prompt": "a cat", "control_net": [unit()], "upscale": {"scale": 2}}
    reply = api.post("/api/sd/txt2img/async", body)
    assert reply["_http"] == 200, reply
    params = api.services.tasks.get(reply["data"]["taskId"]).params
    assert params["hires"]["scale"] == 2 and params["control_net"]["preprocess"] == "canny"


@pytest.fixture
def controlnet_installed(api: Api) -> None:
    # The registry identifies files by hash and never parses them: any bytes serve the name.
    folder = api.services.settings.models_dir / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "control_sd15_canny.safetensors").write_bytes(b"controlnet weights")
    api.services.registry.scan()


@pytest.mark.usefixtures("controlnet_installed")
@pytest.mark.parametrize(("fields", "message"), BAD_CONTROL_NET)
def test_bad_control_net_is_a_400_naming_the_field(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    body = {"prompt": "a cat", "control_net": [unit(**fields)]}
    for path in ("/api/sd/txt2img", IMG2IMG):
        reply = api.post(path, {**img2img(), **body} if path == IMG2IMG else body)
        assert (reply["_http"], reply["code"]) == (400, 3000), reply
        assert reply["message"].startswith(message), reply["message"]


@pytest.mark.usefixtures("controlnet_installed")
def test_control_net_unit_is_queued_with_its_image_and_extra_units_are_reported(api: Api) -> None:
    units = [unit(preprocess="openopse", guess_mode=True, model="sd15_canny"), unit(), unit()]
    reply = api.post("/api/sd/txt2img/async", {"prompt": "a cat", "control_net": units})
    assert reply["_http"] == 200
    assert reply["message"] == "success; only the first control_net unit is used, 2 more ignored"
    spec = api.services.tasks.get(reply["data"]["taskId"]).params["control_net"]
    assert (spec["preprocess"], spec["guess_mode"], spec["model"]["name"]) == (
        "openpose",
        True,
        "control_sd15_canny",
    )
    assert api.services.blobs.get(spec["image_key"]).startswith(b"\x89PNG")


@pytest.mark.usefixtures("worker")
def test_controlnet_detect_returns_the_control_image(api: Api) -> None:
    reply = api.post("/api/sd/controlnet/detect", {"image": png((48, 32)), "preprocess": "canny"})
    assert reply["_http"] == 200, reply
    assert Image.open(io.BytesIO(base64.b64decode(reply["data"]["images"][0]))).size == (48, 32)
    bad = api.post(
        "/api/sd/controlnet/detect",
        {"image": png(), "preprocess": "canny", "preprocess_param1": 250},
    )
    assert (bad["_http"], bad["code"]) == (400, 3000) and "low canny threshold" in bad["message"]


def test_openpose_records_the_body_model_when_it_is_installed(api: Api) -> None:
    body = {"image": png(), "preprocess": "openopse"}
    without = api.post("/api/sd/controlnet/detect/async", body)
    assert api.services.tasks.get(without["data"]["taskId"]).params["pose_model"] is None
    folder = Path(api.services.settings.models_dir) / "annotators"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "body_pose_model.pth").write_bytes(b"weights")
    api.services.registry.scan()
    queued = api.post("/api/sd/controlnet/detect/async", body)
    params = api.services.tasks.get(queued["data"]["taskId"]).params
    assert params["preprocess"] == "openpose"
    assert params["pose_model"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    canny = api.post("/api/sd/controlnet/detect/async", {"image": png(), "preprocess": "canny"})
    assert api.services.tasks.get(canny["data"]["taskId"]).params["pose_model"] is None


def safetensors_header(path: Path, *names: str) -> None:
    """A .safetensors file whose header names ``names`` (what the registry reads a family from)."""
    header = {
        name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        for i, name in enumerate(names)
    }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(names)))


def test_control_net_on_sdxl_needs_an_sdxl_controlnet(api: Api) -> None:
    models = api.services.settings.models_dir
    safetensors_header(models / "checkpoints" / "xl.safetensors", "conditioner.embedders.0.x")
    safetensors_header(models / "controlnet" / "control_sd15_canny.safetensors", "control_model.x")
    api.services.registry.scan()
    body = {"prompt": "a cat", "model": "xl", "control_net": [unit()]}
    refused = api.post("/api/sd/txt2img/async", body)
    assert (refused["_http"], refused["code"]) == (400, 3000), refused
    assert "`dan models pull sdxl_canny`" in refused["message"]
    safetensors_header(
        models / "controlnet" / "control_sdxl_canny.safetensors", "add_embedding.linear_1.weight"
    )
    api.services.registry.scan()
    for name in ("sd15_canny", "sdxl_canny"):
        reply = api.post("/api/sd/txt2img/async", {**body, "control_net": [unit(model=name)]})
        assert reply["_http"] == 200, reply
        spec = api.services.tasks.get(reply["data"]["taskId"]).params["control_net"]
        assert spec["model"]["name"] == "control_sdxl_canny"
