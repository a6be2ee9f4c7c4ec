"""End to end: the real `dan serve` (uvicorn + its worker process + the diffusers engine) on a
tiny SD1.x checkpoint in the A1111 single-file layout, driven over HTTP."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dan.imaging import read_parameters
from dan.samplers import SAMPLERS
from tests.fixtures.server import Server, start_server, wait_for_status

pytestmark = pytest.mark.slow


def install_tiny_checkpoint(models_dir: Path, name: str = "tiny-sd15", seed: int = 0) -> Path:
    from tests.fixtures.tiny_sd import write_tiny_checkpoint

    folder = models_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return write_tiny_checkpoint(folder / f"{name}.safetensors", seed=seed)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("e2e")
    install_tiny_checkpoint(root / "models")
    (root / "models" / "checkpoints" / "broken.safetensors").write_bytes(b"not a checkpoint")
    server = start_server(root)
    yield server
    server.stop()


def txt2img(**fields: Any) -> dict[str, Any]:
    return {
        "prompt": "a red fox",
        "steps": 3,
        "width": 64,
        "height": 64,
        "model": "tiny-sd15",
        **fields,
    }


def decode(image: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image)))


def test_sync_txt2img_makes_a_real_image(server: Server) -> None:
    reply = server.post("/api/sd/txt2img", txt2img(seed=11, width=64, height=96)).json()
    assert reply["code"] == 200, reply
    image = decode(reply["data"]["images"][0])
    assert image.size == (64, 96) and image.mode == "RGB"
    assert len(set(image.getdata())) > 10  # a generated picture, not a flat fill
    parameters = read_parameters(base64.b64decode(reply["data"]["images"][0]))
    assert parameters is not None and "Seed: 11, Size: 64x96, Model hash: " in parameters


def test_same_seed_same_bytes_other_seed_other_image(server: Server) -> None:
    first = server.post("/api/sd/txt2img", txt2img(seed=5)).json()["data"]["images"][0]
    again = server.post("/api/sd/txt2img", txt2img(seed=5)).json()["data"]["images"][0]
    other = server.post("/api/sd/txt2img", txt2img(seed=6)).json()["data"]["images"][0]
    assert first == again
    assert first != other


def test_random_seed_is_returned_and_reproduces(server: Server) -> None:
    data = server.post("/api/sd/txt2img", txt2img(seed=-1)).json()["data"]
    again = server.post("/api/sd/txt2img", txt2img(seed=data["seeds"][0])).json()["data"]
    assert again["images"] == data["images"]


def test_every_sampler_runs(server: Server) -> None:
    ids = {
        name: server.post("/api/sd/txt2img/async", txt2img(sampler_name=name, seed=3)).json()[
            "data"
        ]["taskId"]
        for name in SAMPLERS
    }
    images = {}
    for name, task_id in ids.items():
        data = wait_for_status(server, task_id, {2, 3})
        assert data["status"] == 2, (name, data)
        images[name] = data["images"][0]  # type: ignore[index]
    assert len(set(images.values())) == len(SAMPLERS)  # each sampler really differs


def test_long_weighted_prompt(server: Server) -> None:
    prompt = ", ".join(f"(detail {i}:1.2)" for i in range(60)) + ", [blurry], \\(literal\\)"
    reply = server.post(
        "/api/sd/txt2img", txt2img(prompt=prompt, negative_prompt="((ugly))")
    ).json()
    assert reply["code"] == 200, reply


def test_async_status_progress_and_cancel(server: Server) -> None:
    task_id = server.post(
        "/api/sd/txt2img/async", txt2img(steps=150, width=256, height=256)
    ).json()["data"]["taskId"]
    running = wait_for_status(server, task_id, {1})
    deadline = time.monotonic() + 60
    while running["progress"] == 0 and time.monotonic() < deadline:  # type: ignore[operator]
        running = wait_for_status(server, task_id, {1, 2})
    assert 0 < running["progress"] < 1  # type: ignore[operator]
    server.post("/api/sd/task/cancel", {"taskId": task_id})
    done = wait_for_status(server, task_id, {2, 3}, timeout_s=30)
    assert done["status"] == 3 and "cancel" in done["message"]  # type: ignore[operator]
    assert done["progress"] < 0.9  # type: ignore[operator]


def test_a_broken_checkpoint_fails_its_task_and_the_worker_goes_on(server: Server) -> None:
    failed = server.post("/api/sd/txt2img", txt2img(model="broken")).json()
    assert failed["code"] == 4001 and "broken" not in failed.get("data", {}).get("taskId", "")
    assert failed["message"]
    assert server.post("/api/sd/txt2img", txt2img()).json()["code"] == 200


def test_unknown_model_is_refused_before_queueing(server: Server) -> None:
    reply = server.post("/api/sd/txt2img", txt2img(model="f" * 64))
    assert reply.status_code == 400 and "Invalid model" in reply.json()["message"]


def test_no_checkpoint_installed_serves_and_explains(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        reply = server.post("/api/sd/txt2img", txt2img(model=None))
        assert reply.status_code == 503
        assert "dan models pull" in reply.json()["message"]
    finally:
        server.stop()


def test_kill_9_mid_generation_loses_no_task(tmp_path: Path) -> None:
    install_tiny_checkpoint(tmp_path / "models")
    server = start_server(tmp_path)
    task_id = server.post(
        "/api/sd/txt2img/async", txt2img(steps=100, width=256, height=256, seed=9)
    ).json()["data"]["taskId"]
    queued = server.post("/api/sd/txt2img/async", txt2img(seed=10)).json()["data"]["taskId"]
    wait_for_status(server, task_id, {1})
    server.kill()
    restarted = start_server(tmp_path, port=int(server.url.rsplit(":", 1)[1]))
    try:
        for tid in (task_id, queued):
            done = wait_for_status(restarted, tid, {2, 3}, timeout_s=300)
            assert done["status"] == 2, done
    finally:
        restarted.stop()
