"""DiffusersEngine on a tiny checkpoint: what a worker relies on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from dan.config import Settings
from dan.domain import (
    GenerationRequest,
    InstalledModel,
    ModelKind,
    ModelRef,
    ProgressCallback,
)
from dan.engine.diffusers_engine import DiffusersEngine, _engine_errors
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.loading.device import pick_dtype
from dan.errors import EngineError, FatalEngineError, TaskCancelled, UnsupportedCheckpoint
from dan.samplers import SAMPLERS
from tests.fixtures.tiny_sd import CLIP, TinySd, write_checkpoint, write_tiny_checkpoint

pytestmark = pytest.mark.slow


def installed(path: Path, sha: str) -> InstalledModel:
    return InstalledModel(ModelKind.CHECKPOINT, path.stem, sha, path, path.stat().st_size)


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 1,
        "sampler_name": "Euler a",
        "steps": 3,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": ModelRef("a" * 64, "tiny"),
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


@pytest.fixture
def engine(tmp_path: Path) -> DiffusersEngine:
    settings = Settings(data_dir=tmp_path / "data", device="cpu", dtype="float32")  # type: ignore[call-arg]
    return DiffusersEngine(settings)


@pytest.fixture
def checkpoint(tiny_checkpoint: Path) -> InstalledModel:
    return installed(tiny_checkpoint, "a" * 64)


@pytest.fixture(scope="module")
def warm_engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    """One engine for the sampler tests: the checkpoint loads once, and every request after
    the first runs where others ran before (no sampler state may carry over)."""
    data = tmp_path_factory.mktemp("data")
    return DiffusersEngine(Settings(data_dir=data, device="cpu", dtype="float32"))  # type: ignore[call-arg]


def files(model: InstalledModel) -> dict[str, InstalledModel]:
    """What the worker passes: the request's model (any sha here) mapped to the file."""
    return {"a" * 64: model}


def no_progress(step: int, total: int) -> None:
    pass


def record_into(seen: list[tuple[int, int]]) -> ProgressCallback:
    return lambda step, total: seen.append((step, total))


def test_same_pixels_as_a_direct_diffusers_call(
    engine: DiffusersEngine, checkpoint: InstalledModel, engine_cache_dir: Path
) -> None:
    # Through DAN: A1111 prompt encoding (no weights here), own scheduler, CPU noise.
    [ours] = engine.txt2img(request(seed=42), files(checkpoint), no_progress)
    pipeline, _ = load_sd_pipeline(
        checkpoint.path,
        cache_dir=engine_cache_dir,
        dtype=torch.float32,
        device="cpu",
        allow_ckpt=False,
    )
    pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(
        pipeline.scheduler.config, timestep_spacing="linspace"
    )
    direct = pipeline(
        "a red fox",
        negative_prompt="",
        num_inference_steps=3,
        width=64,
        height=64,
        guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(42),
    ).images[0]
    difference = np.abs(np.asarray(ours, dtype=int) - np.asarray(direct, dtype=int))
    assert difference.max() <= 1  # identical but for float rounding at the last bit


def test_checkpoint_stays_loaded(engine: DiffusersEngine, checkpoint: InstalledModel) -> None:
    engine.txt2img(request(), files(checkpoint), no_progress)
    engine.txt2img(request(seed=2, sampler_name="DDIM"), files(checkpoint), no_progress)
    assert engine.pipelines.loads == 1


def test_least_recently_used_checkpoint_leaves_first(
    tmp_path: Path, checkpoint: InstalledModel
) -> None:
    # A budget smaller than one checkpoint: only the one in use stays loaded.
    settings = Settings(  # type: ignore[call-arg]
        data_dir=tmp_path / "data", device="cpu", dtype="float32", pipeline_cache_bytes=1
    )
    engine = DiffusersEngine(settings)
    other = installed(write_tiny_checkpoint(tmp_path / "other.safetensors", seed=1), "b" * 64)
    engine.txt2img(request(), files(checkpoint), no_progress)
    assert engine.pipelines.loaded() == ["a" * 64]
    engine.txt2img(request(), files(other), no_progress)
    assert engine.pipelines.loaded() == ["b" * 64]


def test_progress_reports_every_step(engine: DiffusersEngine, checkpoint: InstalledModel) -> None:
    for sampler, steps in (("Euler", 4), ("DPM++ SDE", 3)):
        seen: list[tuple[int, int]] = []
        engine.txt2img(
            request(sampler_name=sampler, steps=steps), files(checkpoint), record_into(seen)
        )
        totals = {total for _, total in seen}
        assert len(totals) == 1 and seen[-1][0] == seen[-1][1]  # ends at 100 %
        assert [s for s, _ in seen] == list(range(1, len(seen) + 1))


