"""Batches below the API: the request, its seeds, what it needs, and what the runner stores."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from PIL.Image import Image

from dan.config import Settings
from dan.domain import (
    SEED_MAX,
    ClaimedTask,
    GenerationRequest,
    ModelKind,
    ModelRef,
    TaskKind,
)
from dan.engine.fake import FakeEngine
from dan.errors import EngineError
from dan.imaging import read_parameters
from dan.models.registry import ModelRegistry
from dan.storage import InMemoryBlobStore
from dan.tasks.needs import MIN_COST
from dan.tasks.orders import GenerationOrder, Txt2ImgOrder
from dan.tasks.requests import RequestBuilder
from dan.workers.runner import TaskRunner
from tests.api.conftest import install_dummy_checkpoint


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    install_dummy_checkpoint(tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    return registry


def order(**fields: object) -> Txt2ImgOrder:
    values: dict[str, object] = {
        "prompt": "a fox",
        "negative_prompt": "",
        "seed": 7,
        "sampler_name": "Euler a",
        "steps": 20,
        "cfg_scale": 7.0,
        "width": 512,
        "height": 512,
        "model": None,
    }
    values.update(fields)
    return Txt2ImgOrder(GenerationOrder(**values))  # type: ignore[arg-type]


def test_seeds_follow_a1111s_rule_across_batches() -> None:
    model = ModelRef("a" * 64, "a")
    request = GenerationRequest("", "", 100, "Euler a", 2, 7, 64, 64, model, batch_size=2, n_iter=3)
    assert request.images == 6 and request.seeds == (100, 101, 102, 103, 104, 105)
    assert [request.batch_seeds(k) for k in range(3)] == [(100, 101), (102, 103), (104, 105)]


def test_a_batch_costs_and_expects_every_image(registry: ModelRegistry, tmp_path: Path) -> None:
    build = RequestBuilder(registry, Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    one = build.txt2img(order(), "t1").needs
    many = build.txt2img(order(batch_size=4, n_iter=2), "t2")
    assert many.needs.cost == pytest.approx(8 * one.cost)
    assert many.needs.expects is not None and many.needs.expects.images == 8
    assert many.needs.images == 8 and one.images == 1
    params = many.params
    assert (params["seed"], params["batch_size"], params["n_iter"]) == (7, 4, 2)


def test_tiny_images_cost_the_floor_each(registry: ModelRegistry, tmp_path: Path) -> None:
    """The cost floor is per image, so even tiny tasks cost (and pay their node) per image."""
    build = RequestBuilder(registry, Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    tiny = {"width": 64, "height": 64, "steps": 2}
    one = build.txt2img(order(**tiny), "t1").needs
    four = build.txt2img(order(**tiny, n_iter=4), "t2").needs
    assert one.cost == pytest.approx(MIN_COST) and four.cost == pytest.approx(4 * MIN_COST)


def test_a_random_seed_leaves_room_for_every_images_seed(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)  # type: ignore[call-arg]
    build = RequestBuilder(registry, settings, random_seed=lambda: SEED_MAX)
    single = GenerationRequest.from_params(build.txt2img(order(seed=-1), "a").params)
    assert single.seed == SEED_MAX  # a single image may have any seed, as before
    batch = build.txt2img(order(seed=-1, batch_size=8, n_iter=2), "b").params
    last = GenerationRequest.from_params(batch).seeds[-1]
    assert last <= SEED_MAX


def test_the_runner_stores_each_image_with_its_seed_and_refuses_a_short_batch(
    registry: ModelRegistry,
) -> None:
    blobs = InMemoryBlobStore()
    checkpoint = registry.list(ModelKind.CHECKPOINT)[0]
    request = GenerationRequest(
        "a fox", "", 50, "Euler a", 2, 7.0, 64, 64, checkpoint.ref, batch_size=2, n_iter=2
    )
    task = ClaimedTask(str(uuid.uuid4()), TaskKind.TXT2IMG, request.to_params(), attempt=1)
    result = TaskRunner(FakeEngine(), registry, blobs).run(task, lambda done, total: None)
    assert result.seeds == (50, 51, 52, 53) and len(result.image_keys) == 4
    for i, key in enumerate(result.image_keys):
        text = read_parameters(blobs.get(key)) or ""
        assert f"Seed: {50 + i}, Size: 64x64" in text and f"Batch pos: {i % 2}," in text

    class Short(FakeEngine):
        def txt2img(self, *args: object, **kwargs: object) -> list[Image]:
            return super().txt2img(*args, **kwargs)[:1]  # type: ignore[arg-type]

    with pytest.raises(EngineError, match="made 1 images, not 4"):
        TaskRunner(Short(), registry, blobs).run(task, lambda done, total: None)


def test_a_txt2img_order_gets_the_batch_key_of_its_request(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """Orders that differ only in prompt, seed and CFG may share a UNet batch (batch_key)."""
    build = RequestBuilder(registry, Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    one = build.txt2img(order(), "t1").needs.batch_key
    other = build.txt2img(order(prompt="a cat", seed=9, cfg_scale=4.0), "t2").needs.batch_key
    assert one is not None and one == other
    assert build.txt2img(order(steps=21), "t3").needs.batch_key != one
    assert build.txt2img(order(n_iter=2), "t4").needs.batch_key is None
