"""What a txt2img request may share a UNet batch with (dan.tasks.needs.batch_key)."""

from __future__ import annotations

from dataclasses import replace

from dan.domain import (
    ControlNetSpec,
    GenerationRequest,
    HiresFix,
    LoraSpec,
    ModelRef,
    UpscalerChoice,
)
from dan.tasks.needs import batch_key

BASE = GenerationRequest(
    "a fox", "blurry", 1, "Euler a", 20, 7.0, 512, 512, ModelRef("a" * 64, "m")
)


def test_prompts_seeds_and_cfg_may_differ() -> None:
    other = replace(BASE, prompt="a cat", negative_prompt="", seed=99, cfg_scale=4.5)
    assert batch_key(BASE) is not None and batch_key(other) == batch_key(BASE)


def test_everything_the_unet_batch_shares_must_match() -> None:
    lora = LoraSpec(ModelRef("b" * 64, "l"), 0.8)
    for change in (
        {"model": ModelRef("c" * 64, "n")},
        {"width": 640},
        {"steps": 21},
        {"sampler_name": "Euler"},
        {"scheduler": "Karras"},
        {"loras": (lora,)},
        {"vae": ModelRef("d" * 64, "v")},
        {"embeddings": (ModelRef("e" * 64, "e"),)},
        {"clip_skip": 2},
        {"batch_size": 2},
        {"cfg_scale": 1.0},  # no CFG at all: no negative half
    ):
        assert batch_key(replace(BASE, **change)) != batch_key(BASE), change  # type: ignore[arg-type]


def test_hires_controlnet_and_several_iterations_do_not_batch() -> None:
    hires = HiresFix(2.0, 0.5, UpscalerChoice("Latent"), 0)
    control = ControlNetSpec("k", "canny", ModelRef("f" * 64, "c"))
    assert batch_key(replace(BASE, hires=hires)) is None
    assert batch_key(replace(BASE, control_net=control)) is None
    assert batch_key(replace(BASE, n_iter=2)) is None
