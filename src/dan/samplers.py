"""AUTOMATIC1111's samplers and schedule types, as DAN accepts them (no torch here).

A request names a sampler (``sampler_name``) and a schedule type (``scheduler``, as A1111 1.9+
has it). Before 1.9, A1111 wrote both in one name ("DPM++ 2M Karras"); such a name still works
and means that sampler on that schedule. :func:`choose` turns what a client sent into DAN's
pair, or refuses it naming the field and what is valid; ``dan.engine.generation.samplers`` maps
the pair onto a diffusers scheduler.

DAN's ``Automatic`` is the sampler's own schedule: the uniform one of A1111's k-diffusion
samplers (A1111's "Uniform"), the native timesteps of DDIM, UniPC, LCM and DDPM. That is what
the reference's names meant ("DPM++ SDE" is not "DPM++ SDE Karras"). A1111 1.9+ reads
``Automatic`` as the sampler's *default* schedule, which for some samplers is Karras or
Exponential (``a1111_default``); the /sdapi/v1 facade translates, and what DAN writes for
A1111 (:func:`a1111_schedule`) names the schedule A1111 must run to make the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

from dan.errors import InvalidArgument

AUTOMATIC, KARRAS, EXPONENTIAL, SGM_UNIFORM = "Automatic", "Karras", "Exponential", "SGM Uniform"
SCHEDULERS: tuple[str, ...] = (AUTOMATIC, KARRAS, EXPONENTIAL, SGM_UNIFORM)
UNIFORM = "Uniform"  # A1111's label for DAN's Automatic where A1111's Automatic is another
_EVERY = SCHEDULERS

# A1111's internal names (and alias) of the schedule types, besides their labels.
_SCHEDULE_NAMES = {
    "automatic": AUTOMATIC,
    "karras": KARRAS,
    "exponential": EXPONENTIAL,
    "sgm_uniform": SGM_UNIFORM,
    "sgmuniform": SGM_UNIFORM,
    **{label.casefold(): label for label in SCHEDULERS},
}


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler as DAN runs it."""

    name: str
    schedulers: tuple[str, ...]  # the schedule types it runs with, Automatic first
    a1111_default: str = AUTOMATIC  # what A1111 1.9+ runs for "Automatic"
    unet_calls: int = 1  # UNet evaluations per step (second-order samplers: 2)
    max_steps: int | None = None
    aliases: tuple[str, ...] = ()  # A1111's other names (k-diffusion's function names)


