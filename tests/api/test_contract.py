"""The HTTP contract of the reference: envelopes, status numbers, error codes, validation."""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import pytest
from PIL import Image

from dan.db import create_db_engine
from dan.domain import TaskResult
from dan.engine.fake import FakeEngine
from dan.imaging import read_parameters
from dan.tasks.store import SqlTaskStore
from tests.api.conftest import Api

TXT2IMG = "/api/sd/txt2img"


def small(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, **fields}


def wait_status(
    api: Api, task_id: str, statuses: set[int], timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = api.post("/api/sd/task/status", {"taskId": task_id})["data"]
        if data["status"] in statuses:
            return data  # type: ignore[no-any-return]
        time.sleep(0.01)
    raise AssertionError(f"task {task_id} never reached {statuses}: {data}")


def test_async_answers_at_once_with_queue_positions(api: Api) -> None:
    first = api.post(f"{TXT2IMG}/async", small())
    second = api.post(f"{TXT2IMG}/async", small())
    assert first["_http"] == 200 and first["code"] == 200 and first["message"] == "success"
    assert {k: first["data"][k] for k in ("status", "queuePosition")} == {
        "status": 0,
        "queuePosition": 1,
    }
    assert second["data"]["queuePosition"] == 2
    status = api.post("/api/sd/task/status", {"taskId": second["data"]["taskId"]})
    assert status["data"] == {
        "taskId": second["data"]["taskId"],
        "status": 0,
        "queuePosition": 2,
        "progress": 0.0,
    }


@pytest.mark.usefixtures("worker")
def test_sync_txt2img_returns_png_with_parameters(api: Api) -> None:
    reply = api.post(TXT2IMG, small(seed=1234, negative_prompt="dog", cfg_scale=6.5))
    assert reply["_http"] == 200 and reply["code"] == 200
    assert reply["data"]["seeds"] == [1234]
    png = base64.b64decode(reply["data"]["images"][0])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    parameters = read_parameters(png) or ""
    assert parameters.startswith(
        "a cat\nNegative prompt: dog\n"
        "Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 1234, "
        "Size: 64x64"
    )
    assert f"Model hash: {api.checkpoint_sha256[:10]}, Model: dummy" in parameters


@pytest.mark.usefixtures("worker")
def test_status_of_a_finished_task_carries_images_and_seeds(api: Api) -> None:
    task_id = api.post(f"{TXT2IMG}/async", small(seed=7))["data"]["taskId"]
    data = wait_status(api, task_id, {2})
    assert data["queuePosition"] == 0 and data["progress"] == 1.0
    assert data["seeds"] == [7] and len(data["images"]) == 1


@pytest.mark.usefixtures("worker")
def test_random_seed_is_reported_and_reproduces(api: Api) -> None:
    first = api.post(TXT2IMG, small(seed=-1))["data"]
    again = api.post(TXT2IMG, small(seed=first["seeds"][0]))["data"]
    assert 0 <= first["seeds"][0] < 2**32
    assert again["images"] == first["images"]


@pytest.mark.usefixtures("worker")
def test_engine_failure_fails_only_that_task(api: Api) -> None:
    failed = api.post(TXT2IMG, small(prompt=FakeEngine.FAIL_PROMPT))
    assert (failed["_http"], failed["code"]) == (500, 4001)
    assert "told to fail" in failed["message"] and failed["data"]["taskId"]
    status = api.post("/api/sd/task/status", {"taskId": failed["data"]["taskId"]})["data"]
    assert status["status"] == 3 and "told to fail" in status["message"]
    assert api.post(TXT2IMG, small())["_http"] == 200


def test_sync_timeout_keeps_the_task(api: Api) -> None:
    api.services.settings.sync_timeout_s = 0.2
    reply = api.post(TXT2IMG, small())
    assert (reply["_http"], reply["code"]) == (504, 2000)
    task_id = reply["data"]["taskId"]
    assert api.post("/api/sd/task/status", {"taskId": task_id})["data"]["status"] == 0


def test_cancel_pending_task(api: Api) -> None:
    task_id = api.post(f"{TXT2IMG}/async", small())["data"]["taskId"]
    reply = api.post("/api/sd/task/cancel", {"taskId": task_id})
    assert reply["_http"] == 200 and reply["data"]["status"] == 3
    status = api.post("/api/sd/task/status", {"taskId": task_id})["data"]
    assert status["status"] == 3 and "cancel" in status["message"]


@pytest.mark.usefixtures("worker")
def test_cancel_running_task_stops_within_a_step(api: Api, fake_engine: FakeEngine) -> None:
    fake_engine.step_s = 0.05
    task_id = api.post(f"{TXT2IMG}/async", small(steps=150))["data"]["taskId"]
    running = wait_status(api, task_id, {1})
    assert running["queuePosition"] == 0
    api.post("/api/sd/task/cancel", {"taskId": task_id})
    done = wait_status(api, task_id, {3}, timeout=2.0)
    assert "cancel" in done["message"] and done["progress"] < 0.5


def test_unknown_task_is_404(api: Api) -> None:
    for path in ("/api/sd/task/status", "/api/sd/task/cancel"):
        reply = api.post(path, {"taskId": "nope"})
        assert (reply["_http"], reply["code"]) == (404, 3000)


def test_pending_limit_answers_3002_with_429(api: Api) -> None:
    for _ in range(api.services.settings.max_pending_per_account):
        assert api.post(f"{TXT2IMG}/async", small())["_http"] == 200
    reply = api.post(f"{TXT2IMG}/async", small())
    assert (reply["_http"], reply["code"]) == (429, 3002)
    other = api.post(f"{TXT2IMG}/async", small(), headers={"Authorization": "Bearer sk-other"})
    assert other["_http"] == 200


def test_keys_with_and_without_bearer_share_an_account(api: Api) -> None:
    key = api.client.get("/api/user/public-api-key").json()["data"]["apiKey"]
    assert key.startswith("sk-") and len(key) == 51
    api.post(f"{TXT2IMG}/async", small(), headers={"Authorization": f"Bearer {key}"})
    second = api.post(f"{TXT2IMG}/async", small(), headers={"Authorization": key})
    assert second["data"]["queuePosition"] == 2
    other = api.post(f"{TXT2IMG}/async", small(), headers={"Authorization": "sk-someone-else"})
    assert other["data"]["queuePosition"] == 2  # interleaved with the first account's lane


BAD_BODIES = [
    ({"steps": 0}, "Invalid steps: must be an integer between 1 and 150, got 0"),
    ({"steps": 20.5}, "Invalid steps"),
    ({"steps": "abc"}, "Invalid steps"),
    ({"steps": True}, "Invalid steps"),
    ({"width": 500}, "Invalid width: must be a multiple of 8 between 64 and 2048, got 500"),
    ({"height": 4096}, "Invalid height"),
    ({"cfg_scale": 31}, "Invalid cfg_scale: must be a number between 1 and 30"),
    ({"cfg_scale": "NaN"}, "Invalid cfg_scale"),
    ({"seed": -2}, "Invalid seed: must be -1 or an integer between 0 and 4294967295"),
    ({"sampler_name": "PLMS"}, "Invalid sampler_name: must be one of DPM++ SDE Karras, Euler a"),
    ({"sampler_name": 3}, "Invalid sampler_name: must be one of"),
    (
        {"scheduler": "Beta"},
        "Invalid scheduler: must be one of Automatic, Karras, Exponential, SGM Uniform",
    ),
    (
        {"sampler_name": "Euler a", "scheduler": "Karras"},
        "Invalid scheduler: DAN runs Euler a with Automatic or SGM Uniform; got Karras",
    ),
    ({"sampler_name": "DDIM", "scheduler": "SGM Uniform"}, "Invalid scheduler: DAN runs DDIM"),
    (
        {"sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"},
        "Invalid scheduler: sampler_name 'DPM++ 2M Karras' already says Karras",
    ),
    ({"sampler_name": "LCM", "steps": 51}, "Invalid steps: LCM runs at most 50 steps, got 51"),
    ({"prompt": 5}, "Invalid prompt: must be a string"),
    ({"model": "0123456789abcdef"}, "Invalid model"),
    ({"model": 12}, "Invalid model"),
    ({"loras": [["abc", 0.5]]}, "Invalid loras: entry 0: no lora matches 'abc'"),
    ({"loras": [[]]}, "Invalid loras: entry 0 must be a [hash, weight] pair"),
    ({"loras": [["0123456789", "abc"]]}, "Invalid loras: entry 0: the weight must be a number"),
    ({"loras": "abc"}, "Invalid loras: must be a list of [hash, weight] pairs"),
    ({"prompt": "a <lora:missing:0.5>"}, "Invalid prompt: <lora:missing>: no lora matches"),
    ({"prompt": "a <lora:x:abc>"}, "Invalid prompt: the weight in <lora:x:abc> must be a number"),
    ({"upscale": {"scale": 3}}, "Invalid upscale.scale: must be a number between 1 and 2"),
    ({"upscale": {"scale": 1}}, "Invalid upscale.scale: must be above 1 and at most 2"),
    ({"upscale": {"upscaler": "Foo"}}, "Invalid upscale.upscaler: 'Foo' is not available"),
    ({"upscale": {"denoising_strength": 2}}, "Invalid upscale.denoising_strength"),
    ({"upscale": "x"}, "Invalid upscale"),
    ({"control_net": [{"image": "x"}]}, "Invalid control_net.0.preprocess: is required"),
    ({"control_net": "x"}, "Invalid control_net: Input should be a valid list"),
    ({"prompt": "x" * 9000}, "Invalid prompt: at most 8000 characters"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_BODIES)
def test_bad_input_is_a_400_naming_the_field(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    for path in (TXT2IMG, f"{TXT2IMG}/async"):
        reply = api.post(path, small(**fields))
        assert (reply["_http"], reply["code"]) == (400, 3000), reply
        assert reply["message"].startswith(message), reply["message"]


def test_body_that_is_not_a_json_object(api: Api) -> None:
    for content in (b"{not json", b"[1, 2]", b'"text"'):
        response = api.client.post(
            TXT2IMG, content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["code"] == 3000
        assert "JSON" in response.json()["message"]


def test_huge_body_is_refused_before_parsing(api: Api) -> None:
    limit = api.services.settings.max_body_bytes
    response = api.client.post(
        TXT2IMG, content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["code"] == 3000


def test_unknown_fields_and_defaults(api: Api) -> None:
    reply = api.post(f"{TXT2IMG}/async", {"prompt": "a", "some_future_field": 1, "loras": []})
    assert reply["_http"] == 200
    record = api.services.tasks.get(reply["data"]["taskId"])
    params = record.params
    assert (params["steps"], params["cfg_scale"], params["width"], params["height"]) == (
        20,
        7.0,
        512,
        512,
    )
    assert (
        params["sampler_name"] == "Euler a" and params["model"]["sha256"] == api.checkpoint_sha256
    )


def test_model_by_full_hash_short_hash_and_name(api: Api) -> None:
    for ref in (api.checkpoint_sha256, api.checkpoint_sha256[:10].upper(), "dummy"):
        reply = api.post(f"{TXT2IMG}/async", small(model=ref))
        assert reply["_http"] == 200, reply


def test_supported_model_info_lists_what_is_installed(api: Api) -> None:
    data = api.client.get("/api/sd/supportedModelInfo").json()["data"]
    assert data["Models"] == [{"name": "dummy", "hash": api.checkpoint_sha256, "family": "sd15"}]
    assert data["LoRAs"] == []
    reference = ["DPM++ SDE Karras", "Euler a", "Euler", "DPM++ SDE", "LMS", "DDIM"]
    assert data["Samplers"][:6] == reference  # the reference's list, then DAN's others
    assert set(data["Samplers"][6:]) == {
        *("DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE", "Heun", "DPM2", "DPM2 a"),
        *("UniPC", "LCM", "DDPM"),
    }
    assert data["Schedulers"] == ["Automatic", "Karras", "Exponential", "SGM Uniform"]
    schedules = data["SamplerSchedulers"]
    assert schedules["DPM++ 2M"] == data["Schedulers"]
    assert schedules["Euler a"] == ["Automatic", "SGM Uniform"]
    assert schedules["DDIM"] == ["Automatic"]


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({}, ("Euler a", "Automatic")),
        ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, ("DPM++ 2M", "Karras")),
        ({"sampler_name": "dpm++ sde karras"}, ("DPM++ SDE", "Karras")),  # the reference's
        ({"sampler_name": "DPM2 a", "scheduler": "SGM Uniform"}, ("DPM2 a", "SGM Uniform")),
    ],
)
def test_the_task_keeps_the_sampler_and_its_schedule_type(
    api: Api, fields: dict[str, Any], stored: tuple[str, str]
) -> None:
    reply = api.post(f"{TXT2IMG}/async", small(**fields))
    params = api.services.tasks.get(reply["data"]["taskId"]).params
    assert (params["sampler_name"], params["scheduler"]) == stored
    [task] = api.client.get("/api/sd/tasks?limit=1").json()["data"]["tasks"]
    assert (task["sampler"], task["scheduler"]) == stored


@pytest.mark.usefixtures("worker")
def test_statistics_count_generated_images(api: Api) -> None:
    api.post(TXT2IMG, small())
    data = api.client.get("/api/sd/statistics").json()["data"]
    assert data == {"totalCount": 1, "countInLast24Hours": 1, "countInLastWeek": 1}


def test_health_and_docs(api: Api) -> None:
    assert api.client.get("/health").json()["data"]["status"] == "ok"
    assert api.client.get("/docs").status_code == 200
    assert "/api/sd/txt2img/async" in api.client.get("/openapi.json").json()["paths"]


@pytest.mark.usefixtures("worker")
def test_v0_format(api: Api) -> None:
    ok = api.post("/v0/txt2img", small())
    assert ok["_http"] == 200 and set(ok) == {"images", "_http"}
    bad = api.post("/v0/txt2img", small(steps=0))
    assert bad["_http"] == 400 and set(bad) == {"msg", "_http"} and "steps" in bad["msg"]
    failed = api.post("/v0/txt2img", small(prompt=FakeEngine.FAIL_PROMPT))
    assert failed["_http"] == 500 and "told to fail" in failed["msg"]


@pytest.mark.usefixtures("worker")
def test_expired_results_are_deleted(api: Api) -> None:
    task_id = api.post(TXT2IMG, small())["data"]["taskId"]
    api.services.tasks.sweep(time.time() + api.services.settings.result_ttl_s + 1)
    data = api.post("/api/sd/task/status", {"taskId": task_id})["data"]
    assert data["status"] == 2 and data["images"] == [] and "expired" in data["message"]
    assert task_id not in api.services.blobs.groups()


def test_the_pending_limit_is_checked_before_any_image_is_decoded(api: Api) -> None:
    for _ in range(api.services.settings.max_pending_per_account):
        assert api.post(f"{TXT2IMG}/async", small())["_http"] == 200
    # Decoding this would answer 400; an account at its limit is refused before it is read.
    body = small(init_image="not an image at all " * 1000)
    reply = api.post("/api/sd/img2img/async", body)
    assert (reply["_http"], reply["code"]) == (429, 3002)


def test_health_does_not_show_where_the_database_is(api: Api) -> None:
    unreachable = create_db_engine("postgresql+psycopg://secret-owner@127.0.0.1:9/hidden")
    api.services.store = SqlTaskStore(unreachable)
    try:
        reply = api.client.get("/health")
    finally:
        unreachable.dispose()
    body = reply.json()
    assert (reply.status_code, body["code"]) == (503, 2000)
    assert body["message"] == "the database is unreachable"
    assert not any(word in reply.text for word in ("secret-owner", "127.0.0.1", "hidden"))


def test_v0_names_a_result_without_images_instead_of_failing(api: Api) -> None:
    outcome: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: outcome.update(api.post("/v0/txt2img", small())))
    waiting.start()
    store = api.services.store
    deadline = time.monotonic() + 10
    while (task := store.claim("w", lease_s=30)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert task is not None
    assert store.complete(task.id, "w", TaskResult(caption="a caption, no image"))
    waiting.join(10)
    assert outcome["_http"] == 500 and "without images" in outcome["msg"]
