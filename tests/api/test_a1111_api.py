"""The AUTOMATIC1111 facade (/sdapi/v1, /controlnet) driven by the real webuiapi client from
PyPI against a live server (uvicorn on a loopback port) whose worker runs the FakeEngine:
what A1111 clients send, what they parse back, per-key options, progress and interrupt."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webuiapi
from PIL import Image

from dan.domain import ModelKind
from tests.fixtures.a1111_facade import MAX_BODY_BYTES, Facade, basic, facade_serving
from tests.fixtures.postgres import schema_url
from tests.store.conftest import POSTGRES_URL

SMALL: dict[str, Any] = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
SLOW_STEPS = 150  # 1.5 s at STEP_S (0.01): long enough to watch it run and to interrupt it
BOTH_DATABASES = pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (SQLite) unless a test asks for both databases with BOTH_DATABASES."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
    elif not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL to run the facade on PostgreSQL")
    else:
        with schema_url(POSTGRES_URL) as url:
            yield url


@pytest.fixture
def facade(tmp_path: Path, database: str | None) -> Iterator[Facade]:
    with facade_serving(tmp_path, database) as served:
        yield served


def picture(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (200, 30, 30)) -> Any:
    return Image.new("RGB", size, colour)


def fresh() -> dict[str, Any]:
    """A new ``alwayson_scripts`` for a call with ControlNet units: webuiapi adds them to the
    dict it is given, by default one shared by every later call of the process."""
    return {}


# -- txt2img ----------------------------------------------------------------------------------


@BOTH_DATABASES
def test_txt2img_answers_images_parameters_and_info(facade: Facade) -> None:
    key = facade.key("alice")
    result = facade.api(key).txt2img(**SMALL, seed=-1, negative_prompt="blur")
    [image] = result.images
    assert image.size == (64, 64) and image.format == "PNG"
    raw = result.json["images"][0]
    assert not raw.startswith("data:") and base64.b64decode(raw).startswith(b"\x89PNG")
    info = result.info
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]
    assert (info["prompt"], info["negative_prompt"]) == ("a fox", "blur")
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 2, 7.0)
    assert info["sampler_name"] == "Euler a"  # webuiapi's default sampler
    default = facade.services.models.default_checkpoint(None)
    assert default is not None
    assert (info["sd_model_name"], info["sd_model_hash"]) == (default.name, default.sha256[:10])
    assert f"Seed: {info['seed']}" in info["infotexts"][0]
    assert "Steps: 2" in info["infotexts"][0] and len(info["job_timestamp"]) == 14
    assert result.parameters["prompt"] == "a fox" and result.parameters["steps"] == 2


def test_a_seed_reproduces_its_image(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))
    first, again = (api.txt2img(**SMALL, seed=1234) for _ in range(2))
    assert first.info["seed"] == again.info["seed"] == 1234
    assert first.image.tobytes() == again.image.tobytes()


def test_samplers_and_schedulers_by_a1111_names(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))

    def ran(sampler_name: str, scheduler: str) -> str:
        result = api.txt2img(**SMALL, sampler_name=sampler_name, scheduler=scheduler)
        assert result.info["sampler_name"] == "DPM++ 2M"
        schedule = result.info["extra_generation_params"]["Schedule type"]
        assert f"Sampler: DPM++ 2M, Schedule type: {schedule}," in result.info["infotexts"][0]
        return str(schedule)

    assert ran("DPM++ 2M", "Karras") == "Karras"
    # As A1111 1.9+: Automatic is the sampler's default schedule (Karras for DPM++ 2M), and
    # Uniform the plain one; an old combined name carries its schedule.
    assert ran("DPM++ 2M", "Automatic") == "Karras"
    assert ran("DPM++ 2M", "Uniform") == "Uniform"
    assert ran("DPM++ 2M Karras", "Automatic") == "Karras"
    assert ran("k_dpmpp_2m", "exponential") == "Exponential"
    older = facade.http.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "sampler_index": "k_lms"},
        auth=basic(facade.key("bob")),
    )
    assert older.status_code == 200 and '"sampler_name": "LMS"' in older.json()["info"]


def test_batches_answer_every_image_with_its_seed(facade: Facade) -> None:
    result = facade.api(facade.key("alice")).txt2img(**SMALL, seed=7, batch_size=2, n_iter=2)
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [7, 8, 9, 10]
    assert len(result.info["infotexts"]) == 4


def test_send_images_false_answers_no_images(facade: Facade) -> None:
    result = facade.api(facade.key("alice")).txt2img(**SMALL, send_images=False)
    assert result.images == [] and result.info["seed"] >= 0


def test_hires_fix_makes_the_larger_image(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))
    result = api.txt2img(
        **SMALL,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        denoising_strength=0.5,
        hr_second_pass_steps=3,
    )
    assert result.image.size == (128, 128)
    assert result.info["denoising_strength"] == 0.5
    infotext = result.info["infotexts"][0]
    assert "Hires upscale: 2, Hires upscaler: Latent, Hires steps: 3" in infotext


# -- img2img and inpainting -------------------------------------------------------------------


def test_img2img_starts_from_the_init_image(facade: Facade) -> None:
    key = facade.key("alice")
    result = facade.api(key).img2img(images=[picture()], **SMALL, denoising_strength=0.6)
    assert result.image.size == (64, 64)
    assert result.parameters["init_images"] is None  # as A1111: not echoed unless asked
    [task] = facade.tasks_of(key)
    assert task.params["denoising_strength"] == 0.6 and task.params["inpaint"] is None


def test_inpainting_keeps_what_the_mask_does_not_cover(facade: Facade) -> None:
    key = facade.key("alice")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # regenerate the left half
    init = picture()
    result = facade.api(key).img2img(
        images=[init],
        mask_image=mask,
        inpainting_fill=1,
        inpaint_full_res=False,
        mask_blur=0,
        **SMALL,
    )
    out = result.image.convert("RGB")
    assert out.crop((32, 0, 64, 64)).tobytes() == init.crop((32, 0, 64, 64)).tobytes()
    assert out.getpixel((5, 5)) != init.getpixel((5, 5))
    [task] = facade.tasks_of(key)
    assert task.params["inpaint"]["inpaint_area"] == 0 and task.params["inpaint"]["mask_blur"] == 0


def test_only_masked_inpainting_carries_its_padding_and_inverted_masks(facade: Facade) -> None:
    key = facade.key("alice")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    facade.api(key).img2img(
        images=[picture()],
        mask_image=mask,
        inpainting_fill=1,
        inpaint_full_res=True,
        inpaint_full_res_padding=8,
        inpainting_mask_invert=1,
        mask_blur=2,
        **SMALL,
    )
    [task] = facade.tasks_of(key)
    inpaint = task.params["inpaint"]
    assert (inpaint["inpaint_area"], inpaint["padding"], inpaint["mask_mode"]) == (1, 8, 1)
    assert inpaint["mask_blur"] == 2


def test_inpainting_fill_is_fill_or_original_and_latent_modes_are_refused_by_name(
    facade: Facade,
) -> None:
    key = facade.key("alice")
    api = facade.api(key)
    mask = Image.new("L", (64, 64), 255)
    api.img2img(images=[picture()], mask_image=mask, **SMALL)  # webuiapi's default: 0, fill
    [task] = facade.tasks_of(key)
    assert task.params["inpaint"]["fill"] == 0
    with pytest.raises(RuntimeError) as refused:
        api.img2img(images=[picture()], mask_image=mask, inpainting_fill=2, **SMALL)
    status, text = refused.value.args
    assert status == 400 and "Invalid inpainting_fill" in text and "latent noise" in text


# -- ControlNet -------------------------------------------------------------------------------


def test_a_controlnet_unit_conditions_the_generation(facade: Facade) -> None:
    key = facade.key("alice")
    api = facade.api(key)
    [canny_title] = [t for t in api.controlnet_model_list() if "canny" in t]
    unit = webuiapi.ControlNetUnit(
        image=picture(), module="canny", model=canny_title, threshold_a=50, threshold_b=150
    )
    result = api.txt2img(**SMALL, controlnet_units=[unit], alwayson_scripts=fresh())
    assert result.image.size == (64, 64)
    [task] = facade.tasks_of(key)
    control = task.params["control_net"]
    canny = facade.services.registry.resolve(ModelKind.CONTROLNET, "control_sd15_canny")
    assert (control["preprocess"], control["model"]["sha256"]) == ("canny", canny.sha256)
    assert (control["low_threshold"], control["high_threshold"]) == (50, 150)
    assert control["resize_mode"] == 2  # webuiapi's default "Resize and Fill"


def test_an_empty_controlnet_args_list_is_no_unit(facade: Facade) -> None:
    key = facade.key("alice")
    reply = facade.http.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "alwayson_scripts": {"ControlNet": {"args": []}}},
        auth=basic(key),
    )
    assert reply.status_code == 200
    assert facade.tasks_of(key)[0].params["control_net"] is None


def test_an_img2img_unit_without_image_uses_the_init_image(facade: Facade) -> None:
    key = facade.key("alice")
    unit = webuiapi.ControlNetUnit(module="openpose", model="None")
    facade.api(key).img2img(
        images=[picture()], **SMALL, controlnet_units=[unit], alwayson_scripts=fresh()
    )
    control = facade.tasks_of(key)[0].params["generation"]["control_net"]
    assert control["preprocess"] == "openpose"


def test_controlnet_extension_endpoints(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))
    assert api.controlnet_version() == 2
    titles = api.controlnet_model_list()
    assert sorted(t.split(" [")[0] for t in titles) == [
        "control_sd15_canny",
        "control_sd15_openpose",
    ]
    assert all(len(t.split(" [")[1].rstrip("]")) == 8 for t in titles)
    assert {"canny", "openpose"} <= set(api.controlnet_module_list())
    detected = api.controlnet_detect([picture((48, 32)), picture((16, 24))], module="canny")
    assert [image.size for image in detected.images] == [(48, 32), (16, 24)]
    assert detected.info == "Success"


# -- upscale, interrogate, png-info -----------------------------------------------------------


def test_extra_single_image_upscales(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))
    result = api.extra_single_image(picture((40, 30)), upscaler_1="Lanczos", upscaling_resize=2)
    assert result.image.size == (80, 60)
    assert "Lanczos" in result.info


def test_interrogate_answers_the_caption(facade: Facade) -> None:
    result = facade.api(facade.key("alice")).interrogate(picture((48, 32)))
    assert result.info == "clip caption of a 48x32 image"


def test_png_info_reads_the_parameters_back(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))
    made = api.txt2img(**SMALL, seed=99, negative_prompt="blur")
    info = api.png_info(made.image)
    assert info.info == made.info["infotexts"][0]
    parameters = info.parameters
    assert (parameters["Prompt"], parameters["Negative prompt"]) == ("a fox", "blur")
    assert (parameters["Seed"], parameters["Steps"]) == ("99", "2")
    assert (parameters["Size-1"], parameters["Size-2"]) == ("64", "64")


# -- models and options -----------------------------------------------------------------------


def test_models_are_listed_as_a1111_lists_them(facade: Facade) -> None:
    api = facade.api(facade.key("alice"))
    alpha = facade.checkpoint("alpha")
    listed = {m["model_name"]: m for m in api.get_sd_models()}
    assert listed["alpha"] == {
        "title": f"alpha.safetensors [{alpha.sha256[:10]}]",
        "model_name": "alpha",
        "hash": alpha.sha256[:10],
        "sha256": alpha.sha256,
        "filename": "alpha.safetensors",
        "config": None,
        "family": "sd15",
    }
    assert [lora["name"] for lora in api.get_loras()] == ["detail"]
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert set(samplers) >= {"Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 3M SDE", "UniPC", "DDIM"}
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}  # A1111's default
    assert samplers["DPM++ 2M"]["aliases"] == ["k_dpmpp_2m"]
    assert samplers["Euler"]["options"] == {}
    assert [s["label"] for s in api.get_schedulers()] == [
        "Automatic",
        "Uniform",
        "Karras",
        "Exponential",
        "SGM Uniform",
    ]
    assert {u["name"] for u in api.get_upscalers()} >= {"Lanczos", "Nearest"}
    assert "Latent" in {m["name"] for m in api.get_latent_upscale_modes()}
    embeddings = api.get_embeddings()
    assert list(embeddings["loaded"]) == ["goodhands"] and embeddings["skipped"] == {}
    assert [(v["model_name"], len(v["sha256"])) for v in api.get_sd_vae()] == [
        ("clear.safetensors", 64)
    ]
    assert api.get_hypernetworks() == api.get_face_restorers() == api.get_prompt_styles() == []
    assert api.get_scripts() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    assert api.refresh_checkpoints() is None


@BOTH_DATABASES
def test_each_key_has_its_own_checkpoint(facade: Facade) -> None:
    alpha, beta = facade.checkpoint("alpha"), facade.checkpoint("beta")
    first, second = facade.api(facade.key("alice")), facade.api(facade.key("alice"))
    first.util_set_model("alpha.safetensors")
    second.set_options({"sd_model_checkpoint": f"beta.safetensors [{beta.sha256[:10]}]"})
    assert first.util_get_current_model() == f"alpha.safetensors [{alpha.sha256[:10]}]"
    assert second.get_options()["sd_checkpoint_hash"] == beta.sha256
    assert first.txt2img(**SMALL).info["sd_model_hash"] == alpha.sha256[:10]
    assert second.txt2img(**SMALL).info["sd_model_hash"] == beta.sha256[:10]
    # override_settings wins for one request, and changes nothing for the next.
    once = first.txt2img(**SMALL, override_settings={"sd_model_checkpoint": "beta"})
    assert once.info["sd_model_hash"] == beta.sha256[:10]
    assert first.txt2img(**SMALL).info["sd_model_hash"] == alpha.sha256[:10]
    # ... unless the client asks to keep it (as A1111 keeps it loaded), for this key only.
    first.txt2img(
        **SMALL,
        override_settings={"sd_model_checkpoint": "beta"},
        override_settings_restore_afterwards=False,
    )
    assert first.get_options()["sd_checkpoint_hash"] == beta.sha256
    assert first.txt2img(**SMALL).info["sd_model_hash"] == beta.sha256[:10]


def test_an_unknown_checkpoint_is_refused_in_a1111_shape(facade: Facade) -> None:
    key = facade.key("alice")
    reply = facade.http.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"}, auth=basic(key)
    )
    assert reply.status_code == 400
    body = reply.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert body["detail"].startswith("Invalid sd_model_checkpoint:")
    clip_skip = facade.http.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 13}},
        auth=basic(key),
    )
    assert clip_skip.status_code == 400
    assert "CLIP_stop_at_last_layers" in clip_skip.json()["detail"]
    assert "between 1 and 12" in clip_skip.json()["detail"]
    for endless in ("NaN", "Infinity"):  # json.loads takes them: a 400, not a 500
        body = (
            json.dumps(SMALL)[:-1]
            + f', "override_settings": {{"CLIP_stop_at_last_layers": {endless}}}}}'
        )
        reply = facade.http.post(
            "/sdapi/v1/txt2img",
            content=body,
            headers={"content-type": "application/json"},
            auth=basic(key),
        )
        assert reply.status_code == 400, reply.text
        assert "CLIP_stop_at_last_layers" in reply.json()["detail"]


# -- progress and interrupt -------------------------------------------------------------------


def test_progress_while_a_task_runs_then_interrupt(facade: Facade) -> None:
    key = facade.key("alice")
    api, watcher = facade.api(key), facade.api(key)
    outcome: dict[str, Any] = {}

    def generate() -> None:
        try:
            outcome["result"] = api.txt2img(**{**SMALL, "steps": SLOW_STEPS})
        except RuntimeError as exc:
            outcome["error"] = exc.args

    thread = threading.Thread(target=generate)
    thread.start()
    seen = poll(lambda: watcher.get_progress(), lambda p: p["current_image"] and p["progress"] > 0)
    assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == SLOW_STEPS
    assert seen["eta_relative"] >= 0 and seen["state"]["sampling_step"] >= 1
    assert Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).format == "PNG"
    other = facade.api(facade.key("bob")).get_progress()  # nobody sees another's task
    assert (other["progress"], other["state"]["job_count"]) == (0, 0)
    assert watcher.interrupt() == {}
    thread.join(30)
    status, text = outcome["error"]
    assert status == 409 and "cancelled" in text
    [task] = facade.tasks_of(key)
    assert task.status.name == "CANCELLED"
    idle = watcher.get_progress()
    assert (idle["progress"], idle["state"]["job_count"]) == (0, 0)


def poll(read: Any, done: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = read()
        if done(value):
            return value
        time.sleep(0.02)
    raise AssertionError(f"never reached: last {value}")


# -- auth and errors --------------------------------------------------------------------------


def test_a_missing_key_answers_401_with_a_basic_challenge(facade: Facade) -> None:
    reply = facade.http.get("/sdapi/v1/sd-models")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"].startswith("Basic")
    assert set(reply.json()) == {"error", "detail", "body", "errors"}
    wrong = facade.http.get("/sdapi/v1/sd-models", auth=basic("sk-not-a-key"))
    assert wrong.status_code == 401
    key = facade.key("alice")
    for auth in ({"auth": basic(key)}, {"headers": {"Authorization": f"Bearer {key}"}}):
        assert facade.http.get("/sdapi/v1/sd-models", **auth).status_code == 200  # type: ignore[arg-type]
    with pytest.raises(RuntimeError) as refused:
        facade.api().txt2img(**SMALL)
    assert refused.value.args[0] == 401


def test_errors_take_a1111s_shape_and_name_the_field(facade: Facade) -> None:
    key = facade.key("alice")
    with pytest.raises(RuntimeError) as refused:
        facade.api(key).txt2img(**SMALL, sampler_name="DPM++ 2M Magic")
    status, text = refused.value.args
    assert status == 400 and "Invalid sampler_name: must be one of" in text
    bad = facade.http.post("/sdapi/v1/txt2img", json={**SMALL, "width": 500}, auth=basic(key))
    assert bad.status_code == 422
    assert (
        bad.json()["detail"]
        == "Invalid width: must be a multiple of 8 between 64 and 2048, got 500"
    )
    scheduler = facade.http.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "sampler_name": "Euler a", "scheduler": "Karras"},
        auth=basic(key),
    )
    assert scheduler.status_code == 400
    assert scheduler.json()["detail"] == (
        "Invalid scheduler: DAN runs Euler a with Automatic or SGM Uniform; got Karras"
    )
    unknown = facade.http.get("/sdapi/v1/no-such-endpoint", auth=basic(key))
    assert unknown.status_code == 404 and "error" in unknown.json()
    huge = {**SMALL, "prompt": "x" * MAX_BODY_BYTES}
    too_large = facade.http.post("/sdapi/v1/txt2img", json=huge, auth=basic(key))
    assert too_large.status_code == 413 and "larger than" in too_large.json()["detail"]
