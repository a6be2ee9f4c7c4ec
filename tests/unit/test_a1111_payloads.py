"""A DAN task as AUTOMATIC1111's request bodies: models by the instance's names, LoRA tags,
hires fix at DAN's exact size, inpainting masks by DAN's rule, ControlNet units."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from dan.domain import (
    ControlNetSpec,
    DetectRequest,
    GenerationRequest,
    HiresFix,
    Img2ImgRequest,
    InpaintArea,
    InpaintSpec,
    LoraSpec,
    MaskMode,
    ModelKind,
    ModelRef,
    ResizeMode,
    UpscalerChoice,
    UpscaleRequest,
)
from dan.workers.a1111 import payloads

CHECKPOINT = ModelRef("c" * 64, "dreamy")
LORA = ModelRef("1" * 64, "ink")
ESRGAN = ModelRef("e" * 64, "RealESRGAN_x4plus")
CANNY = ModelRef("a" * 64, "control_sd15_canny")
INSTANCE_NAMES = {
    (ModelKind.CHECKPOINT, CHECKPOINT.sha256): "dreamy.safetensors [0123456789]",
    (ModelKind.LORA, LORA.sha256): "ink_v2",
    (ModelKind.UPSCALER, ESRGAN.sha256): "R-ESRGAN 4x+",
    (ModelKind.CONTROLNET, CANNY.sha256): "control_sd15_canny [fef5e48e]",
}


def names(kind: ModelKind, sha256: str) -> str:
    return INSTANCE_NAMES[(kind, sha256)]


def generation(**changes: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a fox <lora:ink:0.5> in snow",
        "negative_prompt": "blurry",
        "seed": 42,
        "sampler_name": "DPM++ SDE Karras",
        "steps": 12,
        "cfg_scale": 6.5,
        "width": 96,
        "height": 64,
        "model": CHECKPOINT,
        "loras": (LoraSpec(LORA, 0.5),),
        "batch_size": 2,
        "n_iter": 3,
    }
    values.update(changes)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_txt2img_names_models_as_the_instance_does_and_keeps_the_checkpoint_loaded() -> None:
    body = payloads.txt2img(generation(), names)
    assert body["prompt"] == "a fox  in snow <lora:ink_v2:0.5>"
    assert body["override_settings"] == {
        "sd_model_checkpoint": "dreamy.safetensors [0123456789]",
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "None",  # the checkpoint's own
    }
    assert body["override_settings_restore_afterwards"] is False
    assert (body["seed"], body["subseed_strength"]) == (42, 0)
    assert (body["steps"], body["cfg_scale"]) == (12, 6.5)
    # A task stored with the old combined name goes out as A1111 1.9+ takes it: apart.
    assert (body["sampler_name"], body["scheduler"]) == ("DPM++ SDE", "Karras")
    assert (body["width"], body["height"], body["batch_size"], body["n_iter"]) == (96, 64, 2, 3)
    assert "enable_hr" not in body and "alwayson_scripts" not in body
    assert payloads.txt2img_size(generation()) == (96, 64)


@pytest.mark.parametrize(
    ("sampler", "schedule", "sent"),
    [
        ("DPM++ 2M", "Exponential", ("DPM++ 2M", "Exponential")),
        # DAN's Automatic is A1111's Uniform where A1111's Automatic would be Karras ...
        ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Uniform")),
        ("DPM2 a", "Automatic", ("DPM2 a", "Uniform")),
        # ... and Automatic where it is the same.
        ("Euler a", "Automatic", ("Euler a", "Automatic")),
        ("Euler a", "SGM Uniform", ("Euler a", "SGM Uniform")),
    ],
)
def test_sampler_and_schedule_type_are_sent_as_a1111_runs_them(
    sampler: str, schedule: str, sent: tuple[str, str]
) -> None:
    body = payloads.txt2img(generation(sampler_name=sampler, scheduler=schedule), names)
    assert (body["sampler_name"], body["scheduler"]) == sent


def test_hires_fix_by_its_scale_and_upscaler() -> None:
    hires = HiresFix(1.7, 0.45, UpscalerChoice("R-ESRGAN 4x+", ESRGAN))
    request = generation(hires=hires)
    body = payloads.txt2img(request, names)
    # 96 x 1.7 = 163.2 and 64 x 1.7 = 108.8: DAN rounds to multiples of 8.
    assert payloads.txt2img_size(request) == (160, 112)
    assert body["enable_hr"] is True and body["hr_scale"] == 1.7
    assert body["hr_second_pass_steps"] == 0 and "hr_resize_x" not in body
    assert body["hr_upscaler"] == "R-ESRGAN 4x+" and body["denoising_strength"] == 0.45
    latent = payloads.txt2img(generation(hires=HiresFix(2, 0.5, UpscalerChoice("Latent"))), names)
    assert latent["hr_upscaler"] == "Latent"


def test_controlnet_becomes_one_unit_of_the_extension() -> None:
    spec = ControlNetSpec(
        "t/control.png",
        "canny",
        CANNY,
        weight=0.8,
        resize_mode=ResizeMode.RESIZE_AND_FILL,
        guidance_start=0.1,
        guidance_end=0.9,
        guess_mode=True,
        low_threshold=50,
        high_threshold=150,
    )
    control = Image.new("RGB", (32, 48), "white")
    body = payloads.txt2img(generation(control_net=spec), names, control)
    [unit] = body["alwayson_scripts"]["controlnet"]["args"]
    assert decoded(unit.pop("image")).size == (32, 48)
    assert unit == {
        "enabled": True,
        "module": "canny",
        "model": "control_sd15_canny [fef5e48e]",
        "weight": 0.8,
        "resize_mode": "Resize and Fill",
        "guidance_start": 0.1,
        "guidance_end": 0.9,
        "threshold_a": 50,
        "threshold_b": 150,
        "control_mode": "ControlNet is more important",
        "pixel_perfect": True,
        "save_detected_map": False,
    }


def test_inpainting_sends_the_mask_thresholded_by_dans_rule() -> None:
    init = Image.new("RGB", (80, 48), "blue")
    mask = Image.new("RGBA", (80, 48), (0, 0, 0, 0))  # transparent: the alpha is the mask
    mask.paste((255, 255, 255, 200), (10, 10, 30, 30))
    inpaint = InpaintSpec("t/mask.png", 4, MaskMode.REGENERATE_UNMASKED, InpaintArea.WHOLE_PICTURE)
    request = Img2ImgRequest(generation(), "t/init.png", ResizeMode.CROP_AND_RESIZE, 0.6, inpaint)
    body = payloads.img2img(request, init, mask, names)
    sent = decoded(body["mask"])
    assert sent.mode == "L" and sent.size == (80, 48)
    assert sent.getpixel((20, 20)) == 255 and sent.getpixel((5, 5)) == 0
    assert set(sent.getdata()) == {0, 255}
    assert decoded(body["init_images"][0]).size == (80, 48)
    assert (body["resize_mode"], body["denoising_strength"], body["mask_blur"]) == (1, 0.6, 4)
    assert (body["inpainting_mask_invert"], body["inpaint_full_res"]) == (1, False)
    assert (body["width"], body["height"], body["inpainting_fill"]) == (96, 64, 1)
    assert payloads.img2img_size(request, init) == (96, 64)


def test_only_masked_inpainting_answers_at_the_pictures_size() -> None:
    init = Image.new("RGB", (80, 48), "blue")
    mask = Image.new("L", (80, 48), 255)
    inpaint = InpaintSpec("t/mask.png", 0, MaskMode.REGENERATE_MASKED, InpaintArea.ONLY_MASKED, 16)
    request = Img2ImgRequest(generation(), "t/init.png", ResizeMode.JUST_RESIZE, 0.5, inpaint)
    body = payloads.img2img(request, init, mask, names)
    assert (body["width"], body["height"]) == (96, 64)
    assert payloads.img2img_size(request, init) == (80, 48)
    assert (body["inpaint_full_res"], body["inpaint_full_res_padding"]) == (True, 16)


def test_upscale_by_a_factor() -> None:
    image = Image.new("RGB", (33, 21), "red")
    request = UpscaleRequest(
        "t/in.png", 2.5, UpscalerChoice("R-ESRGAN 4x+", ESRGAN), UpscalerChoice("Lanczos"), 0.3
    )
    body = payloads.upscale(request, image, names)
    assert (body["resize_mode"], body["upscaling_resize"]) == (0, 2.5)
    assert payloads.upscale_size(request, image) == (83, 53)  # half up
    assert (body["upscaler_1"], body["upscaler_2"]) == ("R-ESRGAN 4x+", "Lanczos")
    assert body["extras_upscaler_2_visibility"] == 0.3
    alone = payloads.upscale(UpscaleRequest("t/in.png", 2, UpscalerChoice("Nearest")), image, names)
    assert (alone["upscaler_2"], alone["extras_upscaler_2_visibility"]) == ("None", 0)


def test_detect_runs_the_preprocessor_at_the_pictures_resolution() -> None:
    image = Image.new("RGB", (120, 90), "gray")
    body = payloads.detect(DetectRequest("t/in.png", "canny", 40, 120), image)
    assert body["controlnet_module"] == "canny" and body["controlnet_processor_res"] == 90
    assert (body["controlnet_threshold_a"], body["controlnet_threshold_b"]) == (40, 120)
    assert decoded(body["controlnet_input_images"][0]).size == (120, 90)
