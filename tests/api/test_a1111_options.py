"""Clip skip and the VAE as A1111 clients set them: with ``POST /sdapi/v1/options`` for the
later generations of their key (``override_settings`` still winning for one request), read
back with ``GET /sdapi/v1/options``, and refused, naming the option, when DAN cannot use them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dan.domain import ModelKind
from tests.fixtures.a1111_facade import Facade, basic, facade_serving

SMALL: dict[str, Any] = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
CLIP_SKIP = "CLIP_stop_at_last_layers"


@pytest.fixture
def facade(tmp_path: Path) -> Iterator[Facade]:
    with facade_serving(tmp_path) as served:
        yield served


def generation_of(facade: Facade, key: str) -> dict[str, Any]:
    """The generation the key's newest task ran (an img2img task nests it)."""
    params = facade.tasks_of(key)[0].params
    return dict(params.get("generation", params))


def test_clip_skip_set_with_options_is_used_until_changed(facade: Facade) -> None:
    key = facade.key("alice")
    api = facade.api(key)
    assert api.get_options()[CLIP_SKIP] == 1
    api.set_options({CLIP_SKIP: 2})
    assert api.get_options()[CLIP_SKIP] == 2
    result = api.txt2img(**SMALL)
    assert generation_of(facade, key)["clip_skip"] == 2
    assert result.info["clip_skip"] == 2 and "Clip skip: 2" in result.info["infotexts"][0]
    api.img2img(images=[Image.new("RGB", (64, 64))], **SMALL)
    assert generation_of(facade, key)["clip_skip"] == 2
    # override_settings wins for one request and changes nothing for the next.
    api.txt2img(**SMALL, override_settings={CLIP_SKIP: 1})
    assert generation_of(facade, key)["clip_skip"] == 1
    api.txt2img(**SMALL)
    assert generation_of(facade, key)["clip_skip"] == 2
    other = facade.key("bob")  # each key has its own options
    assert facade.api(other).get_options()[CLIP_SKIP] == 1
    facade.api(other).txt2img(**SMALL)
    assert generation_of(facade, other)["clip_skip"] == 1


def test_the_vae_set_with_options_is_used_until_changed(facade: Facade) -> None:
    key = facade.key("alice")
    api = facade.api(key)
    clear = facade.services.registry.resolve(ModelKind.VAE, "clear")
    assert api.get_options()["sd_vae"] == "Automatic"
    assert generation_of_txt2img(facade, key, api) is None
    api.set_options({"sd_vae": "clear.safetensors"})
    assert api.get_options()["sd_vae"] == "clear.safetensors"
    result = api.txt2img(**SMALL)
    assert generation_of(facade, key)["vae"]["sha256"] == clear.sha256
    assert result.info["sd_vae_hash"] == clear.sha256[:10]
    assert f"VAE hash: {clear.sha256[:10]}" in result.info["infotexts"][0]
    api.txt2img(**SMALL, override_settings={"sd_vae": "None"})  # for this request only
    assert generation_of(facade, key)["vae"] is None
    assert generation_of_txt2img(facade, key, api) == clear.sha256
    for word, answered in (("None", "None"), ("automatic", "Automatic")):
        api.set_options({"sd_vae": word})
        assert api.get_options()["sd_vae"] == answered
        assert generation_of_txt2img(facade, key, api) is None


def generation_of_txt2img(facade: Facade, key: str, api: Any) -> str | None:
    """The sha256 of the VAE a txt2img without overrides runs with; None: the checkpoint's."""
    api.txt2img(**SMALL)
    vae = generation_of(facade, key)["vae"]
    return None if vae is None else str(vae["sha256"])


def test_options_kept_from_an_override_that_is_not_restored(facade: Facade) -> None:
    key = facade.key("alice")
    api = facade.api(key)
    overrides = {CLIP_SKIP: 3, "sd_vae": "clear.safetensors"}
    api.txt2img(**SMALL, override_settings=overrides)
    assert (api.get_options()[CLIP_SKIP], api.get_options()["sd_vae"]) == (1, "Automatic")
    api.txt2img(**SMALL, override_settings=overrides, override_settings_restore_afterwards=False)
    options = api.get_options()
    assert (options[CLIP_SKIP], options["sd_vae"]) == (3, "clear.safetensors")


REFUSED: tuple[tuple[dict[str, Any], str], ...] = (
    (
        {CLIP_SKIP: 13},
        "Invalid CLIP_stop_at_last_layers: must be an integer between 1 and 12; got 13",
    ),
    ({CLIP_SKIP: 0}, "Invalid CLIP_stop_at_last_layers: must be an integer between 1 and"),
    ({CLIP_SKIP: 1.5}, "Invalid CLIP_stop_at_last_layers: must be an integer between 1 and"),
    ({CLIP_SKIP: "2"}, "Invalid CLIP_stop_at_last_layers: must be an integer between 1 and"),
    ({CLIP_SKIP: True}, "Invalid CLIP_stop_at_last_layers: must be an integer between 1 and"),
    (
        {"sd_vae": "nope.safetensors"},
        "Invalid sd_vae: must be Automatic, None or an installed VAE (clear.safetensors); "
        "got 'nope.safetensors'",
    ),
    ({"sd_vae": 3}, "Invalid sd_vae: must be a VAE file's name (see /sdapi/v1/sd-vae)"),
    # Nothing of a refused body is kept, not even its valid options.
    ({CLIP_SKIP: 2, "sd_vae": "nope"}, "Invalid sd_vae: must be Automatic, None or"),
)


def test_options_dan_cannot_use_are_refused_naming_the_option(facade: Facade) -> None:
    for body, detail in REFUSED:
        key = facade.key("alice")
        reply = facade.http.post("/sdapi/v1/options", json=body, auth=basic(key))
        assert reply.status_code == 400, reply.text
        assert reply.json()["detail"].startswith(detail), body
        options = facade.http.get("/sdapi/v1/options", auth=basic(key)).json()
        assert (options[CLIP_SKIP], options["sd_vae"]) == (1, "Automatic"), body


def test_an_endless_clip_skip_is_a_400_not_a_500(facade: Facade) -> None:
    for endless in ("NaN", "Infinity", "-Infinity"):  # json.loads takes them
        reply = facade.http.post(
            "/sdapi/v1/options",
            content=json.dumps({"sd_vae": "None"})[:-1] + f', "{CLIP_SKIP}": {endless}}}',
            headers={"content-type": "application/json"},
            auth=basic(facade.key("alice")),
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["detail"].startswith("Invalid CLIP_stop_at_last_layers: must be an")


def test_a_chosen_vae_deleted_since_is_named_as_the_option_not_as_an_override(
    facade: Facade,
) -> None:
    key = facade.key("alice")
    api = facade.api(key)
    api.set_options({"sd_vae": "clear.safetensors"})
    facade.services.registry.resolve(ModelKind.VAE, "clear").path.unlink()
    facade.services.registry.scan()
    reply = facade.http.post("/sdapi/v1/txt2img", json=SMALL, auth=basic(key))
    assert reply.status_code == 400, reply.text
    detail = reply.json()["detail"]
    assert detail.startswith("Invalid sd_vae:"), detail
    assert detail.endswith("(the option chosen with POST /sdapi/v1/options)"), detail
    # A request's own override is still named as the override.
    body = {**SMALL, "override_settings": {"sd_vae": "clear.safetensors"}}
    reply = facade.http.post("/sdapi/v1/txt2img", json=body, auth=basic(key))
    assert reply.status_code == 400, reply.text
    assert reply.json()["detail"].startswith("Invalid override_settings.sd_vae:"), reply.text
