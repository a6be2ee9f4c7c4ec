"""The A1111 facade's translation of request bodies into DAN's orders, and its infotext parser:
what maps, what is refused (naming the A1111 field), without a server."""

from __future__ import annotations

from typing import Any

import pytest

from dan.accounts.options import ChosenOptions
from dan.api.a1111.controlnet import control_unit, detect_orders
from dan.api.a1111.pnginfo import parse_infotext
from dan.api.a1111.schemas import DetectRequest, Img2ImgRequest, Txt2ImgRequest
from dan.api.a1111.translate import (
    a1111_field_names,
    checkpoint_reference,
    img2img_order,
    sampler,
    txt2img_order,
)
from dan.errors import InvalidArgument, ModelNotFound
from dan.samplers import SAMPLERS

SHA = "0123456789abcdef" * 4
NOTHING = ChosenOptions()  # a caller that never set options


def txt2img(**body: Any) -> Any:
    return txt2img_order(Txt2ImgRequest.model_validate(body), NOTHING)


def img2img(**body: Any) -> Any:
    return img2img_order(Img2ImgRequest.model_validate({"init_images": ["x"], **body}), NOTHING)


def refused(field: str, call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidArgument) as exc:
        call(*args, **kwargs)
    assert exc.value.message.startswith(f"Invalid {field}:"), exc.value.message
    return exc.value.message


@pytest.mark.parametrize(
    ("name", "scheduler", "dan"),
    [
        ("Euler a", None, ("Euler a", "Automatic")),
        ("euler A", "automatic", ("Euler a", "Automatic")),  # webuiapi sends "automatic"
        ("k_euler_a", "Automatic", ("Euler a", "Automatic")),
        # A1111 1.9+: Automatic is the sampler's default schedule ...
        ("DPM++ SDE", None, ("DPM++ SDE", "Karras")),
        ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE", None, ("DPM++ 2M SDE", "Exponential")),
        ("DPM2 a", "automatic", ("DPM2 a", "Karras")),
        # ... and Uniform the sampler's own (DAN's Automatic).
        ("DPM++ SDE", "Uniform", ("DPM++ SDE", "Automatic")),
        ("DPM++ 2M", "uniform", ("DPM++ 2M", "Automatic")),
        ("DPM++ SDE Karras", None, ("DPM++ SDE", "Karras")),
        ("DPM++ SDE Karras", "karras", ("DPM++ SDE", "Karras")),
        ("DPM++ 2M Karras", "Uniform", ("DPM++ 2M", "Karras")),  # the name says Karras
        ("Euler", "Exponential", ("Euler", "Exponential")),
        ("LMS", "sgm_uniform", ("LMS", "SGM Uniform")),
        ("k_lms", "", ("LMS", "Automatic")),
        ("DDIM", None, ("DDIM", "Automatic")),
        ("UniPC", "Uniform", ("UniPC", "Automatic")),
    ],
)
def test_samplers_and_schedulers_map_to_dans_samplers(
    name: str, scheduler: str | None, dan: tuple[str, str]
) -> None:
    assert sampler(name, scheduler) == dan


def test_what_dan_cannot_sample_is_refused_with_the_valid_values() -> None:
    message = refused("sampler_name", sampler, "PLMS", None)
    assert all(name in message for name in SAMPLERS)
    assert "Automatic, Karras, Exponential, SGM Uniform" in refused(
        "scheduler", sampler, "Euler a", "Beta"
    )
    assert "Automatic or SGM Uniform" in refused("scheduler", sampler, "Euler a", "Karras")
    assert "Automatic only" in refused("scheduler", sampler, "DDIM", "Karras")
    refused("sampler_index", txt2img, sampler_index="DPM fast")


def test_a_sampler_and_its_schedule_become_the_order() -> None:
    generation = txt2img(sampler_name="DPM++ 2M", scheduler="Exponential").generation
    assert (generation.sampler_name, generation.scheduler) == ("DPM++ 2M", "Exponential")
    generation = txt2img(sampler_index="DPM++ 2M Karras").generation
    assert (generation.sampler_name, generation.scheduler) == ("DPM++ 2M", "Karras")


def test_a1111_defaults_become_an_order() -> None:
    order = txt2img(prompt="a fox")
    generation = order.generation
    assert (generation.sampler_name, generation.steps, generation.cfg_scale) == ("Euler", 50, 7)
    assert (generation.width, generation.height, generation.seed) == (512, 512, -1)
    assert (generation.model, generation.control_net, order.hires) == (None, None, None)
    assert (generation.batch_size, generation.n_iter) == (1, 1)


def test_a1111_nulls_mean_defaults_and_unknown_fields_are_ignored() -> None:
    order = txt2img(prompt=None, seed=None, eta=1.0, s_noise=1, do_not_save_samples=True)
    assert (order.generation.prompt, order.generation.seed) == ("", -1)


