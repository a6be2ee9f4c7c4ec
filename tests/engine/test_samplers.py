"""A1111's samplers and schedule types as fresh diffusers schedulers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from dan.engine.generation.samplers import make_scheduler
from dan.samplers import AUTOMATIC, SAMPLER_INFO, SAMPLER_TABLE, SamplerRefused

# SD1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
LINSPACE = {"timestep_spacing": "linspace"}
SD_TIMESTEPS = {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False}

EXPECTED: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (
        DPMSolverMultistepScheduler,
        {**LINSPACE, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "DPM++ SDE": (DPMSolverSDEScheduler, LINSPACE),
    "DPM++ 2M SDE": (
        DPMSolverMultistepScheduler,
        {**LINSPACE, "algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "DPM++ 3M SDE": (
        DPMSolverMultistepScheduler,
        {**LINSPACE, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ),
    "Euler a": (EulerAncestralDiscreteScheduler, LINSPACE),
    "Euler": (EulerDiscreteScheduler, LINSPACE),
    "LMS": (LMSDiscreteScheduler, LINSPACE),
    "Heun": (HeunDiscreteScheduler, LINSPACE),
    "DPM2": (KDPM2DiscreteScheduler, LINSPACE),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, LINSPACE),
    "DDIM": (DDIMScheduler, {**SD_TIMESTEPS, "set_alpha_to_one": False}),
    "UniPC": (UniPCMultistepScheduler, {**LINSPACE, "solver_order": 3}),
    "LCM": (LCMScheduler, {**SD_TIMESTEPS, "original_inference_steps": 50}),
    "DDPM": (DDPMScheduler, SD_TIMESTEPS),
}
NAMES = [sampler.name for sampler in SAMPLER_TABLE]
# Every sampler with every schedule type it takes besides Automatic.
SCHEDULED = [(s.name, schedule) for s in SAMPLER_TABLE for schedule in s.schedulers[1:]]
# What each schedule type must set.
SCHEDULE_FLAGS: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def make(name: str, schedule: str = AUTOMATIC, seed: int = 1234) -> SchedulerMixin:
    return make_scheduler(name, SD15_SCHEDULER_CONFIG, seed=seed, schedule_type=schedule)


def test_every_sampler_dan_accepts_is_built() -> None:
    assert set(EXPECTED) == set(SAMPLER_INFO)


@pytest.mark.parametrize("name", NAMES)
def test_sampler_builds_the_expected_scheduler(name: str) -> None:
    scheduler_class, flags = EXPECTED[name]
    scheduler = make(name)
    assert type(scheduler) is scheduler_class
    config = scheduler.config
    for key, value in flags.items():
        assert config[key] == value, key
    # Automatic is the sampler's own schedule: no Karras, exponential or beta sigmas.
    assert not any(config.get(flag) for flag in SIGMA_FLAGS)
    # The checkpoint's noise schedule is kept.
    assert config["beta_start"] == 0.00085
    assert config["beta_end"] == 0.012
    assert config["beta_schedule"] == "scaled_linear"
    assert config["prediction_type"] == "epsilon"


@pytest.mark.parametrize(("name", "schedule"), SCHEDULED)
def test_a_schedule_type_sets_its_sigmas_and_changes_the_timesteps(
    name: str, schedule: str
) -> None:
    scheduler = make(name, schedule)
    assert type(scheduler) is EXPECTED[name][0]
    for key, value in SCHEDULE_FLAGS[schedule].items():
        assert scheduler.config[key] == value, key
    automatic = make(name)
    scheduler.set_timesteps(10)
    automatic.set_timesteps(10)
    assert len(scheduler.timesteps) == len(automatic.timesteps)
    assert not torch.equal(scheduler.timesteps.float(), automatic.timesteps.float())


@pytest.mark.parametrize(
    ("old", "name", "schedule"),
    [
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
    ],
)
def test_old_combined_names_are_the_sampler_on_their_schedule(
    old: str, name: str, schedule: str
) -> None:
    assert dict(make(old).config) == dict(make(name, schedule).config)
    # A request that repeats the schedule type is the same request.
    assert dict(make(old, schedule).config) == dict(make(name, schedule).config)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("Euler a", "Karras"),
        ("DDIM", "SGM Uniform"),
        ("LCM", "Karras"),
        ("DPM++ 2M Karras", "Exponential"),
    ],
)
def test_combinations_dan_cannot_run_are_refused(name: str, schedule: str) -> None:
    with pytest.raises(SamplerRefused, match="Invalid scheduler"):
        make(name, schedule)


def test_unknown_sampler_is_refused() -> None:
    with pytest.raises(SamplerRefused, match="Invalid sampler_name: must be one of"):
        make("PLMS")


@pytest.mark.parametrize("name", NAMES)
def test_every_call_returns_a_new_instance(name: str) -> None:
    assert make(name) is not make(name)


@pytest.mark.parametrize("name", [s.name for s in SAMPLER_TABLE if s.unet_calls == 1])
def test_first_order_samplers_run_one_timestep_per_step(name: str) -> None:
    scheduler = make(name)
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == 20


@pytest.mark.parametrize("name", [s.name for s in SAMPLER_TABLE if s.unet_calls == 2])
def test_second_order_samplers_evaluate_the_model_twice_per_step_but_the_last(name: str) -> None:
    # As A1111's k-diffusion samplers: the final step to sigma 0 is a single eval.
    scheduler = make(name)
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == 39


def test_ddim_uses_a1111_leading_timesteps_with_offset_1() -> None:
    scheduler = make("DDIM")
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))


def test_ddim_last_step_uses_the_first_training_alpha() -> None:
    # A1111 takes alphas_cumprod[0] as the "previous" alpha of its last step.
    scheduler = make("DDIM")
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


def test_checkpoint_scheduler_options_do_not_leak() -> None:
    noisy = {**SD15_SCHEDULER_CONFIG, "use_karras_sigmas": True, "timestep_spacing": "trailing"}
    scheduler = make_scheduler("Euler", noisy, seed=1)
    assert scheduler.config["use_karras_sigmas"] is False
    assert scheduler.config["timestep_spacing"] == "linspace"


def test_v_prediction_checkpoints_keep_their_prediction_type() -> None:
    config = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    assert make_scheduler("Euler a", config, seed=1).config["prediction_type"] == "v_prediction"


def run_steps(
    scheduler: SchedulerMixin, seeds: list[int] | None = None, steps: int = 6
) -> torch.Tensor:
    """Denoise a fixed latent with a fake model output (no UNet); the final latent. ``seeds``
    seed the generators a pipeline would pass to ``step`` (one per image)."""
    generator = torch.Generator().manual_seed(0)
    images = len(seeds) if seeds else 1
    latent = torch.randn(images, 4, 8, 8, generator=generator)
    fake_noise = torch.randn(images, 4, 8, 8, generator=generator)
    extra: dict[str, Any] = {}
    if seeds is not None:
        extra["generator"] = [torch.Generator().manual_seed(seed) for seed in seeds]
    scheduler.set_timesteps(steps)
    sample: torch.Tensor = latent * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(fake_noise + 0.1 * model_input, t, sample, **extra).prev_sample
    return sample


@pytest.mark.parametrize("schedule", ["Automatic", "Karras"])
def test_dpmpp_sde_is_reproducible_from_the_seed(schedule: str) -> None:
    first = run_steps(make("DPM++ SDE", schedule, seed=42))
    again = run_steps(make("DPM++ SDE", schedule, seed=42))
    other = run_steps(make("DPM++ SDE", schedule, seed=43))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 3M SDE", "DPM2 a", "DDPM", "LCM"])
def test_stochastic_samplers_draw_their_noise_from_the_generators(name: str) -> None:
    """The noise of every step comes from the pipeline's generators: the same seed gives the
    same result, another seed another (the engine passes one generator per image)."""
    first = run_steps(make(name), seeds=[42])
    assert torch.equal(first, run_steps(make(name), seeds=[42]))
    assert not torch.allclose(first, run_steps(make(name), seeds=[43]))