# In A1111 1.9+'s order; DDPM (not in A1111, but in Forge and ComfyUI) last.
SAMPLER_TABLE: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", _EVERY, KARRAS, aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", _EVERY, KARRAS, unet_calls=2, aliases=("k_dpmpp_sde",)),
    Sampler("DPM++ 2M SDE", _EVERY, EXPONENTIAL, aliases=("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 3M SDE", _EVERY, EXPONENTIAL, aliases=("k_dpmpp_3m_sde",)),
    # diffusers' Euler a has no Karras or exponential sigmas.
    Sampler("Euler a", (AUTOMATIC, SGM_UNIFORM), aliases=("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", _EVERY, aliases=("k_euler",)),
    Sampler("LMS", _EVERY, aliases=("k_lms",)),
    Sampler("Heun", _EVERY, unet_calls=2, aliases=("k_heun",)),
    Sampler("DPM2", _EVERY, KARRAS, unet_calls=2, aliases=("k_dpm_2",)),
    Sampler("DPM2 a", _EVERY, KARRAS, unet_calls=2, aliases=("k_dpm_2_a",)),
    # A1111 runs these on their own timesteps whatever the schedule type says.
    Sampler("DDIM", (AUTOMATIC,), aliases=("ddim",)),
    Sampler("UniPC", (AUTOMATIC,), aliases=("unipc",)),
    # diffusers' LCM picks its steps among the 50 of its distillation.
    Sampler("LCM", (AUTOMATIC,), max_steps=50, aliases=("k_lcm",)),
    Sampler("DDPM", (AUTOMATIC,)),
)
SAMPLER_INFO = {sampler.name: sampler for sampler in SAMPLER_TABLE}

# The reference's six names, in its order ("DPM++ SDE Karras" is A1111's old combined name).
REFERENCE_SAMPLERS: tuple[str, ...] = (
    "DPM++ SDE Karras",
    "Euler a",
    "Euler",
    "DPM++ SDE",
    "LMS",
    "DDIM",
)
# What DAN's API lists: the reference's names first, then the others DAN runs.
SAMPLERS: tuple[str, ...] = REFERENCE_SAMPLERS + tuple(
    s.name for s in SAMPLER_TABLE if s.name not in REFERENCE_SAMPLERS
)

_BY_NAME = {
    key.casefold(): sampler.name
    for sampler in SAMPLER_TABLE
    for key in (sampler.name, *sampler.aliases)
}
# Before 1.9, A1111 listed a sampler on a schedule as a sampler of its own, with an alias of its
# own; old clients still send these. Not listed (A1111 1.9+ lists neither them nor the names).
_SCHEDULED_ALIASES = {
    "k_lms_ka": "LMS Karras",
    "k_dpm_2_ka": "DPM2 Karras",
    "k_dpm_2_a_ka": "DPM2 a Karras",
    "k_dpmpp_2m_ka": "DPM++ 2M Karras",
    "k_dpmpp_sde_ka": "DPM++ SDE Karras",
    "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras",
    "k_dpmpp_2m_sde_exp": "DPM++ 2M SDE Exponential",
    "k_dpmpp_3m_sde_ka": "DPM++ 3M SDE Karras",
    "k_dpmpp_3m_sde_exp": "DPM++ 3M SDE Exponential",
}


class SamplerRefused(InvalidArgument):
    """A sampler or schedule type DAN cannot run; ``field`` names the request's field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"Invalid {field}: {reason}")
        self.field = field
        self.reason = reason


def choose(
    sampler_name: object, scheduler: object = None, *, field: str = "sampler_name"
) -> tuple[str, str]:
    """DAN's (sampler, schedule type) for a request's ``sampler_name`` and ``scheduler``.

    Names are matched case-insensitively, with A1111's aliases (``k_dpmpp_2m``); an old
    combined name ("DPM++ 2M Karras") or its alias (``k_dpmpp_2m_ka``) carries its schedule
    type, which ``scheduler`` may repeat or leave Automatic. ``scheduler`` None or empty is
    Automatic. Raises SamplerRefused naming ``field`` (the sampler's field) or ``scheduler``.
    """
    name, named_schedule = _split(sampler_name, field)
    schedule = schedule_type(scheduler)
    if named_schedule != AUTOMATIC and schedule not in (AUTOMATIC, named_schedule):
        raise SamplerRefused(
            "scheduler",
            f"{field} {str(sampler_name).strip()!r} already says {named_schedule}; send "
            f"{named_schedule} or Automatic, or {field} {name!r} with scheduler {schedule}",
        )
    schedule = named_schedule if schedule == AUTOMATIC else schedule
    accepted = SAMPLER_INFO[name].schedulers
    if schedule not in accepted:
        refused = field if schedule == named_schedule else "scheduler"
        raise SamplerRefused(refused, f"DAN runs {name} with {_either(accepted)}; got {schedule}")
    return name, schedule


def schedule_type(scheduler: object) -> str:
    """The schedule type ``scheduler`` names (a label or A1111's name, any case); None and
    "" are Automatic. Raises SamplerRefused for any other value."""
    if scheduler is None or (isinstance(scheduler, str) and not scheduler.strip()):
        return AUTOMATIC
    label = (
        _SCHEDULE_NAMES.get(scheduler.strip().casefold()) if isinstance(scheduler, str) else None
    )
    if label is None:
        raise SamplerRefused(
            "scheduler", f"must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}"
        )
    return label


def a1111_schedule(sampler: str, schedule: str) -> str:
    """The label A1111 1.9+ must be given (and writes) to run ``sampler`` on DAN's
    ``schedule``: DAN's Automatic is A1111's "Uniform" where A1111's Automatic means Karras or
    Exponential."""
    if schedule == AUTOMATIC and SAMPLER_INFO[sampler].a1111_default != AUTOMATIC:
        return UNIFORM
    return schedule


def check_steps(sampler: str, steps: int, field: str = "steps") -> None:
    """Refuse more steps than ``sampler`` (DAN's name) can run, naming ``field``."""
    limit = SAMPLER_INFO[sampler].max_steps
    if limit is not None and steps > limit:
        raise SamplerRefused(field, f"{sampler} runs at most {limit} steps, got {steps}")


def _split(sampler_name: object, field: str) -> tuple[str, str]:
    """(sampler, schedule type in its name, else Automatic) of a name; SamplerRefused
    naming ``field`` for a name DAN does not know."""
    key = sampler_name.strip().casefold() if isinstance(sampler_name, str) else ""
    key = _SCHEDULED_ALIASES.get(key, key).casefold()
    if key in _BY_NAME:
        return _BY_NAME[key], AUTOMATIC
    for suffix, label in _SCHEDULE_NAMES.items():
        base = key.removesuffix(" " + suffix)
        if label != AUTOMATIC and base != key and base in _BY_NAME:
            return _BY_NAME[base], label
    raise SamplerRefused(
        field,
        f"must be one of {', '.join(SAMPLERS)} (or one of A1111's aliases of these, as "
        f"k_euler_a, or a sampler with its schedule type, as 'DPM++ 2M Karras'); got "
        f"{sampler_name!r}",
    )


def _either(names: tuple[str, ...]) -> str:
    """The names joined for a message: A only, A or B, A, B or C."""
    if len(names) == 1:
        return f"{names[0]} only"
    return f"{', '.join(names[:-1])} or {names[-1]}"