@pytest.mark.parametrize(
    ("title", "reference"),
    [
        (f"alpha.safetensors [{SHA[:10]}]", SHA[:10]),
        (f"sub/alpha.safetensors [{SHA}]", SHA),
        ("old.ckpt [7460a6fa]", "old.ckpt"),  # A1111's old 8-digit hash is not a sha256
        ("alpha", "alpha"),
    ],
)
def test_checkpoint_titles_resolve_by_short_hash_or_name(title: str, reference: str) -> None:
    assert checkpoint_reference(title) == reference


def test_the_checkpoint_is_the_overrides_else_the_callers_choice() -> None:
    body = Txt2ImgRequest.model_validate({})
    assert txt2img_order(body, ChosenOptions(checkpoint=SHA)).generation.model == SHA
    named = Txt2ImgRequest.model_validate(
        {"override_settings": {"sd_model_checkpoint": f"beta.safetensors [{SHA[:10]}]"}}
    )
    assert txt2img_order(named, ChosenOptions(checkpoint="b" * 64)).generation.model == SHA[:10]
    clip = {"override_settings": {"CLIP_stop_at_last_layers": 13}}
    refused("override_settings.CLIP_stop_at_last_layers", txt2img, **clip)
    assert txt2img(override_settings={"CLIP_stop_at_last_layers": 1}).generation.model is None


def test_clip_skip_and_the_vae_come_from_override_settings() -> None:
    settings = {"CLIP_stop_at_last_layers": 2, "sd_vae": "kl-f8.safetensors"}
    generation = txt2img(override_settings=settings).generation
    assert (generation.clip_skip, generation.vae) == (2, "kl-f8.safetensors")
    assert (txt2img().generation.clip_skip, txt2img().generation.vae) == (1, None)
    refused("override_settings.sd_vae", txt2img, override_settings={"sd_vae": 3})


def test_override_settings_win_over_the_callers_options() -> None:
    chosen = ChosenOptions(clip_skip=3, vae=SHA)
    generation = txt2img_order(Txt2ImgRequest.model_validate({}), chosen).generation
    assert (generation.clip_skip, generation.vae) == (3, SHA)
    body = {"override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "None"}}
    generation = txt2img_order(Txt2ImgRequest.model_validate(body), chosen).generation
    assert (generation.clip_skip, generation.vae) == (1, "None")


def test_hires_fields() -> None:
    hires = txt2img(enable_hr=True, hr_scale=1.5, denoising_strength=0.4).hires
    assert (hires.scale, hires.denoising_strength, hires.upscaler) == (1.5, 0.4, "Latent")
    resized = txt2img(enable_hr=True, width=512, height=256, hr_resize_x=1024).hires
    assert resized.scale == 2.0
    assert txt2img(hr_scale=3).hires is None  # hires fields mean nothing without enable_hr
    refused("hr_scale", txt2img, enable_hr=True, hr_scale=2.5)
    refused("hr_resize_x", txt2img, enable_hr=True, hr_resize_x=1024, hr_resize_y=600)
    assert txt2img(enable_hr=True, steps=20, hr_second_pass_steps=10).hires.steps == 10
    assert txt2img(enable_hr=True, steps=20).hires.steps == 0  # as many as the first pass
    refused("hr_checkpoint_name", txt2img, enable_hr=True, hr_checkpoint_name="other")
    same = {"hr_sampler_name": "Use same sampler", "hr_checkpoint_name": "Use same checkpoint"}
    assert txt2img(enable_hr=True, **same).hires is not None


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("restore_faces", {"restore_faces": True}),
        ("tiling", {"tiling": True}),
        ("subseed_strength", {"subseed_strength": 0.3}),
        ("seed_resize_from_w", {"seed_resize_from_w": 256}),
        ("script_name", {"script_name": "x/y/z plot"}),
        ("refiner_checkpoint", {"refiner_checkpoint": "refiner"}),
        ("alwayson_scripts", {"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}),
    ],
)
def test_features_dan_lacks_are_refused_not_ignored(field: str, body: dict[str, Any]) -> None:
    refused(field, txt2img, **body)


def test_img2img_and_inpainting_fields() -> None:
    order = img2img(resize_mode=2, denoising_strength=0.3)
    assert (order.init_image, order.resize_mode, order.denoising_strength) == ("x", 2, 0.3)
    assert order.inpaint is None
    inpaint = img2img(mask="m", inpainting_fill=1, inpaint_full_res_padding=12).inpaint
    assert (inpaint.mask, inpaint.inpaint_area, inpaint.padding) == ("m", 1, 12)
    assert (inpaint.mask_blur, inpaint.mask_mode) == (4, 0)  # A1111's defaults
    whole = img2img(mask="m", inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    assert (whole.inpaint.inpaint_area, whole.inpaint.mask_blur) == (0, 0)
    inverted = img2img(mask="m", inpainting_fill=1, inpainting_mask_invert=1)
    assert inverted.inpaint.mask_mode == 1
    assert img2img(mask="m", inpainting_fill=1, mask_blur_x=6, mask_blur_y=6).inpaint.mask_blur == 6
    refused("mask_blur_x", img2img, mask="m", inpainting_fill=1, mask_blur_x=2, mask_blur_y=6)
    assert img2img(mask="m", inpainting_fill=0).inpaint.fill == 0  # type: ignore[union-attr]
    for fill in (2, 3):
        refused("inpainting_fill", img2img, mask="m", inpainting_fill=fill)
    assert img2img(inpainting_fill=0).inpaint is None  # no mask: inpainting_fill means nothing
    refused("init_images", img2img_order, Img2ImgRequest.model_validate({}), NOTHING)
    refused("init_images", img2img, init_images=["a", "b"])
    refused("resize_mode", img2img, resize_mode=3)


def unit(**fields: Any) -> dict[str, Any]:
    return {"alwayson_scripts": {"ControlNet": {"args": [fields]}}}


def test_controlnet_units_as_the_extension_and_webuiapi_send_them() -> None:
    order = txt2img(
        **unit(image="img", module="canny", model="control_sd15_canny [fef5e48e]", weight=0.5)
    ).generation.control_net
    assert (order.image, order.preprocess, order.model, order.weight) == (
        "img",
        "canny",
        "sd15_canny",
        0.5,
    )
    assert (order.low_threshold, order.high_threshold, order.resize_mode) == (100, 200, 1)
    pose = txt2img(
        **unit(
            input_image="img",
            module="OpenPose",
            model="None",
            resize_mode="Just Resize",
            control_mode="ControlNet is more important",
        )
    ).generation.control_net
    assert (pose.preprocess, pose.model, pose.resize_mode, pose.guess_mode) == (
        "openpose",
        "sd15_openpose",
        0,
        True,
    )
    with_dict = unit(image={"image": "img", "mask": None}, module="canny", threshold_a=20)
    assert txt2img(**with_dict).generation.control_net.low_threshold == 20
    ready = unit(image="edges", module="none", model="control_v11p_sd15_canny [d14c016b]")
    control = txt2img(**ready).generation.control_net
    assert (control.preprocess, control.model) == ("none", "sd15_canny")


def test_disabled_and_empty_units_are_none_and_two_enabled_are_refused() -> None:
    assert control_unit({"ControlNet": {"args": []}}, None) is None
    assert control_unit({"controlnet": {"args": [{"enabled": False}]}}, None) is None
    two = {"ControlNet": {"args": [{"image": "a", "module": "canny"}] * 2}}
    refused("alwayson_scripts.ControlNet.args", control_unit, two, None)


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("alwayson_scripts.ControlNet.args.0.module", {"image": "i", "module": "depth"}),
        ("alwayson_scripts.ControlNet.args.0.model", {"image": "i", "model": "control_depth"}),
        ("alwayson_scripts.ControlNet.args.0.image", {"module": "canny"}),
        ("alwayson_scripts.ControlNet.args.0.model", {"image": "i", "module": "none"}),
        ("alwayson_scripts.ControlNet.args.0.weight", {"image": "i", "weight": 3}),
        ("alwayson_scripts.ControlNet.args.0.control_mode", {"image": "i", "control_mode": 1}),
        ("alwayson_scripts.ControlNet.args.0.threshold_a", {"image": "i", "threshold_a": 300}),
        ("alwayson_scripts.ControlNet.args.0.hr_option", {"image": "i", "hr_option": "Low res"}),
    ],
)
def test_controlnet_units_dan_cannot_run_are_refused_by_field(
    field: str, fields: dict[str, Any]
) -> None:
    refused(field, txt2img, **unit(**{"module": "canny", **fields}))


