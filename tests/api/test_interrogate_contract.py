"""Interrogate over HTTP: the reference's request and answer, v0's, and missing weights."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dan.domain import INTERROGATOR_PARTS, ModelKind
from tests.api.conftest import Api
from tests.api.test_images_contract import png

INTERROGATE = "/api/sd/interrogate"
CLIP_FILES = {
    "model_base_caption_capfilt_large": ".pth",
    "bert-base-uncased-vocab": ".txt",
    "ViT-L-14": ".pt",
}


def install(api: Api, files: dict[str, str]) -> dict[str, str]:
    """Random-byte files named as the catalog names them (the registry matches file stems;
    the fake engine never reads them); returns name -> sha256."""
    folder = Path(api.services.settings.models_dir) / "interrogators"
    folder.mkdir(parents=True, exist_ok=True)
    for name, suffix in files.items():
        (folder / f"{name}{suffix}").write_bytes(os.urandom(64))
    return {
        name: api.services.registry.resolve(ModelKind.INTERROGATOR, name).sha256 for name in files
    }


def wait_status(api: Api, task_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data: dict[str, object] = api.post("/api/sd/task/status", {"taskId": task_id})["data"]
        if data["status"] in (2, 3):
            return data
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} did not finish")


@pytest.mark.usefixtures("worker")
def test_sync_interrogate_returns_the_caption(api: Api) -> None:
    install(api, CLIP_FILES)
    reply = api.post(INTERROGATE, {"image": png((48, 32)), "model": "clip"})
    assert (reply["_http"], reply["code"], reply["message"]) == (200, 200, "success")
    assert set(reply["data"]) == {"taskId", "caption"}
    assert reply["data"]["caption"] == "clip caption of a 48x32 image"


@pytest.mark.usefixtures("worker")
def test_async_interrogate_then_status_carries_the_caption(api: Api) -> None:
    hashes = install(api, {"model-resnet_custom_v3": ".pt"})
    queued = api.post(f"{INTERROGATE}/async", {"image": png(), "model": "deepdanbooru"})
    assert queued["_http"] == 200 and queued["data"]["status"] == 0
    task_id = queued["data"]["taskId"]
    data = wait_status(api, task_id)
    assert data["status"] == 2 and data["caption"] == "deepdanbooru caption of a 64x64 image"
    assert "images" not in data
    # The task records which file it was run with.
    record = api.services.tasks.get(task_id)
    assert record.params["files"]["tagger"]["sha256"] == hashes["model-resnet_custom_v3"]


@pytest.mark.usefixtures("worker")
def test_v0_interrogate_answers_caption_or_detail(api: Api) -> None:
    install(api, CLIP_FILES)
    reply = api.post("/v0/interrogate", {"image": png(), "model": "clip"})
    assert reply == {"caption": "clip caption of a 64x64 image", "_http": 200}
    bad = api.post("/v0/interrogate", {"image": "not base64!", "model": "clip"})
    assert bad["_http"] == 400 and set(bad) == {"detail", "_http"}
    assert "image" in bad["detail"]


def test_the_model_defaults_to_clip_and_must_be_known(api: Api) -> None:
    missing = api.post(INTERROGATE, {"image": png()})
    assert missing["_http"] == 503 and "clip interrogator" in missing["message"]
    bad = api.post(INTERROGATE, {"image": png(), "model": "wd14"})
    assert (bad["_http"], bad["code"]) == (400, 3000)
    assert bad["message"] == "Invalid model: must be one of clip, deepdanbooru; got 'wd14'"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"image": "%%%", "model": "clip"}, "image"),
        ({"image": "aGVsbG8=", "model": "clip"}, "image"),  # base64 of "hello": not an image
        ({"image": 42, "model": "clip"}, "image"),
        ({"image": "", "model": ["clip"]}, "model"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(api: Api, body: dict[str, object], field: str) -> None:
    install(api, CLIP_FILES)
    reply = api.post(INTERROGATE, body)
    assert (reply["_http"], reply["code"]) == (400, 3000), reply
    assert reply["message"].startswith(f"Invalid {field}")


@pytest.mark.parametrize("model", list(INTERROGATOR_PARTS))
def test_missing_weights_are_refused_at_submit_naming_what_to_pull(api: Api, model: str) -> None:
    reply = api.post(INTERROGATE, {"image": png(), "model": model})
    assert (reply["_http"], reply["code"]) == (503, 2000)
    first = next(iter(INTERROGATOR_PARTS[model].values()))
    assert f"`dan models pull {first}`" in reply["message"]
    # Nothing was queued: the next task is first in line.
    queued = api.post("/api/sd/txt2img/async", {"prompt": "x", "width": 64, "height": 64})
    assert queued["data"]["queuePosition"] == 1
