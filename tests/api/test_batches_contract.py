"""Several images per request over HTTP: ``batch_size`` x ``n_iter`` images with the seeds
``seed + i``, validated up front, counted image by image against the pending limit."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from dan.imaging import read_parameters
from tests.api.conftest import Api
from tests.fixtures.network import Start

TXT2IMG = "/api/sd/txt2img"


def small(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, **fields}


def png(size: tuple[int, int] = (64, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def colour(image: str) -> tuple[int, ...]:
    with Image.open(io.BytesIO(base64.b64decode(image))) as opened:
        return tuple(opened.convert("RGB").getpixel((0, 0)))  # type: ignore[arg-type]


@pytest.mark.usefixtures("worker")
def test_a_batch_returns_every_image_with_its_seed_and_parameters(api: Api) -> None:
    reply = api.post(TXT2IMG, small(seed=100, batch_size=3, n_iter=2))
    assert reply["_http"] == 200, reply
    data = reply["data"]
    assert data["seeds"] == [100, 101, 102, 103, 104, 105] and len(data["images"]) == 6
    # Each image is the one a single request with its seed gives (its parameters differ).
    single = api.post(TXT2IMG, small(seed=104))["data"]
    assert colour(data["images"][4]) == colour(single["images"][0])
    assert len({colour(image) for image in data["images"]}) == 6
    texts = [read_parameters(base64.b64decode(image)) or "" for image in data["images"]]
    assert all(f"Seed: {100 + i}," in text for i, text in enumerate(texts))
    # A1111 marks an image's place in its batch (the batch of 3 repeats: 0 1 2 0 1 2).
    assert all(f"Batch size: 3, Batch pos: {i % 3}" in text for i, text in enumerate(texts))
    assert "Batch size" not in (read_parameters(base64.b64decode(single["images"][0])) or "")


@pytest.mark.usefixtures("worker")
def test_img2img_and_v0_return_every_image(api: Api) -> None:
    body = small(init_image=png(), seed=5, batch_size=2, n_iter=2)
    data = api.post("/api/sd/img2img", body)["data"]
    assert data["seeds"] == [5, 6, 7, 8] and len(data["images"]) == 4
    v0 = api.client.post("/v0/txt2img", json=small(batch_size=2)).json()
    assert len(v0["images"]) == 2


@pytest.mark.usefixtures("worker")
def test_a_random_seed_leaves_room_for_every_image_and_history_shows_the_batch(
    api: Api,
) -> None:
    data = api.post(TXT2IMG, small(seed=-1, batch_size=4, n_iter=4))["data"]
    first = data["seeds"][0]
    assert data["seeds"] == list(range(first, first + 16)) and data["seeds"][-1] < 2**32
    [entry] = api.client.get("/api/sd/tasks").json()["data"]["tasks"]
    assert (entry["seed"], entry["batchSize"], entry["nIter"]) == (first, 4, 4)


BAD_BATCHES = [
    ({"batch_size": 0}, "Invalid batch_size: must be an integer between 1 and 8, got 0"),
    ({"batch_size": 9}, "Invalid batch_size: must be an integer between 1 and 8, got 9"),
    ({"batch_size": 2.5}, "Invalid batch_size: must be an integer between 1 and 8"),
    ({"n_iter": 17}, "Invalid n_iter: must be an integer between 1 and 16, got 17"),
    (
        {"batch_size": 4, "n_iter": 5},
        "Invalid batch_size x n_iter: at most 16 images per request, got 4 x 5 = 20",
    ),
    (
        {"batch_size": 8, "width": 1024, "height": 1024},
        "Invalid batch_size: 8 images of 1024x1024 are 8388608 pixels in one batch, and a "
        "batch holds at most 4194304",
    ),
    (
        {"batch_size": 8, "width": 512, "height": 512, "upscale": {"scale": 2}},
        "Invalid batch_size: 8 images of 1024x1024 in hires fix's second pass are 8388608",
    ),
    (
        {"seed": 4294967290, "batch_size": 8},
        "Invalid seed: the 8 images would have the seeds 4294967290 to 4294967297, past the "
        "largest seed 4294967295; use a seed of at most 4294967288, or -1",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_BATCHES)
def test_bad_batches_are_a_400_naming_the_field_and_range(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    img2img = () if "upscale" in fields else ("/api/sd/img2img/async",)  # hires is txt2img's
    for path in (TXT2IMG, f"{TXT2IMG}/async", *img2img):
        reply = api.post(path, small(init_image=png(), **fields))
        assert (reply["_http"], reply["code"]) == (400, 3000), reply
        assert reply["message"].startswith(message), reply["message"]


def test_the_largest_batch_of_the_smallest_size_and_one_image_of_the_largest_are_fine(
    api: Api,
) -> None:
    for fields in ({"batch_size": 8, "n_iter": 2}, {"width": 2048, "height": 2048}):
        reply = api.post(f"{TXT2IMG}/async", small(**fields))
        assert reply["_http"] == 200, reply
        api.post("/api/sd/task/cancel", {"taskId": reply["data"]["taskId"]})


def test_the_pending_limit_counts_images(start: Start) -> None:
    net = start(max_pending_per_account=4)
    user = net.key("user")
    net.submit(user, batch_size=4)  # fills the limit on its own
    refused = net.call("POST", f"{TXT2IMG}/async", user, json=small())
    assert (refused["_http"], refused["code"]) == (429, 3002)
    assert refused["message"].startswith(
        "this account already has 4 images pending (the limit is 4 pending images per account)"
    )
    other = net.key("other")
    net.submit(other, batch_size=2, n_iter=1)
    over = net.call("POST", f"{TXT2IMG}/async", other, json=small(batch_size=3))
    assert over["_http"] == 429 and "has 2 images pending and this task makes 3" in over["message"]
    too_big = net.call("POST", f"{TXT2IMG}/async", net.key("third"), json=small(batch_size=5))
    assert too_big["_http"] == 400
    assert too_big["message"].startswith(
        "Invalid batch_size x n_iter: this task makes 5 images, more than the 4 an account may "
        "have pending"
    )
    assert net.services.store.pending_count(net.services.accounts.find(nickname="user").id) == 4
