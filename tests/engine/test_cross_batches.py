"""Batching across requests (DiffusersEngine.txt2img_batch): several requests of one batch key
with different prompts, seeds and CFG scales run as one UNet batch, and each image is the one
its request gets alone, within the rounding of batched arithmetic (TOLERANCE of
test_batches, float32 on the CPU); a cancelled request leaves without changing the others."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dan.config import Settings
from dan.domain import GenerationRequest, ModelFiles, ProgressCallback
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.batching import CfgScales
from dan.errors import TaskCancelled
from dan.tasks.needs import batch_key
from tests.engine.test_batches import TOLERANCE, engine, files, no_progress, pixels, request

pytestmark = pytest.mark.slow
__all__ = ["engine", "files"]  # the fixtures test_batches defines

LONG = ", ".join(["a very detailed red fox in the snow"] * 12)  # more than one 75-token chunk


def three() -> list[GenerationRequest]:
    """Different prompts (one weighted, one long enough for two chunks), seeds and CFGs."""
    return [
        request(prompt="a red fox", seed=11, cfg_scale=7.0),
        request(prompt="a (blue:1.3) bird", negative_prompt="blurry", seed=22, cfg_scale=3.5),
        request(prompt=LONG, seed=33, cfg_scale=11.0),
        request(prompt="a green frog", seed=44, cfg_scale=5.0),
    ]


def assert_alone(
    engine: DiffusersEngine, files: ModelFiles, one: GenerationRequest, images: list[Image.Image]
) -> None:
    alone = engine.txt2img(one, files, no_progress)
    assert len(images) == len(alone) == one.batch_size
    for image, expected in zip(images, alone, strict=True):
        assert np.abs(pixels(image) - pixels(expected)).max() <= TOLERANCE


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a", "DPM++ SDE Karras", "DPM++ 2M SDE"])
def test_each_image_of_a_cross_request_batch_is_its_requests_alone(
    engine: DiffusersEngine, files: ModelFiles, sampler: str
) -> None:
    requests = [replace(one, sampler_name=sampler) for one in three()]
    assert len({batch_key(one) for one in requests}) == 1
    made = engine.txt2img_batch(requests, files, [no_progress] * 4, [None] * 4)
    for one, images in zip(requests, made, strict=True):
        assert images is not None
        assert_alone(engine, files, one, images)
    firsts = [pixels(images[0]) for images in made if images is not None]
    assert all(np.abs(a - b).mean() > 1 for a, b in itertools.pairwise(firsts))


def test_requests_of_several_images_each_keep_their_seeds(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    requests = [replace(one, batch_size=2) for one in three()[:2]]
    made = engine.txt2img_batch(requests, files, [no_progress] * 2, [None] * 2)
    for one, images in zip(requests, made, strict=True):
        assert images is not None
        assert_alone(engine, files, one, images)


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    requests = [replace(one, steps=3, sampler_name="Euler a") for one in three()]
    seen: dict[int, list[int]] = {i: [] for i in range(4)}

    def progress(i: int) -> ProgressCallback:
        def report(done: int, total: int) -> None:
            seen[i].append(done)
            if i == 1 and done == 1:
                raise TaskCancelled("cancelled")

        return report

    made = engine.txt2img_batch(requests, files, [progress(i) for i in range(4)], [None] * 4)
    assert made[1] is None and seen[1] == [1]  # never asked again once it left
    assert seen[0] == seen[2] == seen[3] == [1, 2, 3]
    for i in (0, 2, 3):
        images = made[i]
        assert images is not None
        assert_alone(engine, files, requests[i], images)


def test_a_batch_whose_every_request_left_raises_cancelled(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    def cancel(done: int, total: int) -> None:
        raise TaskCancelled("cancelled")

    with pytest.raises(TaskCancelled):
        engine.txt2img_batch(three()[:2], files, [cancel, cancel], [None, None])


def test_each_request_gets_previews_of_its_own_image(
    engine: DiffusersEngine, files: ModelFiles
) -> None:
    drawn: dict[int, list[Image.Image]] = {0: [], 1: []}

    def sink(i: int):  # type: ignore[no-untyped-def]
        return lambda draw: drawn[i].append(draw())

    engine.txt2img_batch(three()[:2], files, [no_progress] * 2, [sink(0), sink(1)])
    assert len(drawn[0]) == len(drawn[1]) == 2  # one per step
    assert np.abs(pixels(drawn[0][-1]) - pixels(drawn[1][-1])).mean() > 0


def test_cfg_scales_are_the_largest_as_a_number_and_per_row_on_a_tensor() -> None:
    """In the order diffusers' pipelines write it (``guidance_scale * (text - uncond)``)."""
    scales = CfgScales([7.0, 1.5, 11.0])
    assert float(scales) == 11.0 and scales > 1 and scales - 1 == 10.0
    rows = torch.ones(3, 4, 2, 2)
    assert (scales * rows)[:, 0, 0, 0].tolist() == [7.0, 1.5, 11.0]
    assert scales * 2 == 22.0
    # A scale a low-precision tensor cannot hold (7.3 in bf16 is 7.3125) scales as the Python
    # float of a single request does: the batched image is the image of the seed alone.
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(CfgScales([7.3, 7.3]) * noise, 7.3 * noise)


def test_the_batch_limit_is_the_setting_or_the_devices_and_shrinks_for_large_images(
    engine: DiffusersEngine, tmp_path: Path
) -> None:
    assert engine.batch_limit(request(width=512, height=512)) == 2  # the CPU's default
    four = DiffusersEngine(Settings(data_dir=tmp_path, device="cpu", batch_max=4))  # type: ignore[call-arg]
    assert four.batch_limit(request(width=256, height=256)) == 4  # never more than the setting
    assert four.batch_limit(request(width=512, height=768)) == 2
    assert four.batch_limit(request(width=1024, height=1024)) == 1