def test_cancel_stops_at_the_next_step(engine: DiffusersEngine, checkpoint: InstalledModel) -> None:
    steps_run = []

    def cancel_after_two(step: int, total: int) -> None:
        steps_run.append(step)
        if step == 2:
            raise TaskCancelled()

    with pytest.raises(TaskCancelled):
        engine.txt2img(request(steps=50), files(checkpoint), cancel_after_two)
    assert steps_run == [1, 2]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_is_deterministic_per_seed(
    warm_engine: DiffusersEngine, checkpoint: InstalledModel, sampler: str
) -> None:
    def generate(seed: int) -> bytes:
        one = request(sampler_name=sampler, seed=seed, width=96, height=64)
        [image] = warm_engine.txt2img(one, files(checkpoint), no_progress)
        assert image.size == (96, 64)
        return image.tobytes()

    first = generate(7)
    other = generate(8)  # in between: no sampler state may carry over to the next request
    assert generate(7) == first
    assert other != first


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [
        ("DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE", "Exponential"),
        ("Heun", "SGM Uniform"),
        ("Euler a", "SGM Uniform"),
    ],
)
def test_the_schedule_type_changes_the_image(
    warm_engine: DiffusersEngine, checkpoint: InstalledModel, sampler: str, schedule: str
) -> None:
    """The ``scheduler`` field is not ignored: the same seed on another schedule is another
    image, and the same schedule again the same one."""

    def generate(scheduler: str) -> bytes:
        one = request(sampler_name=sampler, scheduler=scheduler, seed=7)
        [image] = warm_engine.txt2img(one, files(checkpoint), no_progress)
        return image.tobytes()

    scheduled = generate(schedule)
    assert generate("Automatic") != scheduled
    assert generate(schedule) == scheduled


def test_an_old_combined_name_is_its_sampler_on_its_schedule(
    warm_engine: DiffusersEngine, checkpoint: InstalledModel
) -> None:
    """A task stored before the scheduler field ("DPM++ SDE Karras", Automatic) makes the image
    it made then: the one DPM++ SDE on Karras makes."""

    def generate(sampler: str, scheduler: str) -> bytes:
        one = request(sampler_name=sampler, scheduler=scheduler, seed=3)
        [image] = warm_engine.txt2img(one, files(checkpoint), no_progress)
        return image.tobytes()

    old = generate("DPM++ SDE Karras", "Automatic")
    assert old == generate("DPM++ SDE", "Karras")
    assert old != generate("DPM++ SDE", "Automatic")


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "DPM2 a"])
def test_second_order_samplers_report_every_unet_call_as_progress(
    warm_engine: DiffusersEngine, checkpoint: InstalledModel, sampler: str
) -> None:
    seen: list[tuple[int, int]] = []
    one = request(sampler_name=sampler, steps=3)
    warm_engine.txt2img(one, files(checkpoint), lambda done, total: seen.append((done, total)))
    # 3 steps of two UNet calls each, the last step to sigma 0 only one.
    assert seen == [(done, 5) for done in range(1, 6)]


def weighted_checkpoint(tiny_sd: TinySd, path: Path) -> InstalledModel:
    """The tiny checkpoint with a real bias in the text encoder's final LayerNorm. With the
    fresh one (bias 0) every token's hidden state averages 0, so the chunk mean that A1111's
    emphasis restores would be float noise; trained CLIP has a real bias."""
    bias = torch.Generator().manual_seed(0)
    key = CLIP + "final_layer_norm.bias"
    state = {**tiny_sd.state_dict}
    state[key] = torch.randn(state[key].shape, generator=bias) * 0.5 + 0.5
    return installed(write_checkpoint(state, path, fmt="safetensors"), "a" * 64)


def test_a1111_prompt_weights_change_the_image_and_weight_1_is_no_weight(
    engine: DiffusersEngine, tiny_sd: TinySd, tmp_path: Path
) -> None:
    model = weighted_checkpoint(tiny_sd, tmp_path / "weighted.safetensors")

    def generate(prompt: str, negative: str = "") -> np.ndarray:
        one = request(prompt=prompt, negative_prompt=negative, sampler_name="Euler")
        [image] = engine.txt2img(one, files(model), no_progress)
        return np.asarray(image, dtype=int)

    def change(image: np.ndarray, reference: np.ndarray) -> float:
        return float(np.abs(image - reference).mean())

    plain = generate("a red fox")
    assert np.array_equal(generate("a red (fox:1.0)"), plain)
    # More weight moves the image further from the unweighted one.
    assert 0 < change(generate("a red (fox:1.5)"), plain) < change(generate("a red (fox:2)"), plain)
    assert change(generate("a red fox", "(blurry:1.5)"), generate("a red fox", "blurry")) > 0


def test_unloadable_file_is_an_engine_error(engine: DiffusersEngine, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(100))
    with pytest.raises(UnsupportedCheckpoint):
        engine.txt2img(request(), files(installed(bad, "c" * 64)), no_progress)


def test_dtype_choice() -> None:
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)


def test_out_of_memory_fails_the_task_and_a_broken_gpu_the_worker() -> None:
    with pytest.raises(EngineError) as caught, _engine_errors("512x512"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not isinstance(caught.value, FatalEngineError) and "512x512" in caught.value.message
    with pytest.raises(FatalEngineError), _engine_errors("512x512"):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_step_previews_come_from_the_latents_and_change_nothing(
    engine: DiffusersEngine, checkpoint: InstalledModel
) -> None:
    files = {checkpoint.sha256: checkpoint}
    drawers: list[Any] = []
    plain = engine.txt2img(request(steps=4), files, lambda d, t: None)
    with_previews = engine.txt2img(
        request(steps=4), files, lambda d, t: None, preview=drawers.append
    )
    assert np.array_equal(np.asarray(plain[0]), np.asarray(with_previews[0]))
    assert len(drawers) == 4  # one offer per step; drawing is the sink's choice
    first, last = drawers[0](), drawers[-1]()
    assert first.size == last.size == (64 // 8, 64 // 8)  # the latents' resolution
    assert not np.array_equal(np.asarray(first), np.asarray(last))  # the picture changes
