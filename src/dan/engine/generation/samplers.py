"""AUTOMATIC1111 samplers and schedule types mapped onto fresh diffusers schedulers.

A scheduler is stateful (step index, noise sampler, sigmas), and pipelines built from one
another share theirs, so every request gets its own instance from :func:`make_scheduler`.

The checkpoint decides the noise schedule (betas, prediction type); the sampler name and the
schedule type decide everything else. So only the noise-schedule keys of the checkpoint's
scheduler config are kept: a checkpoint shipped with, say, Karras sigmas or another timestep
spacing must not change what "Euler" means.

Which sampler runs on which schedule types, and what the names mean, is ``dan.samplers``'s
(no torch there); this module only builds. The mapping follows diffusers' table of A1111's
samplers: Karras is ``use_karras_sigmas``, Exponential ``use_exponential_sigmas`` and SGM
Uniform ``timestep_spacing="trailing"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Imported from their modules: mypy reads the top-level names as diffusers' dummy objects.
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import (
    KDPM2AncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteScheduler
from diffusers.schedulers.scheduling_lcm import LCMScheduler
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dan.samplers import AUTOMATIC, EXPONENTIAL, KARRAS, SGM_UNIFORM, choose

# The checkpoint's training noise schedule: the only keys taken from its scheduler config.
NOISE_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


@dataclass(frozen=True)
class _Sampler:
    """How to build one A1111 sampler: a scheduler class, its options, whether it takes a seed."""

    scheduler_class: Callable[..., SchedulerMixin]
    options: Mapping[str, Any] = field(default_factory=dict)
    seeded: bool = False  # a Brownian-tree noise sampler that needs the request's seed


# A1111's k-diffusion samplers space their sigmas over the whole range ("linspace").
_K_DIFFUSION = {"timestep_spacing": "linspace"}
# DPM-Solver++ as k-diffusion's sample_dpmpp_2m/_2m_sde/_3m_sde: the last step is first order
# to sigma 0 (diffusers' defaults, written out so that they cannot drift).
_DPMPP = {**_K_DIFFUSION, "lower_order_final": True, "final_sigmas_type": "zero"}
# Timestep samplers as SD 1.x's own scheduler config sets them up: A1111's DDIM runs timesteps
# range(0, 1000, 1000 // steps) + 1 (951 ... 1 for 20 steps), takes alphas_cumprod[0] as the
# last "previous" alpha and never clips the sample.
_SD_TIMESTEPS = {
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}

_SAMPLERS: Mapping[str, _Sampler] = MappingProxyType(
    {
        "DPM++ 2M": _Sampler(DPMSolverMultistepScheduler, {**_DPMPP, "solver_order": 2}),
        "DPM++ SDE": _Sampler(DPMSolverSDEScheduler, _K_DIFFUSION, seeded=True),
        "DPM++ 2M SDE": _Sampler(
            DPMSolverMultistepScheduler,
            {**_DPMPP, "solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        ),
        "DPM++ 3M SDE": _Sampler(
            DPMSolverMultistepScheduler,
            {**_DPMPP, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
        ),
        "Euler a": _Sampler(EulerAncestralDiscreteScheduler, _K_DIFFUSION),
        "Euler": _Sampler(EulerDiscreteScheduler, _K_DIFFUSION),
        "LMS": _Sampler(LMSDiscreteScheduler, _K_DIFFUSION),
        "Heun": _Sampler(HeunDiscreteScheduler, _K_DIFFUSION),
        "DPM2": _Sampler(KDPM2DiscreteScheduler, _K_DIFFUSION),
        "DPM2 a": _Sampler(KDPM2AncestralDiscreteScheduler, _K_DIFFUSION),
        # eta 0 is diffusers' default in the pipeline, as A1111's.
        "DDIM": _Sampler(DDIMScheduler, {**_SD_TIMESTEPS, "thresholding": False}),
        # A1111's UniPC is order 3 with a lower order at the end; its variant bh1 gives NaN
        # in diffusers on the final step to sigma 0, so bh2 (diffusers' default).
        "UniPC": _Sampler(
            UniPCMultistepScheduler,
            {**_K_DIFFUSION, "solver_type": "bh2", "solver_order": 3, "lower_order_final": True},
        ),
        "LCM": _Sampler(LCMScheduler, {**_SD_TIMESTEPS, "original_inference_steps": 50}),
        "DDPM": _Sampler(
            DDPMScheduler,
            {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False},
        ),
    }
)
# What each schedule type sets (dan.samplers says which sampler accepts which).
_SCHEDULES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        AUTOMATIC: {},
        KARRAS: {"use_karras_sigmas": True},
        EXPONENTIAL: {"use_exponential_sigmas": True},
        SGM_UNIFORM: {"timestep_spacing": "trailing"},
    }
)


def noise_schedule(base_config: Mapping[str, Any]) -> dict[str, Any]:
    """The noise-schedule entries of a checkpoint's scheduler config (missing ones left out)."""
    return {key: base_config[key] for key in NOISE_SCHEDULE_KEYS if key in base_config}


def make_scheduler(
    sampler_name: str,
    base_config: Mapping[str, Any],
    *,
    seed: int | Sequence[int],
    schedule_type: str = AUTOMATIC,
) -> SchedulerMixin:
    """A new scheduler for the A1111 sampler ``sampler_name`` on ``schedule_type`` (a request's
    ``sampler_name`` and ``scheduler``; an old combined name such as "DPM++ SDE Karras" with
    Automatic is that sampler on its schedule).

    ``base_config`` is the checkpoint's scheduler config; only its noise schedule is used.
    ``seed`` seeds the Brownian noise of the DPM++ SDE sampler, which is what makes it
    reproducible; the other samplers draw their noise from the pipeline's generators. For a
    batch, ``seed`` is one seed per image (in batch order): each image then gets the Brownian
    noise of its own seed, the noise a batch of one with that seed gets (a one-seed list and the
    bare int give the same noise). Every call returns a distinct instance. Raises
    ``dan.samplers.SamplerRefused`` for a name or combination DAN does not run.
    """
    name, schedule = choose(sampler_name, schedule_type)
    sampler = _SAMPLERS[name]
    config = {**noise_schedule(base_config), **sampler.options, **_SCHEDULES[schedule]}
    if sampler.seeded:
        # diffusers' BatchedBrownianTree takes a list: one tree per batch item, seeded apart.
        config["noise_sampler_seed"] = seed if isinstance(seed, int) else list(seed)
    # The class itself rather than from_config: same result, and typed.
    return sampler.scheduler_class(**config)
