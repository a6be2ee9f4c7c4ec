"""The six A1111 samplers as fresh diffusers schedulers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    SchedulerMixin,
)

from dan.domain import SAMPLERS
from dan.engine.samplers import make_scheduler

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

EXPECTED: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ SDE Karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True}),
    "DPM++ SDE": (DPMSolverSDEScheduler, {"use_karras_sigmas": False}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "LMS": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "DDIM": (
        DDIMScheduler,
        {
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample": False,
        },
    ),
}


def make(name: str, seed: int = 1234) -> SchedulerMixin:
    return make_scheduler(name, SD15_SCHEDULER_CONFIG, seed=seed)


def test_every_domain_sampler_is_covered() -> None:
    assert set(EXPECTED) == set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_builds_the_expected_scheduler(name: str) -> None:
    scheduler_class, flags = EXPECTED[name]
    scheduler = make(name)
    assert type(scheduler) is scheduler_class
    config = scheduler.config
    for key, value in flags.items():
        assert config[key] == value, key
    if name != "DDIM":
        assert config["timestep_spacing"] == "linspace"
    # The checkpoint's noise schedule is kept.
    assert config["beta_start"] == 0.00085
    assert config["beta_end"] == 0.012
    assert config["beta_schedule"] == "scaled_linear"
    assert config["prediction_type"] == "epsilon"


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_call_returns_a_new_instance(name: str) -> None:
    assert make(name) is not make(name)


@pytest.mark.parametrize("name", ["Euler a", "Euler", "LMS", "DDIM"])
def test_first_order_samplers_run_one_timestep_per_step(name: str) -> None:
    scheduler = make(name)
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == 20


@pytest.mark.parametrize("name", ["DPM++ SDE Karras", "DPM++ SDE"])
def test_dpmpp_sde_evaluates_the_model_twice_per_step_but_the_last(name: str) -> None:
    # As in A1111's k-diffusion sample_dpmpp_sde: the final step to sigma 0 is a single eval.
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


def test_unknown_sampler_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'PLMS'"):
        make_scheduler("PLMS", SD15_SCHEDULER_CONFIG, seed=1)


def run_steps(scheduler: SchedulerMixin, steps: int = 6) -> torch.Tensor:
    """Denoise a fixed latent with a fake model output (no UNet); the final latent."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    fake_noise = torch.randn(1, 4, 8, 8, generator=generator)
    scheduler.set_timesteps(steps)
    sample = latent * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(fake_noise + 0.1 * model_input, t, sample).prev_sample
    return sample


@pytest.mark.parametrize("name", ["DPM++ SDE Karras", "DPM++ SDE"])
def test_dpmpp_sde_is_reproducible_from_the_seed(name: str) -> None:
    first = run_steps(make(name, seed=42))
    again = run_steps(make(name, seed=42))
    other = run_steps(make(name, seed=43))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
