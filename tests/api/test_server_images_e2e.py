"""End to end on the real engine: img2img, inpainting, hires fix, upscaling, ControlNet
detection and interrogate over HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.fixtures.server import Server, start_server, wait_for_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.fixtures.tiny_controlnet import (
        build_tiny_controlnet,
        original_state_dict,
        write_original,
    )
    from tests.fixtures.tiny_lora import write_tiny_lora
    from tests.fixtures.tiny_sd import build_tiny_sd, write_tiny_checkpoint
    from tests.fixtures.tiny_upscaler import esrgan_state_dict, write_upscaler

    root = tmp_path_factory.mktemp("images-e2e")
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_tiny_checkpoint(checkpoints / "tiny.safetensors")
    unet = build_tiny_sd().unet
    controlnet = build_tiny_controlnet(unet)
    (root / "models" / "controlnet").mkdir(parents=True)
    write_original(
        original_state_dict(controlnet, unet.config),
        root / "models" / "controlnet" / "control_sd15_canny.safetensors",
    )
    write_tiny_checkpoint(checkpoints / "tiny-inpainting.safetensors", in_channels=9)
    upscalers = root / "models" / "upscalers"
    upscalers.mkdir(parents=True)
    write_upscaler(esrgan_state_dict(scale=4), upscalers / "tiny-esrgan.pth")
    loras = root / "models" / "loras"
    loras.mkdir(parents=True)
    write_tiny_lora(loras / "style-a.safetensors", seed=1)
    write_tiny_lora(loras / "style-b.safetensors", seed=2, layout="ldm")
    install_tiny_interrogators(root / "models" / "interrogators")
    server = start_server(root)
    yield server
    server.stop()


def install_tiny_interrogators(folder: Path) -> None:
    """Tiny random BLIP, CLIP and DeepDanbooru files, named as the catalog names the real ones
    (the registry serves a catalog name by file name too)."""
    from tests.fixtures.tiny_blip import blip_state_dict, write_blip_checkpoint, write_vocabulary
    from tests.fixtures.tiny_clip import clip_state_dict, write_torchscript
    from tests.fixtures.tiny_deepdanbooru import write_tiny_tagger

    folder.mkdir(parents=True)
    write_blip_checkpoint(blip_state_dict(), folder / "model_base_caption_capfilt_large.pth")
    write_vocabulary(folder / "bert-base-uncased-vocab.txt")
    write_torchscript(clip_state_dict(), folder / "ViT-L-14.pt")
    write_tiny_tagger(folder / "model-resnet_custom_v3.pt")


def encode(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def photo(size: tuple[int, int] = (64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (40, 90, 160))
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 6, h // 6, w - w // 6, h - h // 3), fill=(230, 200, 40))
    return image


def ok(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = server.post(path, body).json()
    assert reply["code"] == 200, reply
    return reply["data"]  # type: ignore[no-any-return]


def img2img(**fields: Any) -> dict[str, Any]:
    body = {"prompt": "a fox", "steps": 4, "width": 64, "height": 64, "model": "tiny", "seed": 1}
    return {**body, "init_image": encode(photo()), **fields}


def test_img2img_strength_zero_keeps_the_picture_and_one_redraws_it(server: Server) -> None:
    def run(strength: float, seed: int) -> bytes:
        body = img2img(denoising_strength=strength, seed=seed)
        image = decode(ok(server, "/api/sd/img2img", body)["images"][0])
        assert image.size == (64, 64)
        return image.tobytes()

    # Strength 0 only passes the picture through the VAE: no noise, so the seed cannot matter.
    assert run(0, seed=1) == run(0, seed=2)
    assert run(1, seed=1) != run(1, seed=2)


def test_img2img_resize_mode_sets_the_output_size(server: Server) -> None:
    for mode in (0, 1, 2):
        data = ok(
            server,
            "/api/sd/img2img",
            img2img(init_image=encode(photo((100, 50))), resize_mode=mode, width=96, height=64),
        )
        assert decode(data["images"][0]).size == (96, 64)


@pytest.mark.parametrize("model", ["tiny", "tiny-inpainting"])
@pytest.mark.parametrize("area", [0, 1])
def test_inpaint_leaves_unmasked_pixels_unchanged(server: Server, model: str, area: int) -> None:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 40, 40), fill=255)
    body = img2img(
        model=model, denoising_strength=1, inpaint={"mask": encode(mask), "inpaint_area": area}
    )
    result = np.asarray(decode(ok(server, "/api/sd/img2img", body)["images"][0]))
    original = np.asarray(photo())
    outside = np.asarray(mask) == 0
    assert (result[outside] == original[outside]).all()
    assert (result[~outside] != original[~outside]).any()


def test_inpaint_mask_mode_1_regenerates_the_other_side(server: Server) -> None:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    body = img2img(denoising_strength=1, inpaint={"mask": encode(mask), "mask_mode": 1})
    result = np.asarray(decode(ok(server, "/api/sd/img2img", body)["images"][0]))
    original = np.asarray(photo())
    assert (result[:, :32] == original[:, :32]).all()  # the masked half is kept
    assert (result[:, 32:] != original[:, 32:]).any()


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Lanczos", "tiny-esrgan"])
def test_hires_fix_output_is_scaled(server: Server, upscaler: str) -> None:
    body = {"prompt": "a fox", "steps": 3, "width": 64, "height": 64, "model": "tiny"}
    hires = {"scale": 1.5, "denoising_strength": 0.5, "upscaler": upscaler}
    image = decode(ok(server, "/api/sd/txt2img", {**body, "upscale": hires})["images"][0])
    assert image.size == (96, 96)


def test_upscale_endpoint(server: Server) -> None:
    for upscaler, rate, second in (
        ("Lanczos", 2, None),
        ("tiny-esrgan", 4, None),
        ("tiny-esrgan", 2, "Nearest"),
    ):
        body = {"image": encode(photo((32, 24))), "upscalingRate": rate, "upscaler": upscaler}
        if second:
            body |= {"upscaler2": second, "upscaler2_factor": 0.5}
        image = decode(ok(server, "/api/sd/upscale", body)["images"][0])
        assert image.size == (32 * rate, 24 * rate)


def test_loras_change_the_image_and_never_leak(server: Server) -> None:
    body = {"prompt": "a fox", "steps": 3, "width": 64, "height": 64, "model": "tiny", "seed": 4}

    def pixels(**fields: Any) -> bytes:
        return decode(ok(server, "/api/sd/txt2img", {**body, **fields})["images"][0]).tobytes()

    plain = pixels()
    with_a = pixels(loras=[["style-a", 1.0]])
    with_both = pixels(loras=[["style-a", 1.0], ["style-b", 0.7]])
    assert len({plain, with_a, with_both}) == 3
    assert pixels() == plain  # the next task does not inherit the LoRA
    assert pixels(loras=[["style-a", 0]]) == plain
    # A1111 tags in the prompt mean the same as the loras field.
    assert pixels(prompt="a fox <lora:style-a:1>") == with_a
    info = ok(server, "/api/sd/txt2img", {**body, "loras": [["style-a", 1.0]]})["images"][0]
    assert "Lora hashes: " in Image.open(io.BytesIO(base64.b64decode(info))).info["parameters"]


def test_supported_model_info_lists_loras_and_upscalers(server: Server) -> None:
    data = server.client.get("/api/sd/supportedModelInfo").json()["data"]
    assert [lora["name"] for lora in data["LoRAs"]] == ["style-a", "style-b"]
    assert "tiny-esrgan" in data["Upscalers"] and "Latent" in data["HiresUpscalers"]


def test_controlnet_detect_canny_finds_the_edges(server: Server) -> None:
    square = Image.new("RGB", (64, 48), "black")
    ImageDraw.Draw(square).rectangle((16, 12, 47, 35), fill="white")
    body = {"image": encode(square), "preprocess": "canny", "preprocess_param1": 50}
    edges = np.asarray(decode(ok(server, "/api/sd/controlnet/detect", body)["images"][0]))
    assert edges.shape == (48, 64, 3)
    assert edges[12:36, 16].any() and not edges[20:28, 24:40].any()  # border yes, inside no


def test_controlnet_canny_conditions_txt2img_and_weight_zero_is_plain(server: Server) -> None:
    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle((16, 16, 47, 47), fill="white")
    body = {"prompt": "a fox", "steps": 3, "width": 64, "height": 64, "model": "tiny", "seed": 8}

    def pixels(**unit: Any) -> bytes:
        fields = (
            {
                "control_net": [
                    {"image": encode(square), "preprocess": "canny", "model": "sd15_canny", **unit}
                ]
            }
            if unit
            else {}
        )
        return decode(ok(server, "/api/sd/txt2img", {**body, **fields})["images"][0]).tobytes()

    plain = pixels()
    assert pixels(weight=0) == plain
    assert pixels(weight=1) != plain
    assert pixels(weight=1, guidance_start=0.5) != pixels(weight=1)


def test_hires_fix_with_a_controlnet(server: Server) -> None:
    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle((16, 16, 47, 47), fill="white")
    unit = {"image": encode(square), "preprocess": "canny", "model": "sd15_canny"}
    body = {
        "prompt": "a fox",
        "steps": 3,
        "width": 64,
        "height": 64,
        "model": "tiny",
        "seed": 8,
        "upscale": {"scale": 1.5, "denoising_strength": 0.5, "upscaler": "Latent"},
    }
    plain = decode(ok(server, "/api/sd/txt2img", body)["images"][0])
    zero = decode(
        ok(server, "/api/sd/txt2img", {**body, "control_net": [{**unit, "weight": 0}]})["images"][0]
    )
    full = decode(ok(server, "/api/sd/txt2img", {**body, "control_net": [unit]})["images"][0])
    assert plain.size == zero.size == full.size == (96, 96)
    assert zero.tobytes() == plain.tobytes() and full.tobytes() != plain.tobytes()


def test_interrogate_clip_captions_through_the_real_models(server: Server) -> None:
    data = ok(server, "/api/sd/interrogate", {"image": encode(photo()), "model": "clip"})
    caption, *terms = data["caption"].split(", ")
    assert caption.strip() and len(terms) >= 4 and terms[-4].startswith("by ")
    again = ok(server, "/api/sd/interrogate", {"image": encode(photo()), "model": "clip"})
    assert again["caption"] == data["caption"]


def test_interrogate_deepdanbooru_async_then_status(server: Server) -> None:
    body = {"image": encode(photo()), "model": "deepdanbooru"}
    task_id = ok(server, "/api/sd/interrogate/async", body)["taskId"]
    data = wait_for_status(server, task_id, {2, 3})
    assert data["status"] == 2 and isinstance(data["caption"], str), data
    v0 = server.post("/v0/interrogate", body).json()
    assert v0 == {"caption": data["caption"]}


def test_interrogate_refuses_a_broken_image(server: Server) -> None:
    reply = server.post("/api/sd/interrogate", {"image": "bm90IGFuIGltYWdl", "model": "clip"})
    assert reply.status_code == 400 and reply.json()["message"].startswith("Invalid image")
