"""A1111's sampler aliases through the facade: what /sdapi/v1/samplers lists, and the internal
names older clients send (``k_euler_a``, ``k_dpmpp_2m_ka`` ...) running the sampler they name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.a1111_facade import Facade, basic, facade_serving

SMALL: dict[str, Any] = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
# A1111 1.9+'s aliases of the samplers DAN runs (DDPM is not A1111's: it has none).
A1111_ALIASES = {
    "DPM++ 2M": ["k_dpmpp_2m"],
    "DPM++ SDE": ["k_dpmpp_sde"],
    "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "DPM++ 3M SDE": ["k_dpmpp_3m_sde"],
    "Euler a": ["k_euler_a", "k_euler_ancestral"],
    "Euler": ["k_euler"],
    "LMS": ["k_lms"],
    "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"],
    "DPM2 a": ["k_dpm_2_a"],
    "DDIM": ["ddim"],
    "UniPC": ["unipc"],
    "LCM": ["k_lcm"],
    "DDPM": [],
}


@pytest.fixture
def facade(tmp_path: Path) -> Iterator[Facade]:
    with facade_serving(tmp_path) as served:
        yield served


def ran(facade: Facade, key: str, **fields: Any) -> tuple[str, str]:
    """The sampler and schedule type a txt2img with ``fields`` ran, as its info says."""
    reply = facade.http.post("/sdapi/v1/txt2img", json={**SMALL, **fields}, auth=basic(key))
    assert reply.status_code == 200, reply.text
    info = json.loads(reply.json()["info"])
    schedule = info["extra_generation_params"]["Schedule type"]
    assert f"Sampler: {info['sampler_name']}, Schedule type: {schedule}," in info["infotexts"][0]
    return info["sampler_name"], schedule


def test_samplers_list_a1111s_aliases_and_each_one_runs_its_sampler(facade: Facade) -> None:
    key = facade.key("alice")
    listed = facade.http.get("/sdapi/v1/samplers", auth=basic(key)).json()
    assert {s["name"]: s["aliases"] for s in listed} == A1111_ALIASES
    for sampler in listed:
        for alias in sampler["aliases"]:
            assert ran(facade, key, sampler_name=alias)[0] == sampler["name"], alias


# A1111 before 1.9 listed a sampler on a schedule ("DPM++ 2M Karras") as a sampler of its own.
OLD_ALIASES = (
    ("sampler_name", "k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
    ("sampler_name", "k_dpmpp_sde_ka", "DPM++ SDE", "Karras"),
    ("sampler_name", "k_lms_ka", "LMS", "Karras"),
    ("sampler_name", "K_DPM_2_A_KA", "DPM2 a", "Karras"),
    ("sampler_name", "k_dpmpp_2m_sde_ka", "DPM++ 2M SDE", "Karras"),
    ("sampler_name", "k_dpmpp_2m_sde_exp", "DPM++ 2M SDE", "Exponential"),
    ("sampler_index", "k_dpmpp_3m_sde_ka", "DPM++ 3M SDE", "Karras"),
    ("sampler_index", "k_dpmpp_3m_sde_exp", "DPM++ 3M SDE", "Exponential"),
)


def test_an_old_alias_of_a_sampler_on_a_schedule_runs_that_schedule(facade: Facade) -> None:
    key = facade.key("alice")
    for field, alias, sampler, schedule in OLD_ALIASES:
        assert ran(facade, key, **{field: alias}) == (sampler, schedule), alias


def test_an_alias_of_a_sampler_dan_lacks_is_refused_listing_the_valid_names(
    facade: Facade,
) -> None:
    key = facade.key("alice")
    for alias in ("k_dpmpp_2s_a", "k_dpmpp_2s_a_ka", "k_dpm_fast", "plms", "k_euler_ka"):
        reply = facade.http.post(
            "/sdapi/v1/txt2img", json={**SMALL, "sampler_name": alias}, auth=basic(key)
        )
        assert reply.status_code == 400, alias
        detail = reply.json()["detail"]
        assert detail.startswith("Invalid sampler_name: must be one of ")
        assert "Euler a, Euler, DPM++ SDE" in detail and detail.endswith(f"got {alias!r}")
    # An alias carries its schedule type: another one is refused, naming both ways out.
    reply = facade.http.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "sampler_name": "k_dpmpp_2m_ka", "scheduler": "Exponential"},
        auth=basic(key),
    )
    assert reply.status_code == 400
    assert reply.json()["detail"] == (
        "Invalid scheduler: sampler_name 'k_dpmpp_2m_ka' already says Karras; send Karras or "
        "Automatic, or sampler_name 'DPM++ 2M' with scheduler Exponential"
    )
