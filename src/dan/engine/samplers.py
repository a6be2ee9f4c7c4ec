"""AUTOMATIC1111 sampler names mapped onto fresh diffusers schedulers.

A scheduler is stateful (step index, noise sampler, sigmas), and pipelines built from one
another share theirs, so every request gets its own instance from :func:`make_scheduler`.

The checkpoint decides the noise schedule (betas, prediction type); the sampler name decides
everything else. So only the noise-schedule keys of the checkpoint's scheduler config are kept:
a checkpoint shipped with, say, Karras sigmas or another timestep spacing must not change what
"Euler" means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Imported from their modules: mypy reads the top-level names as diffusers' dummy objects.
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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
_K_DIFFUSION = {"timestep_spacing": "linspace", "use_karras_sigmas": False}

_SAMPLERS: Mapping[str, _Sampler] = MappingProxyType(
    {
        "DPM++ SDE Karras": _Sampler(
            DPMSolverSDEScheduler, {**_K_DIFFUSION, "use_karras_sigmas": True}, seeded=True
        ),
        "DPM++ SDE": _Sampler(DPMSolverSDEScheduler, _K_DIFFUSION, seeded=True),
        "Euler a": _Sampler(EulerAncestralDiscreteScheduler, {"timestep_spacing": "linspace"}),
        "Euler": _Sampler(EulerDiscreteScheduler, _K_DIFFUSION),
        "LMS": _Sampler(LMSDiscreteScheduler, _K_DIFFUSION),
        # A1111's DDIM runs timesteps range(0, 1000, 1000 // steps) + 1 (951 ... 1 for 20
        # steps), takes alphas_cumprod[0] as the last "previous" alpha, never clips the sample
        # and uses eta 0 (diffusers' default in the pipeline).
        "DDIM": _Sampler(
            DDIMScheduler,
            {
                "timestep_spacing": "leading",
                "steps_offset": 1,
                "set_alpha_to_one": False,
                "clip_sample": False,
                "thresholding": False,
            },
        ),
    }
)


def noise_schedule(base_config: Mapping[str, Any]) -> dict[str, Any]:
    """The noise-schedule entries of a checkpoint's scheduler config (missing ones left out)."""
    return {key: base_config[key] for key in NOISE_SCHEDULE_KEYS if key in base_config}


def make_scheduler(
    sampler_name: str, base_config: Mapping[str, Any], *, seed: int | Sequence[int]
) -> SchedulerMixin:
    """A new scheduler for the A1111 sampler ``sampler_name`` (one of ``dan.domain.SAMPLERS``).

    ``base_config`` is the checkpoint's scheduler config; only its noise schedule is used.
    ``seed`` seeds the Brownian noise of the DPM++ SDE samplers, which is what makes them
    reproducible; the other samplers draw their noise from the pipeline's generators. For a
    batch, ``seed`` is one seed per image (in batch order): each image then gets the Brownian
    noise of its own seed, the noise a batch of one with that seed gets (a one-seed list and the
    bare int give the same noise). Every call returns a distinct instance. Raises
    ``ValueError`` for an unknown name.
    """
    sampler = _SAMPLERS.get(sampler_name)
    if sampler is None:
        raise ValueError(f"unknown sampler {sampler_name!r}; expected one of {sorted(_SAMPLERS)}")
    config = {**noise_schedule(base_config), **sampler.options}
    if sampler.seeded:
        # diffusers' BatchedBrownianTree takes a list: one tree per batch item, seeded apart.
        config["noise_sampler_seed"] = seed if isinstance(seed, int) else list(seed)
    # The class itself rather than from_config: same result, and typed.
    return sampler.scheduler_class(**config)