def test_detect_maps_modules_and_thresholds() -> None:
    body = DetectRequest(controlnet_module="canny", controlnet_images=["a", "b"])
    orders = detect_orders(body)
    assert [(o.image, o.preprocess, o.low, o.high) for o in orders] == [
        ("a", "canny", 100, 200),
        ("b", "canny", 100, 200),
    ]
    refused("controlnet_input_images", detect_orders, DetectRequest(controlnet_module="canny"))
    refused("controlnet_module", detect_orders, DetectRequest(controlnet_module="mlsd"))


def test_dans_field_names_become_a1111s() -> None:
    renamed = a1111_field_names(ModelNotFound("Invalid model: no checkpoint 'x'", ref="x"))
    assert isinstance(renamed, ModelNotFound)
    assert renamed.message == "Invalid override_settings.sd_model_checkpoint: no checkpoint 'x'"
    assert renamed.data == {"ref": "x"}
    cn = a1111_field_names(InvalidArgument("Invalid control_net.0.model: missing"))
    assert cn.message == "Invalid alwayson_scripts.ControlNet.args.model: missing"
    same = InvalidArgument("Invalid prompt: too long")
    assert a1111_field_names(same) is same


def test_infotext_parses_as_a1111_parses_it() -> None:
    text = (
        "a fox, (film grain:1.2)\nin the snow\nNegative prompt: blur\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: "
        'abcdef1234, Lora hashes: "detail: 0123456789, face: 9876543210", Version: DAN 0.1.0'
    )
    assert parse_infotext(text) == {
        "Prompt": "a fox, (film grain:1.2)\nin the snow",
        "Negative prompt": "blur",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "42",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "abcdef1234",
        "Lora hashes": "detail: 0123456789, face: 9876543210",
        "Version": "DAN 0.1.0",
    }
    assert parse_infotext("") == {}
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
