"""Samplers and schedule types below the engine: the names DAN accepts, how old combined names
split, what is refused, what a task stores, costs and writes into its PNG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dan.config import Settings
from dan.domain import GenerationRequest, ModelRef
from dan.errors import InvalidArgument
from dan.imaging import infotext
from dan.models.registry import ModelRegistry
from dan.samplers import (
    REFERENCE_SAMPLERS,
    SAMPLER_TABLE,
    SAMPLERS,
    SCHEDULERS,
    SamplerRefused,
    a1111_schedule,
    check_steps,
    choose,
)
from dan.tasks.orders import GenerationOrder, HiresOrder, Txt2ImgOrder
from dan.tasks.requests import RequestBuilder
from tests.api.conftest import install_dummy_checkpoint

MODEL = ModelRef("a" * 64, "tiny")


@pytest.mark.parametrize(
    ("name", "scheduler", "chosen"),
    [
        ("Euler a", None, ("Euler a", "Automatic")),
        ("euler A", "automatic", ("Euler a", "Automatic")),
        ("k_dpmpp_2m", "karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "Exponential", ("DPM++ 2M", "Exponential")),
        ("DPM++ 2M SDE", "sgm_uniform", ("DPM++ 2M SDE", "SGM Uniform")),
        ("DPM++ 3M SDE", "SGMUniform", ("DPM++ 3M SDE", "SGM Uniform")),
        # Old combined names: the schedule type is in the name.
        ("DPM++ SDE Karras", None, ("DPM++ SDE", "Karras")),
        ("DPM++ SDE Karras", "Karras", ("DPM++ SDE", "Karras")),
        ("DPM++ 2M Karras", "", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
        ("DPM2 a Karras", "Automatic", ("DPM2 a", "Karras")),
        # ... and A1111's aliases of them.
        ("k_dpmpp_2m_ka", None, ("DPM++ 2M", "Karras")),
        ("k_dpmpp_3m_sde_exp", "Exponential", ("DPM++ 3M SDE", "Exponential")),
        ("Heun", None, ("Heun", "Automatic")),
        ("LCM", None, ("LCM", "Automatic")),
    ],
)
def test_names_become_a_sampler_and_a_schedule_type(
    name: str, scheduler: str | None, chosen: tuple[str, str]
) -> None:
    assert choose(name, scheduler) == chosen


@pytest.mark.parametrize(
    ("name", "scheduler", "field", "says"),
    [
        ("PLMS", None, "sampler_name", "must be one of DPM++ SDE Karras, Euler a"),
        (None, None, "sampler_name", "must be one of"),
        ("Euler", "Beta", "scheduler", "must be one of Automatic, Karras, Exponential, SGM"),
        ("Euler a", "Karras", "scheduler", "DAN runs Euler a with Automatic or SGM Uniform"),
        ("DDIM", "Karras", "scheduler", "DAN runs DDIM with Automatic only; got Karras"),
        ("UniPC", "Exponential", "scheduler", "DAN runs UniPC with Automatic only"),
        ("Euler a Karras", None, "sampler_name", "DAN runs Euler a with Automatic or SGM"),
        ("DPM++ 2M Karras", "Exponential", "scheduler", "already says Karras"),
        ("k_lms_ka", "SGM Uniform", "scheduler", "'k_lms_ka' already says Karras"),
        ("k_dpmpp_2s_a", None, "sampler_name", "aliases of these, as k_euler_a"),
    ],
)
def test_what_dan_cannot_run_is_refused_naming_the_field(
    name: str | None, scheduler: str | None, field: str, says: str
) -> None:
    with pytest.raises(SamplerRefused, match=f"^Invalid {field}: .*{re.escape(says)}") as caught:
        choose(name, scheduler)
    assert caught.value.field == field and isinstance(caught.value, InvalidArgument)


def test_the_reference_list_comes_first_then_every_other_sampler() -> None:
    assert SAMPLERS[:6] == REFERENCE_SAMPLERS
    assert set(SAMPLERS[6:]) == {s.name for s in SAMPLER_TABLE} - set(REFERENCE_SAMPLERS)
    assert SCHEDULERS == ("Automatic", "Karras", "Exponential", "SGM Uniform")
    # Every listed name is accepted, and every sampler runs on its own schedule.
    assert all(choose(name) for name in SAMPLERS)
    assert all(s.schedulers[0] == "Automatic" for s in SAMPLER_TABLE)


@pytest.mark.parametrize(
    ("sampler", "schedule", "a1111"),
    [
        ("DPM++ 2M", "Karras", "Karras"),
        ("DPM++ 2M", "Automatic", "Uniform"),  # A1111's Automatic would be Karras
        ("DPM++ 2M SDE", "Automatic", "Uniform"),  # ... or Exponential
        ("Euler", "Automatic", "Automatic"),  # the same in A1111
        ("DDIM", "Automatic", "Automatic"),
        ("Euler a", "SGM Uniform", "SGM Uniform"),
    ],
)
def test_a1111_is_told_the_schedule_that_makes_the_same_image(
    sampler: str, schedule: str, a1111: str
) -> None:
    assert a1111_schedule(sampler, schedule) == a1111


def test_lcm_runs_at_most_50_steps() -> None:
    check_steps("LCM", 50)
    check_steps("Euler", 150)
    with pytest.raises(SamplerRefused, match=r"Invalid steps: LCM runs at most 50 steps, got 51"):
        check_steps("LCM", 51)


def request(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a fox",
        "negative_prompt": "",
        "seed": 7,
        "sampler_name": "DPM++ 2M",
        "steps": 20,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": MODEL,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def test_params_stored_before_the_scheduler_field_load_as_automatic() -> None:
    params = request(sampler_name="DPM++ SDE Karras").to_params()
    del params["scheduler"]
    old = GenerationRequest.from_params(params)
    assert old.scheduler == "Automatic"
    assert old.sampling == ("DPM++ SDE", "Karras")


@pytest.mark.parametrize(
    ("sampler", "scheduler", "written"),
    [
        ("DPM++ 2M", "Karras", "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7"),
        ("DPM++ 2M", "Automatic", "Sampler: DPM++ 2M, Schedule type: Uniform,"),
        ("Euler a", "Automatic", "Sampler: Euler a, Schedule type: Automatic,"),
        ("DPM++ SDE Karras", "Automatic", "Sampler: DPM++ SDE, Schedule type: Karras,"),
        ("LMS", "SGM Uniform", "Sampler: LMS, Schedule type: SGM Uniform,"),
    ],
)
def test_the_png_parameters_name_sampler_and_schedule_as_a1111(
    sampler: str, scheduler: str, written: str
) -> None:
    text = infotext(request(sampler_name=sampler, scheduler=scheduler), 7)
    assert f"Steps: 20, {written}" in text


@pytest.fixture
def builder(tmp_path: Path) -> RequestBuilder:
    install_dummy_checkpoint(tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    return RequestBuilder(registry, Settings(data_dir=tmp_path))  # type: ignore[call-arg]


def order(hires: HiresOrder | None = None, **fields: object) -> Txt2ImgOrder:
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
    return Txt2ImgOrder(GenerationOrder(**values), hires)  # type: ignore[arg-type]


def test_a_task_stores_the_sampler_and_its_schedule_type_apart(builder: RequestBuilder) -> None:
    params = builder.txt2img(order(sampler_name="dpm++ 2m karras"), "t").params
    assert (params["sampler_name"], params["scheduler"]) == ("DPM++ 2M", "Karras")
    params = builder.txt2img(order(sampler_name="DPM2", scheduler="exponential"), "u").params
    assert (params["sampler_name"], params["scheduler"]) == ("DPM2", "Exponential")


@pytest.mark.parametrize(
    ("fields", "hires", "message"),
    [
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, None, "Invalid scheduler: DAN runs"),
        ({"sampler_name": "LCM", "steps": 60}, None, "Invalid steps: LCM runs at most 50"),
        (
            {"sampler_name": "LCM", "steps": 8},
            HiresOrder(1.5, 0.5, "Latent", steps=80),
            "Invalid upscale.steps: LCM runs at most 50 steps, got 80",
        ),
    ],
)
def test_what_a_sampler_cannot_run_is_refused_at_submission(
    builder: RequestBuilder, fields: dict[str, object], hires: HiresOrder | None, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        builder.txt2img(order(hires, **fields), "t")


def test_a_second_order_sampler_costs_two_unet_calls_a_step(builder: RequestBuilder) -> None:
    euler = builder.txt2img(order(sampler_name="Euler"), "e").needs.cost
    for name in ("Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ SDE Karras"):
        assert builder.txt2img(order(sampler_name=name), name).needs.cost == pytest.approx(
            2 * euler
        )
    assert builder.txt2img(order(sampler_name="DPM++ 2M"), "m").needs.cost == pytest.approx(euler)
